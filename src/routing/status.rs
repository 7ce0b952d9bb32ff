//! The admin endpoint's snapshot of every route's deployments.

use super::*;

/// One deployment's state as the admin endpoint shows it.
#[derive(Debug, serde::Serialize)]
pub struct DeploymentStatus {
    /// Index of its upstream.
    #[serde(skip)]
    pub upstream_index: usize,
    /// The upstream's name (filled in by the caller, which knows the names).
    pub upstream: String,
    /// The upstream's model name, when renamed.
    pub model: Option<String>,
    /// `healthy`, `cooldown` or `half_open`.
    pub state: &'static str,
    /// Milliseconds of cooldown left.
    pub cooldown_remaining_ms: u64,
    /// Requests still streaming.
    pub in_flight: usize,
    /// Peak-EWMA time to response headers (`null` before the first answer).
    pub ewma_ms: Option<f64>,
    /// Failures counted in the breaker's current window.
    pub recent_failures: u32,
}

/// One route's state as the admin endpoint shows it.
#[derive(Debug, serde::Serialize)]
pub struct RouteStatus {
    /// The public name.
    pub model: String,
    /// Its deployments.
    pub deployments: Vec<DeploymentStatus>,
}

impl ModelRouter {
    /// A snapshot of every route's deployments at `now`.
    pub fn status(&self, now: u64) -> Vec<RouteStatus> {
        self.routes
            .iter()
            .map(|route| RouteStatus {
                model: route.name.clone(),
                deployments: route
                    .deployments
                    .iter()
                    .map(|d| {
                        let ewma = d.ewma_us.load(Ordering::Relaxed);
                        DeploymentStatus {
                            upstream_index: d.upstream,
                            upstream: String::new(),
                            model: d.model.clone(),
                            state: match d.circuit(now) {
                                Circuit::Closed => "healthy",
                                Circuit::Open => "cooldown",
                                Circuit::HalfOpen => "half_open",
                            },
                            cooldown_remaining_ms: d
                                .open_until_ms
                                .load(Ordering::Relaxed)
                                .saturating_sub(now),
                            in_flight: d.in_flight.in_flight.load(Ordering::Relaxed),
                            ewma_ms: (ewma > 0).then(|| ewma as f64 / 1000.0),
                            recent_failures: d.failures.load(Ordering::Relaxed),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}
