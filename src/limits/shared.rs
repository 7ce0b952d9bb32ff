//! RPM and TPM limits shared by every instance through Redis, without a
//! Redis call per request.
//!
//! **Design: batched leases from one GCRA bucket in Redis.** Each key and
//! dimension has one bucket in Redis (`{prefix}:limit:{key_id}:rpm|tpm`,
//! its theoretical arrival time in µs of *Redis server time*, so instance
//! clocks never matter). An instance does not ask Redis per request: it
//! leases a batch of units (a Lua script applies GCRA to the whole batch
//! and grants what fits) and admits requests from that local allowance until
//! it is used up or [`LEASE_TTL`] passes. The batch adapts to the instance's
//! own demand — twice what it used of the last lease, at least what the
//! request needs, at most a tenth of the limit — so a busy instance calls
//! Redis about once per ten percent of the limit and a quiet one holds
//! little.
//!
//! **Bounds.** Every unit an instance admits was granted by the shared
//! bucket first, so together the instances admit what one GCRA bucket
//! would, except that a lease is granted when it is taken and used up to
//! [`LEASE_TTL`] later. The worst-case overshoot over any window is
//! therefore what was leased in the second before it: at most
//! `instances × max(limit / 10, largest request)` units (with 3 instances
//! and `rpm: 600`, 180 requests above the limit, once). Unused leased units
//! expire with their lease and are not returned: an undershoot of the same
//! bound. For TPM, a request is leased on its estimate and settled locally:
//! usage over the estimate is a debt the instance's next lease pays first,
//! unused estimate stays in the allowance. Each script touches one key, so
//! it runs on Redis Cluster.
//!
//! Concurrency limits stay per instance: a shared count would need a Redis
//! call when each request starts and ends. On one instance they are exact
//! and die with the process, so a crash cannot hold a slot.
//!
//! **Redis unreachable.** `redis.on_unavailable: local` (the default)
//! falls back to each instance's own buckets (each then admits up to the
//! full limit); `closed` refuses limited requests with 503. Either way the
//! switch is logged once per change and shown on `/admin/status`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::Verdict;

/// How long a leased batch may be used.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// How long a Redis call may take before the instance treats Redis as down.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// How often the health of the connection is checked (and a lost one retried).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Grants up to ARGV[1] units from the GCRA bucket KEYS[1] (ARGV[2] µs per
/// unit, a burst of ARGV[3] µs); returns {granted, µs until one more unit
/// fits, µs until the bucket is full again}. Redis server time is the only
/// clock, so the instances' clocks never matter.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local want = tonumber(ARGV[1])
local unit = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local room = math.floor((now + burst - tat) / unit)
local grant = math.max(0, math.min(want, room))
if grant > 0 then
  tat = tat + grant * unit
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
local wait = math.max(0, tat + unit - now - burst)
return {grant, math.floor(wait), math.floor(tat - now)}
";

/// What to do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Each instance limits on its own (each admits up to the full limit).
    Local,
    /// Limited requests are refused (503).
    Closed,
}

impl OnUnavailable {
    /// The name used in the config and on `/admin/status`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Closed => "closed",
        }
    }
}

/// An instance's allowance for one shared bucket.
#[derive(Debug, Default)]
pub struct Allowance {
    /// Units left (negative: a debt the next lease pays first).
    units: i64,
    /// When the lease stops being usable.
    expires: Option<Instant>,
    /// Units used from the current lease (sizes the next one).
    used: u64,
}

impl Allowance {
    /// Takes `n` units from a live lease, if it has them.
    fn take(&mut self, n: u64, now: Instant) -> bool {
        let live = self.expires.is_some_and(|at| at > now);
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if live && self.units >= n {
            self.units -= n;
            self.used = self.used.saturating_add(n.unsigned_abs());
            true
        } else {
            false
        }
    }

    /// Corrects an admission: `reserved` was taken, `used` was used (more
    /// becomes a debt, less goes back into the allowance).
    pub fn settle(&mut self, reserved: u64, used: u64) {
        let diff = i128::from(reserved) - i128::from(used);
        self.units = i64::try_from(i128::from(self.units) + diff).unwrap_or(self.units);
    }

    /// How many units the next lease asks for: twice what the last one was
    /// used for, at least `n`, at most a tenth of the limit (or `n`), plus
    /// any debt.
    fn batch(&self, n: u64, limit: u64) -> u64 {
        let debt = self.units.min(0).unsigned_abs();
        self.used
            .saturating_mul(2)
            .clamp(1, (limit / 10).max(1))
            .max(n)
            .saturating_add(debt)
    }

    /// Adds a fresh lease of `granted` units; what an expired lease left is dropped.
    fn renew(&mut self, granted: u64, now: Instant) {
        let live = self.expires.is_some_and(|at| at > now);
        if !live && self.units > 0 {
            self.units = 0;
        }
        self.units = self
            .units
            .saturating_add(i64::try_from(granted).unwrap_or(i64::MAX));
        self.expires = Some(now + LEASE_TTL);
        self.used = 0;
    }
}

