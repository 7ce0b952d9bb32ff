// DRAFT, not compiled: the Redis-shared RPM/TPM limits designed for issue 11
// (batched GCRA leases). To be wired in as src/limits/shared.rs with the
// `redis` crate (tokio-comp, script, connection-manager), a `redis:` config
// section and a two-instance test.

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
//! **Bounds.** Every unit admitted was granted by the shared bucket first,
//! so the instances together admit what one GCRA bucket would, plus the
//! leases: worst case, each instance uses a lease taken just before the
//! bucket's window moved, an overshoot of at most `instances × limit / 10`
//! within [`LEASE_TTL`]. Unused leased units expire with their lease and are
//! not returned (an undershoot of the same bound). For TPM, a request is
//! leased on its estimate and settled locally: usage over the estimate is a
//! debt the instance's next lease pays first, unused estimate stays in the
//! allowance. Each script touches one key, so it runs on Redis Cluster.
//!
//! **Redis unreachable.** `redis.on_unavailable: local` (the default)
//! falls back to each instance's own buckets (each then admits up to the
//! full limit); `closed` refuses limited requests with 503. Either way the
//! switch is logged once per change and shown on `/admin/status`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a leased batch may be used.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// How long a Redis call may take before the instance treats Redis as down.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// Grants up to ARGV[1] units from the GCRA bucket KEYS[1] (ARGV[2] µs per
/// unit, a burst of ARGV[3] µs); returns {granted, µs until one more unit fits}.
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
return {grant, math.floor(wait)}
";

/// What to do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Each instance limits on its own.
    Local,
    /// Limited requests are refused (503).
    Closed,
}

/// An instance's allowance for one bucket.
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

    /// Corrects a TPM admission: `reserved` was taken, `used` was used.
    pub fn settle(&mut self, reserved: u64, used: u64) {
        let diff = i128::from(reserved) - i128::from(used);
        self.units = i64::try_from(i128::from(self.units) + diff).unwrap_or(self.units);
    }
}

/// The outcome of a shared admission.
pub enum Shared {
    /// Admitted.
    Admitted,
    /// Refused: retry after this long.
    Refused(Duration),
    /// Redis is unreachable: the caller applies `on_unavailable`.
    Unavailable,
}

/// The Redis side of the limits.
pub struct SharedLimits {
    connection: redis::aio::ConnectionManager,
    prefix: String,
    script: redis::Script,
    /// What to do while Redis is down.
    pub on_unavailable: OnUnavailable,
    healthy: AtomicBool,
}

impl SharedLimits {
    /// Connects to `url`; keys are `{prefix}:limit:…`.
    pub async fn connect(
        url: &str,
        prefix: String,
        on_unavailable: OnUnavailable,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1);
        let connection = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            connection,
            prefix,
            script: redis::Script::new(LEASE),
            on_unavailable,
            healthy: AtomicBool::new(true),
        })
    }

    /// Whether the last call reached Redis.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn mark(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!("Redis reachable again: limits are shared across instances");
            } else {
                tracing::warn!(
                    mode = ?self.on_unavailable,
                    "Redis unreachable: limits fall back to redis.on_unavailable"
                );
            }
        }
    }

    /// Admits `n` units of `limit` per minute for `key_id`'s `dimension`,
    /// from the local allowance when it has them, else from a new lease.
    pub async fn take(
        &self,
        allowance: &Mutex<Allowance>,
        key_id: &str,
        dimension: &str,
        n: u64,
        limit: u64,
    ) -> Shared {
        let now = Instant::now();
        let want = {
            let Ok(mut local) = allowance.lock() else {
                return Shared::Unavailable;
            };
            if local.take(n, now) {
                return Shared::Admitted;
            }
            let debt = u64::try_from(-local.units.min(0)).unwrap_or(0);
            let batch = local
                .used
                .saturating_mul(2)
                .clamp(1, (limit / 10).max(1))
                .max(n);
            batch.saturating_add(debt)
        };
        let unit_us = 60_000_000u64 / limit.max(1);
        let key = format!("{}:limit:{key_id}:{dimension}", self.prefix);
        let mut connection = self.connection.clone();
        let call = self
            .script
            .key(key)
            .arg(want)
            .arg(unit_us.max(1))
            .arg(60_000_000u64)
            .invoke_async::<(u64, u64)>(&mut connection);
        let (granted, wait_us) = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(answer)) => {
                self.mark(true);
                answer
            }
            Ok(Err(err)) => {
                tracing::debug!(%err, "Redis limit call failed");
                self.mark(false);
                return Shared::Unavailable;
            }
            Err(_) => {
                self.mark(false);
                return Shared::Unavailable;
            }
        };
        let Ok(mut local) = allowance.lock() else {
            return Shared::Unavailable;
        };
        let live = local.expires.is_some_and(|at| at > now);
        if !live && local.units > 0 {
            local.units = 0;
        }
        local.units = local
            .units
            .saturating_add(i64::try_from(granted).unwrap_or(i64::MAX));
        local.expires = Some(Instant::now() + LEASE_TTL);
        local.used = 0;
        if local.take(n, Instant::now()) {
            Shared::Admitted
        } else {
            Shared::Refused(Duration::from_micros(wait_us.max(1000)))
        }
    }
}
