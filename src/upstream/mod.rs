//! Everything about talking to an upstream: its base URL, the connector
//! and the mapping of its failures, the connection pool, and one attempt's
//! send.

pub mod attempt;
mod base_url;
mod client;
pub mod h1;
pub mod pool;
pub mod providers;

use std::sync::Arc;

use http::HeaderValue;

use crate::config::Upstream;

pub use base_url::BaseUrl;
pub use client::{RequestBody, UpstreamBody, classify, connector};

/// One upstream with its own connections (timeouts differ per upstream).
pub struct Target {
    /// The configured upstream.
    pub upstream: Upstream,
    /// Its connections.
    pub pool: Arc<pool::Pool>,
    /// `x-llmproxy-upstream` for its answers, made once.
    pub name_header: HeaderValue,
    /// How errors name it: `name (host:port)`, or `host:port` alone.
    pub label: Arc<str>,
}

/// Every upstream, and what every send to them shares.
pub struct Upstreams {
    /// The upstreams; the first serves requests no model route claims.
    pub targets: Vec<Target>,
    /// Largest request body sent, in bytes.
    pub max_body_size: u64,
}

impl Upstreams {
    /// The upstreams of a validated config, each with its client.
    pub fn new(config: &crate::config::Config) -> Self {
        let targets = config
            .upstreams
            .iter()
            .map(|upstream| Target {
                pool: Arc::new(pool::Pool::new(
                    connector(&upstream.timeouts),
                    upstream.base_url.origin(),
                    upstream.http2_prior_knowledge(),
                )),
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
        Self {
            targets,
            max_body_size: config.limits.max_body_size,
        }
    }

    /// The names, in configured order.
    pub fn names(&self) -> Vec<&str> {
        self.targets
            .iter()
            .map(|t| t.upstream.name.as_str())
            .collect()
    }
}