/// The Redis side of the limits: one connection (multiplexed, reconnecting)
/// shared by every request.
pub struct SharedLimits {
    client: redis::Client,
    connection: OnceCell<redis::aio::ConnectionManager>,
    prefix: String,
    script: redis::Script,
    /// What to do while Redis is down.
    pub on_unavailable: OnUnavailable,
    /// [`UNKNOWN`] until the first call, then [`UP`] or [`DOWN`].
    health: AtomicU8,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds the URL, which may hold a password.
        f.debug_struct("SharedLimits")
            .field("prefix", &self.prefix)
            .field("on_unavailable", &self.on_unavailable)
            .finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Limits shared through the Redis at `url`, under keys
    /// `{prefix}:limit:…`. Does not connect: [`Self::probe`] does, so
    /// llmproxy starts (and applies `on_unavailable`) while Redis is down.
    pub fn new(
        url: &str,
        prefix: String,
        on_unavailable: OnUnavailable,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: OnceCell::new(),
            prefix,
            script: redis::Script::new(LEASE),
            on_unavailable,
            health: AtomicU8::new(UNKNOWN),
        })
    }

    /// Whether the last call reached Redis.
    pub fn healthy(&self) -> bool {
        self.health.load(Ordering::Relaxed) == UP
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn mark(&self, healthy: bool, cause: &dyn std::fmt::Display) {
        let now = if healthy { UP } else { DOWN };
        if self.health.swap(now, Ordering::Relaxed) != now {
            if healthy {
                tracing::info!(prefix = %self.prefix, "Redis reachable: limits are shared across instances");
            } else {
                tracing::warn!(
                    on_unavailable = self.on_unavailable.name(),
                    cause = %cause,
                    "Redis unreachable: {}",
                    match self.on_unavailable {
                        OnUnavailable::Local => "each instance applies the limits on its own",
                        OnUnavailable::Closed => "requests of keys with limits are refused (503)",
                    }
                );
            }
        }
    }

    /// Connects if not yet connected, then pings; keeps
    /// [`Self::healthy`] true to the facts. Run every [`PROBE_INTERVAL`] by
    /// [`Self::watch`].
    pub async fn probe(&self) {
        let connect = async {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(1))
                .set_response_timeout(CALL_TIMEOUT)
                .set_number_of_retries(1);
            self.client.get_connection_manager_with_config(config).await
        };
        let connection = match self.connection.get_or_try_init(|| connect).await {
            Ok(connection) => connection,
            Err(err) => return self.mark(false, &err),
        };
        let mut connection = connection.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(CALL_TIMEOUT, ping.query_async::<String>(&mut connection)).await
        {
            Ok(Ok(_)) => self.mark(true, &""),
            Ok(Err(err)) => self.mark(false, &err),
            Err(_) => self.mark(false, &"no answer within 250ms"),
        }
    }

    /// Probes Redis every second, for as long as llmproxy runs.
    pub async fn watch(self: std::sync::Arc<Self>) {
        let mut every = tokio::time::interval(PROBE_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.probe().await;
        }
    }

    /// Admits `n` units of `limit` per minute from `key_id`'s `dimension`
    /// (`rpm` or `tpm`): from the local allowance when it has them, else
    /// from a new lease. `None`: Redis is unreachable.
    pub async fn take(
        &self,
        allowance: &Mutex<Allowance>,
        key_id: &str,
        dimension: &str,
        n: u64,
        limit: u64,
    ) -> Option<Verdict> {
        let now = Instant::now();
        let want = {
            let mut local = allowance.lock().ok()?;
            if local.take(n, now) {
                return Some(Verdict {
                    limit,
                    remaining: local.units.max(0).unsigned_abs(),
                    reset: Duration::ZERO,
                    retry_after: None,
                    shared: true,
                });
            }
            local.batch(n, limit)
        };
        let connection = self.connection.get()?;
        let mut connection = connection.clone();
        let unit_us = (60_000_000u64 / limit.max(1)).max(1);
        let mut invocation = self
            .script
            .key(format!("{}:limit:{key_id}:{dimension}", self.prefix));
        invocation.arg(want).arg(unit_us).arg(60_000_000u64);
        let call = invocation.invoke_async::<(u64, u64, u64)>(&mut connection);
        let (granted, wait_us, used_us) = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(answer)) => {
                self.mark(true, &"");
                answer
            }
            Ok(Err(err)) => {
                self.mark(false, &err);
                return None;
            }
            Err(_) => {
                self.mark(false, &"no answer within 250ms");
                return None;
            }
        };
        let mut local = allowance.lock().ok()?;
        let now = Instant::now();
        local.renew(granted, now);
        let admitted = local.take(n, now);
        Some(Verdict {
            limit,
            // What the shared bucket still holds, as far as this instance knows.
            remaining: 60_000_000u64.saturating_sub(used_us) / unit_us,
            reset: Duration::from_micros(used_us),
            retry_after: (!admitted).then(|| Duration::from_micros(wait_us.max(1000))),
            shared: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowance_admits_from_a_live_lease_only() {
        let mut allowance = Allowance::default();
        let now = Instant::now();
        assert!(!allowance.take(1, now), "no lease yet");
        allowance.renew(3, now);
        assert!(allowance.take(2, now));
        assert!(!allowance.take(2, now), "one unit left");
        assert!(allowance.take(1, now));
        allowance.renew(5, now);
        assert!(!allowance.take(1, now + LEASE_TTL), "the lease has expired");
    }

    #[test]
    fn batches_follow_demand_within_a_tenth_of_the_limit_and_pay_debts() {
        let mut allowance = Allowance::default();
        assert_eq!(allowance.batch(1, 1000), 1);
        let now = Instant::now();
        allowance.renew(1, now);
        assert!(allowance.take(1, now));
        assert_eq!(allowance.batch(1, 1000), 2, "twice the last use");
        allowance.used = 500;
        assert_eq!(allowance.batch(1, 1000), 100, "a tenth of the limit");
        assert_eq!(
            allowance.batch(300, 1000),
            300,
            "never less than the request"
        );
        // A TPM request estimated at 10 used 60: a debt of 50.
        allowance.units = 0;
        allowance.settle(10, 60);
        assert_eq!(allowance.batch(1, 1000), 150);
        // Unused estimate goes back.
        allowance.units = 0;
        allowance.settle(60, 10);
        assert_eq!(allowance.units, 50);
    }
}
