//! The shared state every request reads, built once from the validated
//! config: the upstreams with their clients, the model router, and the
//! gateway-wide limits. Nothing in it is locked on the request path.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::Semaphore;

use crate::config::{Config, Upstream};
use crate::routing::ModelRouter;
use crate::upstream::UpstreamClient;

/// One upstream with its own pooled client (timeouts differ per upstream).
pub struct Target {
    /// The configured upstream.
    pub upstream: Upstream,
    /// The pooled client.
    pub client: UpstreamClient,
    /// `x-llmproxy-upstream` for its answers, made once.
    pub name_header: HeaderValue,
    /// How errors name it: `name (host:port)`, or `host:port` alone.
    pub label: Arc<str>,
}

/// What every request shares.
pub struct AppState {
    /// The upstreams; the first serves requests no model route claims.
    pub targets: Vec<Target>,
    /// Model routing, when `models` is configured.
    pub router: Option<ModelRouter>,
    /// Largest request body, in bytes.
    pub max_body_size: u64,
    /// Guards `GET /admin/status`; `None` turns it off.
    pub admin_token: Option<crate::headers::Secret>,
    /// Throttles wrong admin tokens.
    pub admin_guard: crate::admin::Guard,
    /// Permits for requests in flight (`limits.max_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// Permits for request bytes buffered at once, over every request
    /// (`limits.max_buffered_bytes`).
    pub body_budget: Arc<Semaphore>,
    /// How long a client may take to send its request body.
    pub body_read_timeout: Duration,
    /// Every task the server starts; shutdown closes it and waits.
    pub tasks: tokio_util::task::TaskTracker,
}

impl AppState {
    /// Builds the state from a validated config.
    pub fn new(config: &Config) -> Arc<Self> {
        let targets = config
            .upstreams
            .iter()
            .map(|upstream| Target {
                client: crate::upstream::client(&upstream.timeouts),
                // Names are checked to be header-safe when the config is loaded.
                name_header: HeaderValue::from_str(&upstream.name)
                    .unwrap_or(HeaderValue::from_static("upstream")),
                label: if config.models.is_empty() {
                    upstream.base_url.authority().into()
                } else {
                    format!("{} ({})", upstream.name, upstream.base_url.authority()).into()
                },
                upstream: upstream.clone(),
            })
            .collect();
        Arc::new(Self {
            targets,
            router: ModelRouter::new(
                &config.models,
                &config
                    .upstreams
                    .iter()
                    .map(|u| u.max_concurrent)
                    .collect::<Vec<_>>(),
            ),
            max_body_size: config.limits.max_body_size,
            admin_token: config.admin_token.clone(),
            admin_guard: crate::admin::Guard::default(),
            in_flight: Arc::new(Semaphore::new(config.limits.max_in_flight)),
            body_budget: Arc::new(Semaphore::new(
                usize::try_from(config.limits.max_buffered_bytes)
                    .unwrap_or(usize::MAX)
                    .min(Semaphore::MAX_PERMITS),
            )),
            body_read_timeout: config.limits.body_read_timeout,
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }
}
