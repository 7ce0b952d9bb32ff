//! Circuit breakers: failures in a window open a deployment's breaker for a
//! cooldown, then one probe decides whether it is back.

use super::*;

/// Milliseconds on a process-wide monotonic clock, for breaker timestamps in atomics.
pub fn now_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Where a deployment's circuit breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Serving.
    Closed,
    /// Cooling down: no traffic.
    Open,
    /// Cooldown over: one probe request decides.
    HalfOpen,
}

/// The one probe a half-open deployment lets through. If the request is
/// abandoned before its outcome is recorded (the client left), dropping this
/// frees the probe for the next request instead of blocking it for good.
#[derive(Debug)]
pub struct Probe(pub(super) Arc<DeploymentState>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

impl DeploymentState {
    /// The breaker's state at `now`.
    pub fn circuit(&self, now: u64) -> Circuit {
        match self.open_until_ms.load(Ordering::Acquire) {
            0 => Circuit::Closed,
            until if now < until => Circuit::Open,
            _ => Circuit::HalfOpen,
        }
    }

    /// A half-open deployment admits one probe and turns the rest away
    /// until the probe's outcome is known.
    pub(super) fn take_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// An attempt here failed in a way that says the deployment is in trouble.
    pub fn record_failure(&self, now: u64) {
        let breaker = self.breaker;
        if !breaker.enabled {
            return;
        }
        let cooldown = u64::try_from(breaker.cooldown.as_millis()).unwrap_or(u64::MAX);
        if self.probing.swap(false, Ordering::AcqRel) {
            // The probe failed: straight back to cooling down.
            self.open_until_ms
                .store(now.saturating_add(cooldown), Ordering::Release);
            return;
        }
        let window = u64::try_from(breaker.window.as_millis()).unwrap_or(u64::MAX);
        let start = self.window_start_ms.load(Ordering::Acquire);
        let failures = if start == 0 || now.saturating_sub(start) > window {
            self.window_start_ms.store(now, Ordering::Release);
            self.failures.store(1, Ordering::Release);
            1
        } else {
            self.failures.fetch_add(1, Ordering::AcqRel) + 1
        };
        if failures >= breaker.failures && self.circuit(now) == Circuit::Closed {
            self.open_until_ms
                .store(now.saturating_add(cooldown), Ordering::Release);
            self.failures.store(0, Ordering::Release);
        }
    }

    /// An attempt here got an answer worth keeping: a probe closes the breaker.
    pub fn record_success(&self) {
        if self.probing.swap(false, Ordering::AcqRel) {
            self.open_until_ms.store(0, Ordering::Release);
            self.failures.store(0, Ordering::Release);
        }
    }
}
