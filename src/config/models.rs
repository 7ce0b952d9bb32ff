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
}

impl Default for RetryFile {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            retry_after_cap: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
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
    /// Share of traffic for the `weighted` and `round_robin` strategies.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Most requests in flight on this deployment at once.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

fn default_weight() -> u32 {
    1
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
            if deployment.weight == 0 {
                return Err(invalid(
                    origin,
                    &format!("{at}.weight"),
                    "must be at least 1",
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
                weight: deployment.weight,
                max_concurrent: deployment.max_concurrent,
            });
        }
        let retry = model.retry;
        if retry.attempts == 0 {
            return Err(invalid(
                origin,
                &format!("{field}.retry.attempts"),
                "must be at least 1 (1 means no retries)",
            ));
        }
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
        for (name, value, longest) in [
            ("retry.backoff", retry.backoff, max::HOUR),
            ("retry.max_backoff", retry.max_backoff, max::HOUR),
            ("retry.retry_after_cap", retry.retry_after_cap, max::DAY),
            ("retry.deadline", retry.deadline, max::DAY),
            ("circuit_breaker.window", breaker.window, max::DAY),
            ("circuit_breaker.cooldown", breaker.cooldown, max::DAY),
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
                failures: breaker.failures,
                window: breaker.window,
                cooldown: breaker.cooldown,
            },
            name,
            prefix,
            strategy: model.strategy,
            deployments,
            fallbacks,
            context_window_fallbacks,
            retry: Retry {
                attempts: retry.attempts,
                backoff: retry.backoff,
                max_backoff: retry.max_backoff.max(retry.backoff),
                retry_after_cap: retry.retry_after_cap,
                deadline: retry.deadline,
            },
        });
    }
    Ok(resolved)
}
