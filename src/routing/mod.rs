//! Model routing: which deployment serves a request for a public model name.
//!
//! Built once from `config.models`; per request it resolves the name (exact
//! first, then the longest wildcard prefix) and picks a deployment with the
//! model's strategy. All per-deployment state is atomics: no lock is taken
//! on the request path.

use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::{Breaker, Model, ModelTimeouts, Retry, Strategy};

mod balance;
mod breaker;
mod capacity;
pub mod fallback;
pub mod retry;
mod status;

pub use balance::random;
pub use breaker::{Circuit, Probe, now_ms};
pub use capacity::{Gauge, InFlight, Unavailable};

/// A deployment chosen for an attempt, counted in flight until dropped.
#[derive(Debug)]
pub struct Admitted<'a> {
    /// Index of the deployment in its route.
    pub index: usize,
    /// The deployment.
    pub deployment: &'a Arc<DeploymentState>,
    /// Held while the answer streams.
    pub in_flight: InFlight,
    /// The half-open probe, if this attempt is it.
    pub probe: Option<Probe>,
}

/// Live state of one deployment.
#[derive(Debug)]
pub struct DeploymentState {
    /// Index into the proxy's upstreams.
    pub upstream: usize,
    /// The upstream's model name, when it differs from the requested one.
    pub model: Option<String>,
    weight: u32,
    in_flight: Gauge,
    upstream_load: Arc<Gauge>,
    /// Peak-EWMA of time to response headers, in microseconds (0: no sample yet).
    ewma_us: AtomicU64,
    /// Circuit breaker: failures counted since `window_start_ms`, the time
    /// traffic may resume (`0`: closed), and whether the one probe is out.
    failures: AtomicU32,
    window_start_ms: AtomicU64,
    open_until_ms: AtomicU64,
    probing: AtomicBool,
    breaker: Breaker,
}

/// A model route with its deployments' live state.
#[derive(Debug)]
pub struct Route {
    /// The public name (`gpt-*` for a prefix route).
    pub name: String,
    prefix: Option<String>,
    strategy: Strategy,
    /// See `models.NAME.session_header`.
    pub session_header: Option<http::HeaderName>,
    /// See `models.NAME.session_user`.
    pub session_user: bool,
    /// The deployments, in configured order.
    pub deployments: Vec<Arc<DeploymentState>>,
    /// Retry policy.
    pub retry: Retry,
    /// Routes (indices) tried in order when this one's attempts run out.
    pub fallbacks: Vec<usize>,
    /// Routes (indices) tried in order on a context-length error.
    pub context_window_fallbacks: Vec<usize>,
    /// Timeout overrides for the route's requests.
    pub timeouts: ModelTimeouts,
    total_weight: u64,
    turn: AtomicU64,
}

/// Every configured route.
#[derive(Debug)]
pub struct ModelRouter {
    routes: Vec<Route>,
}

impl ModelRouter {
    /// Builds the router; `None` when no models are configured.
    /// `upstream_caps` holds each upstream's `max_concurrent`, by index.
    pub fn new(models: &[Model], upstream_caps: &[Option<usize>]) -> Option<Self> {
        if models.is_empty() {
            return None;
        }
        let loads: Vec<Arc<Gauge>> = upstream_caps
            .iter()
            .map(|&cap| Arc::new(Gauge::new(cap)))
            .collect();
        let routes = models
            .iter()
            .map(|model| Route {
                name: model.name.clone(),
                prefix: model.prefix.clone(),
                strategy: model.strategy,
                session_header: model.session_header.clone(),
                session_user: model.session_user,
                total_weight: model.deployments.iter().map(|d| u64::from(d.weight)).sum(),
                deployments: model
                    .deployments
                    .iter()
                    .map(|d| {
                        Arc::new(DeploymentState {
                            upstream: d.upstream,
                            model: d.model.clone(),
                            weight: d.weight,
                            in_flight: Gauge::new(d.max_concurrent),
                            upstream_load: loads.get(d.upstream).cloned().unwrap_or_default(),
                            ewma_us: AtomicU64::new(0),
                            failures: AtomicU32::new(0),
                            window_start_ms: AtomicU64::new(0),
                            open_until_ms: AtomicU64::new(0),
                            probing: AtomicBool::new(false),
                            breaker: model.breaker,
                        })
                    })
                    .collect(),
                turn: AtomicU64::new(0),
                retry: model.retry,
                fallbacks: model.fallbacks.clone(),
                timeouts: model.timeouts,
                context_window_fallbacks: model.context_window_fallbacks.clone(),
            })
            .collect();
        Some(Self { routes })
    }

    /// The route for a requested model: an exact name, else the longest matching prefix.
    pub fn resolve(&self, model: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.prefix.is_none() && r.name == model)
            .or_else(|| {
                self.routes
                    .iter()
                    .filter(|r| r.prefix.as_deref().is_some_and(|p| model.starts_with(p)))
                    .max_by_key(|r| r.prefix.as_deref().map_or(0, str::len))
            })
    }

    /// The route at `index` (fallbacks refer to routes by index).
    pub fn route(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    /// The exact (non-wildcard) public model names, for `GET /v1/models`.
    pub fn listed(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .filter(|r| r.prefix.is_none())
            .map(|r| r.name.as_str())
    }
}

