//! `store`, `keys` and `prices`: where keys and usage live, whether every
//! request needs a virtual key, and what each model costs.

use super::*;

/// `store`: the database for keys and usage.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `sqlite://FILE` (created on first start) or `postgres://…`;
    /// `${VAR}` reads the environment. Default with `keys.required`:
    /// `sqlite://llmproxy.db`.
    #[serde(default)]
    pub url: Option<String>,
    /// How often usage records are written (1 s unless set).
    #[serde(default, with = "humantime_serde")]
    pub flush_interval: Option<Duration>,
}

/// `keys`: virtual keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// Every `/v1/*` request must carry a virtual key.
    #[serde(default)]
    pub required: bool,
    /// How often changes to keys are read from the store (1 s unless set):
    /// the longest a revocation made elsewhere takes to apply here.
    #[serde(default, with = "humantime_serde")]
    pub refresh: Option<Duration>,
    /// Limits every key shares for a public model (a `*` suffix matches a
    /// prefix): a provider's quota, kept from any one client.
    #[serde(default)]
    pub model_limits: Ordered<ModelLimit>,
}

/// `keys.model_limits.MODEL`: requests and tokens per minute for a model,
/// over all keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimit {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
}

/// `redis`: rate limits shared by every instance.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    /// `redis://[:PASSWORD@]HOST[:PORT][/DB]`; `${VAR}` reads the environment.
    pub url: String,
    /// Prefix of every Redis key llmproxy writes (`llmproxy` unless set), so
    /// several deployments can share one Redis.
    #[serde(default)]
    pub prefix: Option<String>,
    /// While Redis cannot be reached: `local` (each instance limits on its
    /// own, the default) or `closed` (requests of keys with limits get 503).
    #[serde(default)]
    pub on_unavailable: Option<OnUnavailable>,
}

/// What limits do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Each instance applies the limits on its own.
    Local,
    /// Requests of keys with RPM/TPM limits are refused with 503.
    Closed,
}

/// The validated `redis` section.
#[derive(Debug, Clone)]
pub struct Redis {
    /// The URL (may hold a password: never logged).
    pub url: crate::headers::Secret,
    /// The key prefix.
    pub prefix: String,
    /// While Redis cannot be reached.
    pub on_unavailable: OnUnavailable,
}

/// What a model costs, in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Input (prompt) tokens.
    pub input: f64,
    /// Output (completion) tokens.
    pub output: f64,
    /// Prompt tokens served from the provider's cache (the input price
    /// unless set).
    #[serde(default)]
    pub cached_input: Option<f64>,
}

/// The validated accounting settings: present when a store is configured.
#[derive(Debug, Clone)]
pub struct Accounting {
    /// The store's URL (may hold a password: never logged).
    pub store_url: crate::headers::Secret,
    /// Whether requests need a virtual key.
    pub keys_required: bool,
    /// Key refresh interval.
    pub refresh: Duration,
    /// Usage flush interval.
    pub flush_interval: Duration,
    /// Prices by public model name (`*` suffix matches a prefix), in file order.
    pub prices: Vec<(String, Price)>,
    /// Shared limits, when `redis` is configured.
    pub redis: Option<Redis>,
    /// Per-model limits over all keys, in file order.
    pub model_limits: Vec<(String, ModelLimit)>,
}

impl Accounting {
    /// The price of `model`: an exact entry first, else the first matching pattern.
    pub fn price(&self, model: &str) -> Option<Price> {
        matching(&self.prices, model).map(|(_, price)| *price)
    }
}

/// The entry for `model`: an exact name first, else the first `*` pattern
/// that matches.
pub fn matching<'a, T>(entries: &'a [(String, T)], model: &str) -> Option<&'a (String, T)> {
    entries.iter().find(|(name, _)| name == model).or_else(|| {
        entries.iter().find(|(name, _)| {
            name.strip_suffix('*')
                .is_some_and(|prefix| model.starts_with(prefix))
        })
    })
}

/// Validates `store`, `keys` and `prices` together.
pub fn resolve_accounting(
    store: StoreFile,
    keys: KeysFile,
    prices: Ordered<Price>,
    redis: Option<RedisFile>,
    origin: &str,
    env: &dyn Lookup,
) -> Result<Option<Accounting>, ConfigError> {
    let redis = redis
        .map(|file| resolve_redis(file, origin, env))
        .transpose()?;
    for (model, limit) in &keys.model_limits.0 {
        for (field, value) in [("rpm", limit.rpm), ("tpm", limit.tpm)] {
            if value == Some(0) {
                return Err(invalid(
                    origin,
                    &format!("keys.model_limits.{model}.{field}"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
    }
    if redis.is_some() && !keys.required {
        return Err(invalid(
            origin,
            "redis",
            "Redis shares the rate limits of virtual keys: set `keys.required: true`",
        ));
    }
    for (model, price) in &prices.0 {
        for (field, value) in [
            ("input", Some(price.input)),
            ("output", Some(price.output)),
            ("cached_input", price.cached_input),
        ] {
            if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return Err(invalid(
                    origin,
                    &format!("prices.{model}.{field}"),
                    "must be a number of USD per million tokens, zero or more",
                ));
            }
        }
    }
    let url = match store.url {
        Some(url) => interpolate(&url, env).map_err(|m| invalid(origin, "store.url", m))?,
        None if keys.required => "sqlite://llmproxy.db".to_owned(),
        None => {
            if !keys.model_limits.0.is_empty() {
                return Err(invalid(
                    origin,
                    "keys.model_limits",
                    "model limits are applied with virtual keys: set `keys.required: true` (or `store.url`)",
                ));
            }
            if !prices.0.is_empty() {
                return Err(invalid(
                    origin,
                    "prices",
                    "prices are charged to usage records: set `store.url` (or `keys.required: true`)",
                ));
            }
            return Ok(None);
        }
    };
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres:")
        || url.starts_with("postgresql:"))
    {
        return Err(invalid(
            origin,
            "store.url",
            "must start with sqlite: (an embedded file, e.g. sqlite://llmproxy.db) or postgres://",
        ));
    }
    let refresh = keys.refresh.unwrap_or(Duration::from_secs(1));
    duration(origin, "keys.refresh", refresh, max::HOUR)?;
    let flush_interval = store.flush_interval.unwrap_or(Duration::from_secs(1));
    duration(origin, "store.flush_interval", flush_interval, max::HOUR)?;
    Ok(Some(Accounting {
        store_url: crate::headers::Secret::new(url),
        keys_required: keys.required,
        refresh,
        flush_interval,
        prices: prices.0,
        redis,
        model_limits: keys.model_limits.0,
    }))
}

fn resolve_redis(file: RedisFile, origin: &str, env: &dyn Lookup) -> Result<Redis, ConfigError> {
    let url = interpolate(&file.url, env).map_err(|m| invalid(origin, "redis.url", m))?;
    if !env.placeholder() && !url.starts_with("redis://") {
        return Err(invalid(
            origin,
            "redis.url",
            "must be redis://[:PASSWORD@]HOST[:PORT][/DB], e.g. redis://127.0.0.1:6379 (rediss:// is not supported yet)",
        ));
    }
    let prefix = file.prefix.unwrap_or_else(|| "llmproxy".to_owned());
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(invalid(
            origin,
            "redis.prefix",
            "must be 1 to 64 letters, digits, `-`, `_`, `.` or `:`",
        ));
    }
    Ok(Redis {
        url: crate::headers::Secret::new(url),
        prefix,
        on_unavailable: file.on_unavailable.unwrap_or(OnUnavailable::Local),
    })
}
