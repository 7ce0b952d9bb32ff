//! `models.NAME`: deployments, strategy, retries, fallbacks, breakers and
//! timeout overrides, checked against the upstreams they name.

use super::*;

/// A model's own timeouts, overriding its upstreams' (connect stays the
/// upstream's: connections are shared by every model on it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelTimeoutsFile {
    /// Until response headers arrive.
    #[serde(with = "humantime_serde")]
    pub response_headers: Option<Duration>,
    /// Longest gap between two body chunks.
    #[serde(with = "humantime_serde")]
    pub idle: Option<Duration>,
    /// The whole exchange.
    #[serde(with = "humantime_serde")]
    pub total: Option<Duration>,
}

/// A public model name and the deployments that serve it. A name ending in
/// `*` (`gpt-*`) matches every model with that prefix.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Where the model is served.
    pub deployments: Vec<DeploymentFile>,
    /// How a deployment is chosen for each request.
    #[serde(default)]
    pub strategy: Strategy,
    /// A request header naming the client's session (e.g.
    /// `x-claude-code-session-id`): requests of one session go to the same
    /// deployment, so its prompt cache pays off; the strategy decides when
    /// the header is absent or that deployment is unavailable.
    #[serde(default)]
    pub session_header: Option<String>,
    /// Without that header, the request's `user` (Chat, Responses) or
    /// `metadata.user_id` (Messages) names the session.
    #[serde(default)]
    pub session_user: bool,
    /// When and how a failed attempt is tried again.
    #[serde(default)]
    pub retry: RetryFile,
    /// Other models tried in order when this one's attempts are exhausted.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Bigger-context models tried in order when the upstream answers that
    /// the request exceeds the context window (`context_length_exceeded`).
    #[serde(default)]
    pub context_window_fallbacks: Vec<String>,
    /// When a failing deployment is taken out of rotation.
    #[serde(default)]
    pub circuit_breaker: BreakerFile,
    /// Timeouts for this model, overriding the upstream's.
    #[serde(default)]
    pub timeouts: ModelTimeoutsFile,
}

/// A deployment failing `failures` times within `window` gets no traffic
/// for `cooldown`, then one probe request decides whether it is back.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerFile {
    /// On by default; `false` keeps every deployment in rotation whatever it answers.
    pub enabled: bool,
    /// Failures (connect errors, timeouts, 429 and 5xx answers) that open the breaker.
    pub failures: u32,
    /// The window they are counted in.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long an open breaker keeps traffic away.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerFile {
    fn default() -> Self {
        Self {
            enabled: true,
            failures: 5,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(30),
        }
    }
}

/// Retry policy of a model route. An attempt is retried only before any
/// byte reached the client: on connect errors, timeouts before response
/// headers, and 429/500/502/503/504 answers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryFile {
    /// Attempts in all, the first included (1 turns retries off).
    pub attempts: u32,
    /// First backoff; doubled each retry, with full jitter.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Longest backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Longest wait an upstream's `retry-after` / `retry-after-ms` may ask for.
    #[serde(with = "humantime_serde")]
    pub retry_after_cap: Duration,
    /// No new attempt starts this long after the first.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Upstream statuses worth another attempt.
    pub on_status: Vec<u16>,
    /// Whether an upstream that cannot be reached (refused, DNS, TLS, reset
    /// before answering) is worth another attempt.
    pub on_connect_error: bool,
    /// Whether a connect or response-headers timeout is worth another attempt.
    pub on_timeout: bool,
}

impl Default for RetryFile {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            retry_after_cap: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
            on_status: DEFAULT_RETRY_STATUSES.to_vec(),
            on_connect_error: true,
            on_timeout: true,
        }
    }
}

/// One place a model is served.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentFile {
    /// The name of an entry in `upstreams`.
    pub upstream: String,
    /// The upstream's name for the model, when it differs from the public one.
    #[serde(default)]
    pub model: Option<String>,
    /// Share of traffic for the `weighted` and `round_robin` strategies;
    /// decimals allowed (`0.5`).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Most requests in flight on this deployment at once.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

fn default_weight() -> f64 {
    1.0
}

/// Most deployments one model may have (an attempt chain tracks them in a
/// 64-bit set; more would be silently ignored, so they are refused).
pub const MAX_DEPLOYMENTS: usize = 64;

/// Largest `weight` accepted.
const MAX_WEIGHT: f64 = 1_000_000.0;

/// Decimal weights as the smallest integers in the same proportions
/// (thousandths, divided by their greatest common divisor), so round robin
/// still takes `weight` turns each: 0.5 and 1 become 1 and 2.
fn integer_weights(weights: &[f64]) -> Vec<u32> {
    // Checked to be in (0, MAX_WEIGHT]: the products fit in u32.
    let units: Vec<u32> = weights
        .iter()
        .map(|w| ((w * 1000.0).round() as u32).max(1))
        .collect();
    let gcd = units.iter().copied().fold(0, |a, b| {
        let (mut a, mut b) = (a, b);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    });
    units.iter().map(|u| u / gcd.max(1)).collect()
}

