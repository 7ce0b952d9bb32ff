//! The shared state every request reads, built once from the validated
//! config: the upstreams with their clients, the model router, the admin
//! guard and the gateway-wide limits. Nothing in it is locked on the
//! request path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::admin::Admin;
use crate::auth::Keys;
use crate::config::Accounting;
use crate::config::Config;
use crate::routing::ModelRouter;
use crate::store::Store;
use crate::upstream::Upstreams;
use crate::usage::Sink;

/// Keys, limits and usage, when a store is configured.
pub struct Accounts {
    /// The store.
    pub store: Store,
    /// Every key, in memory.
    pub keys: Keys,
    /// Where usage records go.
    pub sink: Sink,
    /// The validated settings (prices, whether keys are required).
    pub settings: Accounting,
    /// RPM/TPM shared through Redis, when `redis` is configured.
    pub shared: Option<Arc<crate::limits::shared::SharedLimits>>,
    /// `keys.model_limits`, each with its buckets, in file order.
    pub models: Vec<(String, ModelLimits)>,
}

/// One `keys.model_limits` entry and its buckets.
pub struct ModelLimits {
    /// The limits.
    pub limit: crate::config::ModelLimit,
    /// The buckets (the same kind a key has).
    pub state: Arc<crate::limits::KeyState>,
    /// Its id in shared limits: `model:PATTERN`.
    pub id: String,
}

impl Accounts {
    /// Builds the per-model buckets from the settings.
    pub fn model_limits(settings: &Accounting) -> Vec<(String, ModelLimits)> {
        settings
            .model_limits
            .iter()
            .map(|(pattern, limit)| {
                (
                    pattern.clone(),
                    ModelLimits {
                        limit: *limit,
                        state: Arc::default(),
                        id: format!("model:{pattern}"),
                    },
                )
            })
            .collect()
    }
}

/// What every request shares.
pub struct AppState {
    /// The upstreams and their clients.
    pub upstreams: Upstreams,
    /// Model routing, when `models` is configured.
    pub router: Option<ModelRouter>,
    /// `GET /admin/status`, when `admin.token` is set.
    pub admin: Option<Admin>,
    /// Permits for requests in flight (`limits.max_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// Permits for request bytes buffered at once, over every request
    /// (`limits.max_buffered_bytes`).
    pub body_budget: Arc<Semaphore>,
    /// How long a client may take to send its request body.
    pub body_read_timeout: Duration,
    /// Keys and usage accounting; `None` costs nothing per request.
    pub accounts: Option<Accounts>,
    /// Every task the server starts; shutdown closes it and waits.
    pub tasks: tokio_util::task::TaskTracker,
}

impl AppState {
    /// Builds the state from a validated config.
    pub fn new(config: &Config, accounts: Option<Accounts>) -> Arc<Self> {
        Arc::new(Self {
            upstreams: Upstreams::new(config),
            router: ModelRouter::new(
                &config.models,
                &config
                    .upstreams
                    .iter()
                    .map(|u| u.max_concurrent)
                    .collect::<Vec<_>>(),
            ),
            admin: config.admin_token.clone().map(Admin::new),
            in_flight: Arc::new(Semaphore::new(config.limits.max_in_flight)),
            body_budget: Arc::new(Semaphore::new(
                usize::try_from(config.limits.max_buffered_bytes)
                    .unwrap_or(usize::MAX)
                    .min(Semaphore::MAX_PERMITS),
            )),
            body_read_timeout: config.limits.body_read_timeout,
            accounts,
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }
}
