//! Per-key limits — requests per minute, tokens per minute, requests in
//! flight — and spend budgets, held in memory on one instance.
//!
//! RPM and TPM are GCRA buckets (the generic cell rate algorithm: one
//! "theoretical arrival time" per bucket, advanced by each admission), kept
//! in one atomic each, so admitting a request takes no lock. `governor`
//! implements the same algorithm, but it cannot settle: a token bucket
//! here admits a request on an *estimate* and is corrected to the real
//! usage when the answer ends (more is charged if more was used; unused
//! estimate is given back, never below what was used).
//!
//! Concurrency slots are guards that free themselves when the answer's body
//! is dropped, however the request ends; on one instance a crash takes the
//! counts with it, so nothing can stay locked.
//!
//! With `redis` configured, RPM and TPM are shared by every instance
//! ([`shared`]); these buckets then serve only while Redis is unreachable
//! and `redis.on_unavailable` is `local`.

pub mod shared;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::KeyRecord;
use shared::{Allowance, OnUnavailable, SharedLimits};

/// The clock origin the buckets count from (monotonic).
fn now_ns() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

const MINUTE_NS: u64 = 60_000_000_000;

/// One GCRA bucket: `limit` units per minute, a burst of one minute's worth.
#[derive(Debug, Default)]
pub struct Bucket {
    /// Theoretical arrival time, ns since [`now_ns`]'s origin.
    tat: AtomicU64,
}

/// What a bucket said about an admission, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Units per minute.
    pub limit: u64,
    /// Units that could still be admitted now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When refused: how long until `n` units would be admitted.
    pub retry_after: Option<Duration>,
    /// Admitted from a shared (Redis) lease rather than a local bucket.
    pub shared: bool,
}

impl Verdict {
    /// The bucket's state for the headers.
    pub fn quota(&self) -> crate::error::Quota {
        crate::error::Quota {
            limit: self.limit,
            remaining: self.remaining,
            reset: self.reset,
        }
    }
}

impl Bucket {
    /// Nanoseconds one unit occupies at `limit` per minute.
    fn unit(limit: u64) -> u64 {
        // Above one unit per nanosecond the bucket cannot count finer: a
        // limit that high is, in effect, none.
        (MINUTE_NS / limit.max(1)).max(1)
    }

    fn verdict(limit: u64, tat: u64, now: u64, retry_after: Option<Duration>) -> Verdict {
        let used = tat.saturating_sub(now);
        Verdict {
            limit,
            remaining: MINUTE_NS.saturating_sub(used) / Self::unit(limit),
            reset: Duration::from_nanos(used),
            retry_after,
            shared: false,
        }
    }

    /// Admits `n` units if the bucket has room for them, at `limit` per minute.
    pub fn take(&self, n: u64, limit: u64) -> Verdict {
        let unit = Self::unit(limit);
        let cost = n.saturating_mul(unit);
        let now = now_ns();
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            // Room for a minute's worth at most (and a single request bigger
            // than a minute's worth is admitted into an empty bucket, or it
            // could never pass).
            let over = next.saturating_sub(now).saturating_sub(MINUTE_NS);
            if over > 0 && tat > now {
                return Self::verdict(limit, tat, now, Some(Duration::from_nanos(over)));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Self::verdict(limit, next, now, None),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Corrects an admission of `reserved` units to `used`: charges the
    /// difference, or gives back what was not used.
    pub fn settle(&self, reserved: u64, used: u64, limit: u64) {
        let unit = Self::unit(limit);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(if used >= reserved {
                    tat.max(now_ns())
                        .saturating_add((used - reserved).saturating_mul(unit))
                } else {
                    tat.saturating_sub((reserved - used).saturating_mul(unit))
                })
            });
    }
}

/// A key's live state: its buckets, its requests in flight, its spend.
#[derive(Debug, Default)]
pub struct KeyState {
    /// Requests per minute.
    pub requests: Bucket,
    /// Tokens per minute.
    pub tokens: Bucket,
    /// Requests in flight now.
    pub in_flight: AtomicU64,
    /// Spent in the current budget period, nano-USD.
    pub spent: AtomicU64,
    /// Which budget period `spent` is for (its index since the key's creation).
    pub period: AtomicU64,
    /// This instance's lease of the shared RPM bucket.
    pub shared_requests: Mutex<Allowance>,
    /// This instance's lease of the shared TPM bucket.
    pub shared_tokens: Mutex<Allowance>,
}

/// Which of a key's rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

/// The shared limits are configured, Redis is unreachable and
/// `redis.on_unavailable` is `closed`.
#[derive(Debug, Clone, Copy)]
pub struct LimitsDown;

/// A request's slot in its key's concurrency limit: given back on drop.
pub struct Slot(std::sync::Arc<KeyState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one of `max` concurrency slots of `state`, or says none is free.
pub fn acquire_slot(state: &std::sync::Arc<KeyState>, max: u64) -> Option<Slot> {
    state
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(std::sync::Arc::clone(state)))
}

/// The budget period `at` (Unix ms) falls in, and when it ends (Unix ms);
/// a lifetime budget has one period that never ends.
pub fn budget_period(record: &KeyRecord, at: i64) -> (u64, Option<i64>) {
    let Some(period) = record.budget_period_secs.filter(|p| *p > 0) else {
        return (0, None);
    };
    let period_ms = i64::try_from(period.saturating_mul(1000)).unwrap_or(i64::MAX);
    let elapsed = at.saturating_sub(record.created_at).max(0);
    let index = elapsed / period_ms;
    let end = record
        .created_at
        .saturating_add((index + 1).saturating_mul(period_ms));
    (u64::try_from(index).unwrap_or(0), Some(end))
}