/// How a model's deployment is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random, in proportion to `weight`.
    #[default]
    Weighted,
    /// In turn, `weight` requests each.
    RoundRobin,
    /// The deployment with the fewest requests in flight.
    LeastInFlight,
    /// Power of two random choices over a peak-EWMA of time to response
    /// headers, weighted by requests in flight.
    Latency,
}

/// A validated model route.
#[derive(Debug, Clone)]
pub struct Model {
    /// The public name (`gpt-*` for a prefix).
    pub name: String,
    /// For a wildcard, the prefix it matches.
    pub prefix: Option<String>,
    /// How a deployment is chosen.
    pub strategy: Strategy,
    /// The header whose value keeps a session on one deployment.
    pub session_header: Option<http::HeaderName>,
    /// The body's `user` keeps a session when the header does not.
    pub session_user: bool,
    /// Where it is served (never empty).
    pub deployments: Vec<Deployment>,
    /// Retry policy.
    pub retry: Retry,
    /// Indices into `Config::models` tried when attempts are exhausted.
    pub fallbacks: Vec<usize>,
    /// Indices into `Config::models` tried on a context-length error.
    pub context_window_fallbacks: Vec<usize>,
    /// Circuit breaker of each deployment.
    pub breaker: Breaker,
    /// Timeout overrides.
    pub timeouts: ModelTimeouts,
}

/// A validated circuit-breaker policy.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    /// Whether the breaker acts at all.
    pub enabled: bool,
    /// Failures within `window` that open it (at least 1).
    pub failures: u32,
    /// Counting window.
    pub window: Duration,
    /// Time without traffic before a probe.
    pub cooldown: Duration,
}

/// A validated retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// First backoff.
    pub backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Longest `retry-after` honoured.
    pub retry_after_cap: Duration,
    /// No attempt starts later than this after the first.
    pub deadline: Duration,
    /// Statuses retried.
    pub on_status: StatusSet,
    /// Whether unreachable upstreams are retried.
    pub on_connect_error: bool,
    /// Whether timeouts before the response headers are retried.
    pub on_timeout: bool,
}

/// The statuses retried by default: rate limits and server trouble.
pub const DEFAULT_RETRY_STATUSES: [u16; 6] = [429, 500, 502, 503, 504, 529];

/// A set of HTTP statuses (100–599), a bit each: `Copy`, no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// No status.
    pub const EMPTY: Self = Self([0; 10]);

    /// The set of `statuses`; `None` names the first outside 100–599.
    pub fn of(statuses: &[u16]) -> Result<Self, u16> {
        let mut set = Self::default();
        for &status in statuses {
            if !(100..=599).contains(&status) {
                return Err(status);
            }
            let bit = usize::from(status);
            set.0[bit / 64] |= 1 << (bit % 64);
        }
        Ok(set)
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        let bit = usize::from(status);
        self.0
            .get(bit / 64)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }
}

/// A validated deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// The upstream's model name, when it differs from the requested one.
    pub model: Option<String>,
    /// Share of traffic (at least 1).
    pub weight: u32,
    /// Most requests in flight at once.
    pub max_concurrent: Option<usize>,
}

/// A model's validated timeout overrides.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelTimeouts {
    /// Until response headers arrive.
    pub response_headers: Option<Duration>,
    /// Longest gap between two body chunks.
    pub idle: Option<Duration>,
    /// The whole exchange.
    pub total: Option<Duration>,
}

