//! Picking a deployment: the four strategies, and an attempt's pick that
//! skips open breakers, full caps and deployments already tried.

use super::*;

impl DeploymentState {
    /// Feeds the latency estimate: a slower sample is taken at once (peak),
    /// a faster one moves the estimate an eighth of the way.
    pub fn observe(&self, headers_after: Duration) {
        let sample = u64::try_from(headers_after.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self
            .ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 || sample >= old {
                    sample
                } else {
                    old - (old - sample) / 8
                })
            });
    }

    /// Expected wait: latency times the queue it would join. Unmeasured
    /// deployments cost nothing, so each gets tried.
    fn cost(&self) -> u64 {
        let in_flight = self.in_flight.in_flight.load(Ordering::Relaxed) as u64;
        self.ewma_us
            .load(Ordering::Relaxed)
            .saturating_mul(in_flight + 1)
    }
}

impl Route {
    /// Picks a deployment for an attempt: never one whose breaker is open
    /// (or half-open with its probe already out) or that is at a
    /// concurrency cap, and one not in `tried` (a bit per index) while there
    /// is one, so a retry goes elsewhere.
    pub fn pick_available(
        &self,
        tried: u64,
        now: u64,
        session: Option<u64>,
    ) -> Result<Admitted<'_>, Unavailable> {
        let n = self.deployments.len().min(64);
        // A session's first attempt goes to its own deployment when that one
        // can take it; otherwise (and for retries) the strategy picks.
        if let Some(session) = session.filter(|_| tried == 0)
            && let Some(admitted) = self.session_pick(session, n, now)
        {
            return Ok(admitted);
        }
        let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        let mut blocked = 0u64;
        let mut full = false;
        for (i, deployment) in self.deployments.iter().take(n).enumerate() {
            if deployment.circuit(now) == Circuit::Open {
                blocked |= 1 << i;
            }
        }
        loop {
            if blocked & all == all {
                return Err(if full {
                    Unavailable::AtCapacity
                } else {
                    Unavailable::Cooling
                });
            }
            let avoid = if (tried | blocked) & all == all {
                blocked
            } else {
                tried | blocked
            };
            let index = self.pick_avoiding(avoid, n);
            let deployment = &self.deployments[index];
            blocked |= 1 << index;
            let probe = match deployment.circuit(now) {
                Circuit::Closed => None,
                Circuit::HalfOpen if deployment.take_probe() => Some(Probe(Arc::clone(deployment))),
                // Half-open with its probe already out.
                _ => continue,
            };
            match deployment.try_start() {
                Some(in_flight) => {
                    return Ok(Admitted {
                        index,
                        deployment,
                        in_flight,
                        probe,
                    });
                }
                // At a cap; a probe taken for it is released on drop.
                None => full = true,
            }
        }
    }

    /// The session's deployment by rendezvous hashing (the highest
    /// `mix(session, deployment)` wins), so adding or removing a deployment
    /// moves only the sessions it wins or loses. `None` when it is cooling
    /// or full.
    fn session_pick(&self, session: u64, n: usize, now: u64) -> Option<Admitted<'_>> {
        let index = (0..n)
            .max_by_key(|&i| splitmix(session ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))?;
        let deployment = &self.deployments[index];
        if deployment.circuit(now) != Circuit::Closed {
            return None;
        }
        let in_flight = deployment.try_start()?;
        Some(Admitted {
            index,
            deployment,
            in_flight,
            probe: None,
        })
    }

    /// A strategy pick outside `avoid`: a few draws, then the first in order.
    fn pick_avoiding(&self, avoid: u64, n: usize) -> usize {
        for _ in 0..8 {
            let chosen = self.pick();
            if let Some(index) = self.deployments.iter().position(|d| Arc::ptr_eq(d, chosen))
                && avoid & (1 << index) == 0
            {
                return index;
            }
        }
        (0..n).find(|i| avoid & (1 << i) == 0).unwrap_or(0)
    }

    /// Milliseconds until the first cooling deployment takes a probe.
    pub fn retry_after_ms(&self, now: u64) -> u64 {
        self.deployments
            .iter()
            .map(|d| d.open_until_ms.load(Ordering::Relaxed).saturating_sub(now))
            .min()
            .unwrap_or(0)
    }

    /// Picks a deployment with the route's strategy.
    pub fn pick(&self) -> &Arc<DeploymentState> {
        let deployments = &self.deployments;
        let index = match deployments.len() {
            0 | 1 => 0,
            n => match self.strategy {
                Strategy::Weighted => self.by_weight(random() % self.total_weight),
                Strategy::RoundRobin => {
                    self.by_weight(self.turn.fetch_add(1, Ordering::Relaxed) % self.total_weight)
                }
                Strategy::LeastInFlight => {
                    // Ties go to a random one of the least loaded, so equal
                    // deployments share the load instead of the first taking all.
                    let start = (random() % n as u64) as usize;
                    (0..n)
                        .map(|i| (start + i) % n)
                        .min_by_key(|&i| deployments[i].in_flight.in_flight.load(Ordering::Relaxed))
                        .unwrap_or(0)
                }
                Strategy::Latency => {
                    let a = (random() % n as u64) as usize;
                    let b = (a + 1 + (random() % (n as u64 - 1)) as usize) % n;
                    if deployments[a].cost() <= deployments[b].cost() {
                        a
                    } else {
                        b
                    }
                }
            },
        };
        &deployments[index.min(deployments.len().saturating_sub(1))]
    }

    /// The deployment whose cumulative weight range holds `ticket`.
    fn by_weight(&self, mut ticket: u64) -> usize {
        for (i, deployment) in self.deployments.iter().enumerate() {
            let weight = u64::from(deployment.weight);
            if ticket < weight {
                return i;
            }
            ticket -= weight;
        }
        0
    }
}

/// A fast per-thread pseudo-random number (xorshift64*), seeded from the
/// process's random hasher: balancing and jitter need spread, not cryptography.
pub fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()) | 1,
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// splitmix64's finalizer: a well-mixed, stable hash of a `u64`.
fn splitmix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The session key of a header value: FNV-1a, stable across processes, so
/// every instance sends a session to the same deployment.
pub fn session_key(value: &[u8]) -> u64 {
    value.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
