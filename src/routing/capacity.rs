//! Concurrency caps: a deployment's and its upstream's requests in flight.

use super::*;

/// Requests in flight against a cap: a deployment's, or an upstream's shared
/// by every deployment on it.
#[derive(Debug, Default)]
pub struct Gauge {
    pub(super) in_flight: AtomicUsize,
    cap: Option<usize>,
}

impl Gauge {
    /// A gauge with an optional cap.
    pub fn new(cap: Option<usize>) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            cap,
        }
    }

    /// Counts one more if under the cap (increment first, so racing callers
    /// can never overshoot it together).
    pub(super) fn try_acquire(&self) -> bool {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.cap.is_some_and(|cap| before >= cap) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    pub(super) fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no deployment could take an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every deployment's breaker is open (or its probe is out).
    Cooling,
    /// The rest are at their concurrency caps.
    AtCapacity,
}

/// A request in flight on a deployment; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(pub(super) Arc<DeploymentState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.release();
        self.0.upstream_load.release();
    }
}

impl DeploymentState {
    /// Counts a request in flight until the guard is dropped, or `None`
    /// when the deployment or its upstream is at its concurrency cap.
    pub fn try_start(self: &Arc<Self>) -> Option<InFlight> {
        if !self.in_flight.try_acquire() {
            return None;
        }
        if !self.upstream_load.try_acquire() {
            self.in_flight.release();
            return None;
        }
        Some(InFlight(Arc::clone(self)))
    }
}