/// Validates the model routes against the upstreams they name.
pub(super) fn resolve_models(
    models: Ordered<ModelFile>,
    upstreams: &[Upstream],
    origin: &str,
) -> Result<Vec<Model>, ConfigError> {
    let names: std::collections::HashMap<String, usize> = models
        .0
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), i))
        .collect();
    let upstream_index: std::collections::HashMap<&str, usize> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();
    let fallback_index =
        |field: &str, list: &[String], own: &str| -> Result<Vec<usize>, ConfigError> {
            list.iter()
                .enumerate()
                .map(|(i, target)| {
                    let at = format!("{field}[{i}]");
                    if target == own {
                        return Err(invalid(origin, &at, "a model cannot fall back to itself"));
                    }
                    if target.contains('*') {
                        return Err(invalid(
                            origin,
                            &at,
                            "fallbacks name exact models, not wildcards",
                        ));
                    }
                    names.get(target).copied().ok_or_else(|| {
                        invalid(
                            origin,
                            &at,
                            format!("no model is named `{target}` under `models`"),
                        )
                    })
                })
                .collect()
        };
    let mut resolved = Vec::with_capacity(models.0.len());
    for (name, model) in models.0 {
        let field = format!("models.{name}");
        let fallbacks = fallback_index(&format!("{field}.fallbacks"), &model.fallbacks, &name)?;
        let context_window_fallbacks = fallback_index(
            &format!("{field}.context_window_fallbacks"),
            &model.context_window_fallbacks,
            &name,
        )?;
        let prefix = match name.find('*') {
            None => None,
            Some(at) if at + 1 == name.len() => Some(name[..at].to_owned()),
            Some(_) => {
                return Err(invalid(
                    origin,
                    &field,
                    "`*` may only end a model name (`gpt-*`)",
                ));
            }
        };
        if model.deployments.is_empty() {
            return Err(invalid(
                origin,
                &format!("{field}.deployments"),
                "needs at least one deployment",
            ));
        }
        if model.deployments.len() > MAX_DEPLOYMENTS {
            return Err(invalid(
                origin,
                &format!("{field}.deployments"),
                format!(
                    "has {} deployments; a model may have at most {MAX_DEPLOYMENTS} (split it into several models with fallbacks)",
                    model.deployments.len()
                ),
            ));
        }
        let weights: Vec<f64> = model.deployments.iter().map(|d| d.weight).collect();
        let mut deployments = Vec::with_capacity(model.deployments.len());
        for (i, deployment) in model.deployments.into_iter().enumerate() {
            let at = format!("{field}.deployments[{i}]");
            let upstream = upstream_index
                .get(deployment.upstream.as_str())
                .copied()
                .ok_or_else(|| {
                    let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                    invalid(
                        origin,
                        &format!("{at}.upstream"),
                        format!(
                            "no upstream is named `{}` (known: {})",
                            deployment.upstream,
                            known.join(", ")
                        ),
                    )
                })?;
            if !(deployment.weight.is_finite()
                && deployment.weight > 0.0
                && deployment.weight <= MAX_WEIGHT)
            {
                return Err(invalid(
                    origin,
                    &format!("{at}.weight"),
                    "must be a number greater than 0 and at most 1000000 (decimals allowed: 0.5)",
                ));
            }
            if prefix.is_some() && deployment.model.is_some() {
                return Err(invalid(
                    origin,
                    &format!("{at}.model"),
                    "a wildcard route passes the requested name through; it cannot rename it",
                ));
            }
            if deployment.max_concurrent == Some(0) {
                return Err(invalid(
                    origin,
                    &format!("{at}.max_concurrent"),
                    "must be at least 1",
                ));
            }
            deployments.push(Deployment {
                upstream,
                model: deployment.model,
                weight: 1,
                max_concurrent: deployment.max_concurrent,
            });
        }
        for (deployment, weight) in deployments.iter_mut().zip(integer_weights(&weights)) {
            deployment.weight = weight;
        }
        let retry = model.retry;
        if retry.attempts == 0 {
            return Err(invalid(
                origin,
                &format!("{field}.retry.attempts"),
                "must be at least 1 (1 means no retries)",
            ));
        }
        let session_header = model
            .session_header
            .as_deref()
            .map(|name| {
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    invalid(
                        origin,
                        &format!("{field}.session_header"),
                        "is not a header name (letters, digits, `-`)",
                    )
                })
            })
            .transpose()?;
        let breaker = model.circuit_breaker;
        if breaker.failures == 0 {
            return Err(invalid(
                origin,
                &format!("{field}.circuit_breaker.failures"),
                "must be at least 1",
            ));
        }
        let overrides = model.timeouts;
        for (name, value, longest) in [
            ("response_headers", overrides.response_headers, max::DAY),
            ("idle", overrides.idle, max::DAY),
            ("total", overrides.total, max::WEEK),
        ] {
            if let Some(value) = value {
                duration(origin, &format!("{field}.timeouts.{name}"), value, longest)?;
            }
        }
        duration(
            origin,
            &format!("{field}.circuit_breaker.window"),
            breaker.window,
            max::DAY,
        )?;
        duration(
            origin,
            &format!("{field}.circuit_breaker.cooldown"),
            breaker.cooldown,
            max::DAY,
        )?;
        let on_status = StatusSet::of(&retry.on_status).map_err(|_| {
            invalid(
                origin,
                &format!("{field}.retry.on_status"),
                "lists a status outside 100–599",
            )
        })?;
        for (name, value, longest) in [
            ("retry.backoff", retry.backoff, max::HOUR),
            ("retry.max_backoff", retry.max_backoff, max::HOUR),
            ("retry.retry_after_cap", retry.retry_after_cap, max::DAY),
            ("retry.deadline", retry.deadline, max::DAY),
        ] {
            // Zero is meaningful here (no backoff, never honour retry-after).
            if value > longest {
                duration(origin, &format!("{field}.{name}"), value, longest)?;
            }
        }
        resolved.push(Model {
            timeouts: ModelTimeouts {
                response_headers: overrides.response_headers,
                idle: overrides.idle,
                total: overrides.total,
            },
            breaker: Breaker {
                enabled: breaker.enabled,
                failures: breaker.failures,
                window: breaker.window,
                cooldown: breaker.cooldown,
            },
            name,
            prefix,
            strategy: model.strategy,
            session_header,
            session_user: model.session_user,
            deployments,
            fallbacks,
            context_window_fallbacks,
            retry: Retry {
                attempts: retry.attempts,
                backoff: retry.backoff,
                max_backoff: retry.max_backoff.max(retry.backoff),
                retry_after_cap: retry.retry_after_cap,
                deadline: retry.deadline,
                on_status,
                on_connect_error: retry.on_connect_error,
                on_timeout: retry.on_timeout,
            },
        });
    }
    Ok(resolved)
}
