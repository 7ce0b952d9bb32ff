//! llmproxy: an OpenAI-compatible LLM gateway.
//!
//! Where a request goes, from socket to socket:
//! - [`run`] accepts a connection (bounded by
//!   `limits.max_connections`; a client has `limits.header_read_timeout` to
//!   start its first request, and an HTTP/2 connection at most
//!   `limits.max_streams_per_connection` streams) and serves it with hyper;
//! - the layers of `service`, outermost first: `telemetry::AccessLog`
//!   (request id, `Server-Timing`, one log line when the response is really
//!   over), then `catch_panic::CatchPanic` (a panic is a 500, never a
//!   dropped connection), then the router `app`;
//! - `app`: `GET /` is the health check, `GET /admin/status` the admin
//!   view, `/v1/*` goes to `pipeline::forward`, anything else is a 404 in
//!   the OpenAI error shape;
//! - `pipeline` takes the request through its stages — admit,
//!   authenticate, limit, route, attempt, observe — and streams the
//!   upstream's answer back.

pub mod admin;
pub(crate) mod admin_http;
pub mod auth;
pub(crate) mod catch_panic;
pub mod config;
pub(crate) mod error;
pub(crate) mod headers;
pub(crate) mod ingress;
pub(crate) mod limits;
pub mod mock;
pub(crate) mod pipeline;
pub(crate) mod routing;
pub(crate) mod server;
pub(crate) mod state;
pub mod store;
pub(crate) mod stream;
pub mod telemetry;
pub(crate) mod upstream;
pub(crate) mod usage;
pub(crate) mod wire;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{Method, Uri, header};

use crate::catch_panic::CatchPanic;
use crate::error::ProxyError;
use crate::state::AppState;
use crate::telemetry::AccessLog;

pub use server::bind;

/// The routes: health check, admin status, `/v1/*` forwarding, and an
/// OpenAI-shaped 404 elsewhere.
///
/// `/v1/*` is matched by prefix in the fallback rather than by a `{*path}`
/// route: a wildcard capture costs four allocations per request, and the
/// pipeline reads the raw URI anyway.
pub(crate) fn app(state: Arc<AppState>) -> Routes {
    let router = Router::new()
        .route("/", get(health).fallback(not_found))
        .route("/admin/status", get(admin_http::status).fallback(not_found))
        .route(
            "/admin/keys",
            get(admin_http::list_keys)
                .post(admin_http::create_key)
                .fallback(not_found),
        )
        .route(
            "/admin/keys/{id}",
            get(admin_http::show_key)
                .patch(admin_http::update_key)
                .fallback(not_found),
        )
        .route(
            "/admin/keys/{id}/revoke",
            post(admin_http::revoke_key).fallback(not_found),
        )
        .route(
            "/admin/usage",
            get(admin_http::usage_totals).fallback(not_found),
        )
        .route(
            "/admin/usage/records",
            get(admin_http::usage_records).fallback(not_found),
        )
        .fallback(not_found_fallback)
        .with_state(Arc::clone(&state));
    Routes { state, router }
}

/// `/v1/*` straight to the pipeline; everything else through axum's router.
///
/// Nearly every request is `/v1/*`: matching its prefix here skips the
/// router's path lookup, URL-parameter bookkeeping and response mapping
/// (about 4 % of the instructions per request). Both sides box one future,
/// as axum's handlers do.
#[derive(Clone)]
pub(crate) struct Routes {
    state: Arc<AppState>,
    router: Router,
}

type BoxedAnswer =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Infallible>> + Send>>;

impl<B> tower::Service<http::Request<B>> for Routes
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxedAnswer;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> BoxedAnswer {
        let request = request.map(axum::body::Body::new);
        if request.uri().path().starts_with("/v1/") {
            let state = Arc::clone(&self.state);
            Box::pin(async move {
                Ok(pipeline::forward(State(state), request)
                    .await
                    .into_response())
            })
        } else {
            Box::pin(tower::Service::call(&mut self.router, request))
        }
    }
}