impl Route {
    /// The model name a deployment of this route is asked for when the
    /// client asked for `requested`: the deployment's own name, else the
    /// route's (a fallback renames), else, for a wildcard, the request's.
    pub fn upstream_model<'a>(
        &'a self,
        deployment: &'a DeploymentState,
        requested: &'a str,
    ) -> &'a str {
        match (&deployment.model, &self.prefix) {
            (Some(own), _) => own,
            (None, Some(_)) => requested,
            (None, None) => &self.name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Deployment;

    const BREAKER: Breaker = Breaker {
        enabled: true,
        failures: 2,
        window: Duration::from_secs(1),
        cooldown: Duration::from_millis(100),
    };

    const RETRY: Retry = Retry {
        attempts: 3,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        retry_after_cap: Duration::from_millis(2),
        deadline: Duration::from_secs(1),
        on_status: crate::config::StatusSet::EMPTY,
        on_connect_error: true,
        on_timeout: true,
    };

    fn pick(route: &Route, tried: u64) -> usize {
        route.pick_available(tried, now_ms(), None).unwrap().index
    }

    #[test]
    fn retries_prefer_deployments_not_yet_tried() {
        let router = route(Strategy::Weighted, &[100, 1, 1]);
        let route = router.resolve("m").unwrap();
        for _ in 0..50 {
            assert_ne!(pick(route, 0b001), 0);
            assert_eq!(pick(route, 0b011), 2);
        }
        // With every deployment tried, any may serve again.
        assert!(pick(route, 0b111) < 3);
    }

    #[test]
    fn the_breaker_opens_after_n_failures_then_admits_one_probe() {
        let router = route(Strategy::Weighted, &[1]);
        let route = router.resolve("m").unwrap();
        let d = &route.deployments[0];
        let t = 1_000;
        d.record_failure(t);
        assert_eq!(d.circuit(t), Circuit::Closed);
        d.record_failure(t + 1);
        assert_eq!(d.circuit(t + 1), Circuit::Open);
        assert_eq!(
            route.pick_available(0, t + 2, None).unwrap_err(),
            Unavailable::Cooling
        );
        assert_eq!(route.retry_after_ms(t + 2), 99);
        // Cooldown over: one probe, not two.
        let probe = route.pick_available(0, t + 200, None).unwrap();
        assert!(probe.probe.is_some());
        assert!(route.pick_available(0, t + 200, None).is_err());
        // A failed probe reopens; a successful one closes.
        d.record_failure(t + 201);
        drop(probe);
        assert_eq!(d.circuit(t + 202), Circuit::Open);
        let probe = route.pick_available(0, t + 400, None).unwrap();
        d.record_success();
        drop(probe);
        assert_eq!(d.circuit(t + 401), Circuit::Closed);
        assert!(route.pick_available(0, t + 401, None).is_ok());
        assert!(route.pick_available(0, t + 401, None).is_ok());
    }

    #[test]
    fn an_abandoned_probe_frees_the_way_for_the_next() {
        let router = route(Strategy::Weighted, &[1]);
        let route = router.resolve("m").unwrap();
        let d = &route.deployments[0];
        d.record_failure(1_000);
        d.record_failure(1_001);
        let probe = route.pick_available(0, 1_200, None).unwrap();
        assert!(route.pick_available(0, 1_200, None).is_err());
        drop(probe);
        assert!(route.pick_available(0, 1_200, None).is_ok());
    }

    #[test]
    fn concurrency_caps_send_requests_elsewhere_then_say_so() {
        let model = model("m", Strategy::Weighted, &[(1000, Some(1)), (1, None)]);
        // Upstream 1 takes two at once.
        let router = ModelRouter::new(&[model], &[None, Some(2)]).unwrap();
        let route = router.resolve("m").unwrap();
        let first = route.pick_available(0, 1, None).unwrap();
        assert_eq!(first.index, 0);
        let second = route.pick_available(0, 1, None).unwrap();
        let third = route.pick_available(0, 1, None).unwrap();
        assert_eq!((second.index, third.index), (1, 1));
        assert_eq!(
            route.pick_available(0, 1, None).unwrap_err(),
            Unavailable::AtCapacity
        );
        drop(first);
        assert_eq!(route.pick_available(0, 1, None).unwrap().index, 0);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let router = route(Strategy::Weighted, &[1]);
        let d = &router.resolve("m").unwrap().deployments[0];
        d.record_failure(1_000);
        d.record_failure(1_000 + 5_000);
        assert_eq!(d.circuit(6_001), Circuit::Closed);
    }

    /// A model `name` served by deployments on upstreams 0, 1, … with these
    /// weights and caps.
    fn model(name: &str, strategy: Strategy, deployments: &[(u32, Option<usize>)]) -> Model {
        Model {
            name: name.into(),
            prefix: name.strip_suffix('*').map(Into::into),
            strategy,
            session_header: None,
            session_user: false,
            deployments: deployments
                .iter()
                .enumerate()
                .map(|(upstream, &(weight, max_concurrent))| Deployment {
                    upstream,
                    model: None,
                    weight,
                    max_concurrent,
                })
                .collect(),
            retry: RETRY,
            fallbacks: Vec::new(),
            context_window_fallbacks: Vec::new(),
            breaker: BREAKER,
            timeouts: ModelTimeouts::default(),
        }
    }

    fn route(strategy: Strategy, weights: &[u32]) -> ModelRouter {
        let deployments: Vec<(u32, Option<usize>)> = weights.iter().map(|&w| (w, None)).collect();
        ModelRouter::new(
            &[model("m", strategy, &deployments)],
            &vec![None; weights.len()],
        )
        .unwrap()
    }

    fn counts(router: &ModelRouter, n: usize) -> Vec<usize> {
        let route = router.resolve("m").unwrap();
        let mut counts = vec![0; route.deployments.len()];
        for _ in 0..n {
            counts[route.pick().upstream] += 1;
        }
        counts
    }

    #[test]
    fn a_session_stays_on_its_deployment_until_it_cannot_take_it() {
        let router = route(Strategy::RoundRobin, &[1, 1, 1, 1]);
        let route = router.resolve("m").unwrap();
        let now = now_ms();
        let session = |text: &str| Some(balance::session_key(text.as_bytes()));
        let home = route
            .pick_available(0, now, session("alice"))
            .unwrap()
            .index;
        for _ in 0..20 {
            assert_eq!(
                route
                    .pick_available(0, now, session("alice"))
                    .unwrap()
                    .index,
                home
            );
        }
        let homes: std::collections::HashSet<usize> = (0..64)
            .map(|i| {
                route
                    .pick_available(0, now, session(&format!("s{i}")))
                    .unwrap()
                    .index
            })
            .collect();
        assert!(homes.len() >= 3, "sessions spread: {homes:?}");
        // A retry goes elsewhere; a cooling home gives way to the strategy.
        assert_ne!(
            route
                .pick_available(1 << home, now, session("alice"))
                .unwrap()
                .index,
            home
        );
        for _ in 0..2 {
            route.deployments[home].record_failure(now);
        }
        for _ in 0..8 {
            assert_ne!(
                route
                    .pick_available(0, now, session("alice"))
                    .unwrap()
                    .index,
                home
            );
        }
    }

    #[test]
    fn weighted_random_follows_the_weights() {
        let c = counts(&route(Strategy::Weighted, &[3, 1]), 4000);
        assert!((2700..3300).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn round_robin_takes_turns_by_weight() {
        let router = route(Strategy::RoundRobin, &[2, 1]);
        let route = router.resolve("m").unwrap();
        let order: Vec<usize> = (0..6).map(|_| route.pick().upstream).collect();
        assert_eq!(order, [0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn least_in_flight_avoids_the_busy_deployment() {
        let router = route(Strategy::LeastInFlight, &[1, 1]);
        let route = router.resolve("m").unwrap();
        let _busy = route.deployments[0].try_start().unwrap();
        for _ in 0..50 {
            assert_eq!(route.pick().upstream, 1);
        }
    }

    #[test]
    fn latency_prefers_the_fast_deployment() {
        let router = route(Strategy::Latency, &[1, 1]);
        let route = router.resolve("m").unwrap();
        route.deployments[0].observe(Duration::from_millis(200));
        route.deployments[1].observe(Duration::from_millis(5));
        let c = counts(&router, 200);
        assert_eq!(c, [0, 200], "with two deployments P2C always compares both");
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let router = route(Strategy::Latency, &[1]);
        let d = &router.resolve("m").unwrap().deployments[0];
        d.observe(Duration::from_micros(800));
        d.observe(Duration::from_micros(8000));
        assert_eq!(d.ewma_us.load(Ordering::Relaxed), 8000);
        d.observe(Duration::from_micros(0));
        assert_eq!(d.ewma_us.load(Ordering::Relaxed), 8000 - (8000 - 1) / 8);
    }

    #[test]
    fn exact_names_win_over_prefixes_and_the_longest_prefix_wins() {
        // Each route's one deployment is on upstream 0; tell them apart by weight.
        let routes = [
            model("gpt-*", Strategy::Weighted, &[(1, None)]),
            model("gpt-4o-*", Strategy::Weighted, &[(2, None)]),
            model("gpt-4o-mini", Strategy::Weighted, &[(3, None)]),
        ];
        let router = ModelRouter::new(&routes, &[None]).unwrap();
        let upstream = |m: &str| router.resolve(m).map(|r| r.pick().weight);
        assert_eq!(upstream("gpt-4o-mini"), Some(3));
        assert_eq!(upstream("gpt-4o-2024"), Some(2));
        assert_eq!(upstream("gpt-3.5-turbo"), Some(1));
        assert_eq!(upstream("claude"), None);
        assert_eq!(router.listed().collect::<Vec<_>>(), ["gpt-4o-mini"]);
    }
}