/// Start of the budget period `at` falls in (Unix ms).
pub fn period_start(record: &KeyRecord, at: i64) -> i64 {
    match (budget_period(record, at), record.budget_period_secs) {
        ((index, Some(_)), Some(period)) => record.created_at.saturating_add(
            i64::try_from(index.saturating_mul(period).saturating_mul(1000)).unwrap_or(i64::MAX),
        ),
        _ => i64::MIN,
    }
}

impl KeyState {
    fn parts(&self, dimension: Dimension) -> (&Bucket, &Mutex<Allowance>, &'static str) {
        match dimension {
            Dimension::Requests => (&self.requests, &self.shared_requests, "rpm"),
            Dimension::Tokens => (&self.tokens, &self.shared_tokens, "tpm"),
        }
    }

    /// Admits `n` units of `limit` per minute in `dimension`: from the
    /// shared bucket when there is one and Redis answers, else from this
    /// instance's bucket, unless `on_unavailable` is `closed`.
    pub async fn take(
        &self,
        shared: Option<&SharedLimits>,
        key_id: &str,
        dimension: Dimension,
        n: u64,
        limit: u64,
    ) -> Result<Verdict, LimitsDown> {
        let (bucket, allowance, name) = self.parts(dimension);
        if let Some(shared) = shared {
            match shared.take(allowance, key_id, name, n, limit).await {
                Some(verdict) => return Ok(verdict),
                None if shared.on_unavailable == OnUnavailable::Closed => return Err(LimitsDown),
                None => {}
            }
        }
        Ok(bucket.take(n, limit))
    }

    /// Corrects an admission `verdict` of `reserved` units to `used`
    /// (`used` 0 gives a refused request's units back).
    pub fn settle(
        &self,
        dimension: Dimension,
        verdict_shared: bool,
        reserved: u64,
        used: u64,
        limit: u64,
    ) {
        let (bucket, allowance, _) = self.parts(dimension);
        if verdict_shared {
            if let Ok(mut allowance) = allowance.lock() {
                allowance.settle(reserved, used);
            }
        } else {
            bucket.settle(reserved, used, limit);
        }
    }

    /// What has been spent in the period `at` falls in, resetting the count
    /// when a new period has begun.
    pub fn spent_now(&self, record: &KeyRecord, at: i64) -> u64 {
        let (index, _) = budget_period(record, at);
        let seen = self.period.load(Ordering::Acquire);
        if index > seen
            && self
                .period
                .compare_exchange(seen, index, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.spent.store(0, Ordering::Release);
        }
        self.spent.load(Ordering::Acquire)
    }

    /// Adds a charge to the period `at` falls in.
    pub fn charge(&self, record: &KeyRecord, at: i64, nano_usd: u64) {
        self.spent_now(record, at);
        self.spent.fetch_add(nano_usd, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_limit_then_refuses_with_a_retry_time() {
        let bucket = Bucket::default();
        for i in 0..10 {
            let verdict = bucket.take(1, 10);
            assert_eq!(verdict.retry_after, None, "request {i}");
            assert_eq!(verdict.remaining, 9 - i);
        }
        let refused = bucket.take(1, 10);
        let retry = refused.retry_after.unwrap();
        assert!(retry <= Duration::from_secs(6) && retry > Duration::from_secs(5));
        assert_eq!(refused.remaining, 0);
    }

    #[test]
    fn settling_charges_more_or_gives_back_unused_estimate() {
        let bucket = Bucket::default();
        assert!(bucket.take(600, 1000).retry_after.is_none());
        // The request used only 100 of its 600: 500 come back.
        bucket.settle(600, 100, 1000);
        assert!(bucket.take(850, 1000).retry_after.is_none());
        assert!(bucket.take(100, 1000).retry_after.is_some());
        // Used more than estimated: the excess is charged, even past the limit.
        bucket.settle(10, 500, 1000);
        assert!(bucket.take(1, 1000).retry_after.is_some());
    }

    #[test]
    fn limits_beyond_one_unit_per_nanosecond_do_not_divide_by_zero() {
        let bucket = Bucket::default();
        for limit in [u64::MAX, 1_000_000_000_000, MINUTE_NS + 1] {
            let verdict = bucket.take(1_000, limit);
            assert_eq!(verdict.retry_after, None);
            bucket.settle(1_000, 10, limit);
        }
    }

    #[test]
    fn a_request_bigger_than_the_limit_passes_an_empty_bucket_only() {
        let bucket = Bucket::default();
        assert!(bucket.take(5000, 1000).retry_after.is_none());
        assert!(bucket.take(1, 1000).retry_after.is_some());
    }

    #[test]
    fn budget_periods_follow_the_keys_creation_time() {
        let mut record = KeyRecord::empty();
        record.created_at = 1_000;
        record.budget_period_secs = Some(86_400);
        assert_eq!(budget_period(&record, 1_000), (0, Some(86_401_000)));
        assert_eq!(budget_period(&record, 86_401_000), (1, Some(172_801_000)));
        assert_eq!(period_start(&record, 86_401_500), 86_401_000);
        record.budget_period_secs = None;
        assert_eq!(budget_period(&record, 5_000_000_000), (0, None));
        let state = KeyState::default();
        record.budget_period_secs = Some(10);
        state.charge(&record, 2_000, 7);
        assert_eq!(state.spent_now(&record, 3_000), 7);
        assert_eq!(state.spent_now(&record, 11_000), 0);
    }
}
