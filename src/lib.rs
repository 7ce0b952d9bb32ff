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

pub(crate) mod admin;
pub(crate) mod catch_panic;
pub mod config;
pub(crate) mod error;
pub(crate) mod headers;
pub(crate) mod ingress;
pub mod mock;
pub(crate) mod pipeline;
pub(crate) mod routing;
pub(crate) mod server;
pub(crate) mod state;
pub(crate) mod stream;
pub mod telemetry;
pub(crate) mod upstream;
pub(crate) mod wire;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
        .route("/admin/status", get(admin_status).fallback(not_found))
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
    AccessLog::new(CatchPanic(app(state)))
}

/// Serves `listener` with `config` until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish for up to
/// `config.shutdown_timeout`.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: config::Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let state = AppState::new(&config);
    let tasks = state.tasks.clone();
    server::serve(listener, &config, tasks, service(state), shutdown).await
}

async fn not_found_fallback(request: Request) -> Response {
    not_found(request.method().clone(), request.uri().clone())
        .await
        .into_response()
}

async fn admin_status(State(state): State<Arc<AppState>>, headers: http::HeaderMap) -> Response {
    admin::status(
        state.admin.as_ref(),
        &state.upstreams,
        state.router.as_ref(),
        &headers,
    )
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