/// The whole per-request stack, in its order. The access log is outermost
/// so every answer — a caught panic's 500 included — gets exactly one log
/// line and a request id; the panic net sits right inside it, around
/// everything that could panic.
pub(crate) fn service(state: Arc<AppState>) -> AccessLog<CatchPanic<Routes>> {
    // Usage records carry the request id the client and the log line see.
    let share_ids = state.accounts.is_some();
    AccessLog::new(CatchPanic(app(state))).sharing_ids(share_ids)
}

/// Serves `listener` with `config` until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish for up to
/// `config.shutdown_timeout`.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: config::Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let Some(settings) = config.accounting.clone() else {
        let state = AppState::new(&config, None);
        let tasks = state.tasks.clone();
        return server::serve(listener, &config, tasks, service(state), shutdown).await;
    };
    let failed = |err: store::StoreError| std::io::Error::other(format!("store: {err}"));
    let store = store::Store::open(settings.store_url.expose())
        .await
        .map_err(failed)?;
    let keys = auth::Keys::load(&store).await.map_err(failed)?;
    keys.load_spend(&store).await.map_err(failed)?;
    tracing::info!(
        store = store.backend(),
        keys = keys.all().len(),
        required = settings.keys_required,
        "keys and usage store ready"
    );
    let shared = match &settings.redis {
        Some(redis) => {
            let on_unavailable = match redis.on_unavailable {
                config::OnUnavailable::Local => limits::shared::OnUnavailable::Local,
                config::OnUnavailable::Closed => limits::shared::OnUnavailable::Closed,
            };
            let shared = limits::shared::SharedLimits::new(
                redis.url.expose(),
                redis.prefix.clone(),
                on_unavailable,
            )
            .map_err(|err| std::io::Error::other(format!("redis.url: {err}")))?;
            let shared = Arc::new(shared);
            // Connected (or known down, and said so) before the first request.
            shared.probe().await;
            Some(shared)
        }
        None => None,
    };
    let (sink, writer) = usage::Writer::start(store.clone(), settings.flush_interval);
    let refresh = settings.refresh;
    let state = AppState::new(
        &config,
        Some(state::Accounts {
            store: store.clone(),
            keys,
            sink,
            models: state::Accounts::model_limits(&settings),
            settings,
            shared: shared.clone(),
        }),
    );
    #[expect(
        clippy::disallowed_methods,
        reason = "the Redis probe runs until the server is done and is aborted then"
    )]
    let watcher = shared.map(|shared| tokio::spawn(shared.watch()));
    let refresher = {
        let state = Arc::clone(&state);
        #[expect(
            clippy::disallowed_methods,
            reason = "the refresh loop runs until the server is done and is aborted then; the drain must not wait for it"
        )]
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Some(accounts) = &state.accounts
                    && let Err(err) = accounts.keys.refresh(&accounts.store).await
                {
                    tracing::warn!(%err, "reading key changes from the store failed; keys in memory stay as they were");
                }
            }
        })
    };
    let tasks = state.tasks.clone();
    let served = server::serve(listener, &config, tasks, service(state), shutdown).await;
    refresher.abort();
    let _ = refresher.await;
    if let Some(watcher) = watcher {
        watcher.abort();
        let _ = watcher.await;
    }
    // Every request's meter holds a sender: once the last is gone, the
    // writer stores what is left and ends.
    writer.finish(std::time::Duration::from_secs(10)).await;
    store.close().await;
    served
}

async fn not_found_fallback(request: Request) -> Response {
    not_found(request.method().clone(), request.uri().clone())
        .await
        .into_response()
}

async fn health() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"healthy"}"#,
    )
}

async fn not_found(method: Method, uri: Uri) -> ProxyError {
    ProxyError::NotFound {
        method,
        path: uri.path().to_owned(),
    }
}
