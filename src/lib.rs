//! llmproxy: an OpenAI-compatible LLM gateway.
//!
//! Where a request goes, from socket to socket:
//! - [`run`] accepts a connection (bounded by `limits.max_connections`,
//!   with a header read timeout against slowloris) and serves it with hyper;
//! - [`access_log::AccessLog`] gives the request its id, will add
//!   `Server-Timing`, and logs it once the response is over;
//! - [`app`] routes it: `GET /` is the health check, `/v1/*` goes to
//!   [`proxy::forward`], anything else is a 404 in the OpenAI error shape;
//! - [`proxy::forward`] sends it upstream and streams the answer back.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod access_log;
pub mod admin;
pub mod config;
pub mod error;
pub mod headers;
pub mod log_writer;
pub mod mock;
pub mod proxy;
pub mod router;
pub mod stream;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{Method, Uri, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::error::ProxyError;
use crate::proxy::Proxy;

/// The router: health check, `/v1/*` forwarding, OpenAI-shaped 404 elsewhere.
///
/// `/v1/*` is matched by prefix in the fallback rather than by a `{*path}`
/// route: a wildcard capture costs four allocations per request, and the
/// forward path reads the raw URI anyway.
pub fn app(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/", get(health).fallback(not_found))
        .route("/admin/status", get(admin::status).fallback(not_found))
        .fallback(v1_or_not_found)
        .with_state(proxy)
}

async fn v1_or_not_found(state: State<Arc<Proxy>>, request: Request) -> Response {
    if request.uri().path().starts_with("/v1/") {
        proxy::forward(state, request).await.into_response()
    } else {
        not_found(request.method().clone(), request.uri().clone())
            .await
            .into_response()
    }
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

/// Builds the shared forwarding state from a validated config.
pub fn proxy_state(config: &Config) -> Arc<Proxy> {
    let targets = config
        .upstreams
        .iter()
        .map(|upstream| proxy::Target {
            client: upstream::client(&upstream.timeouts),
            // Names are checked to be header-safe when the config is loaded.
            name_header: http::HeaderValue::from_str(&upstream.name)
                .unwrap_or(http::HeaderValue::from_static("upstream")),
            upstream: upstream.clone(),
        })
        .collect();
    Arc::new(Proxy {
        targets,
        router: router::ModelRouter::new(
            &config.models,
            &config
                .upstreams
                .iter()
                .map(|u| u.max_concurrent)
                .collect::<Vec<_>>(),
        ),
        max_body_size: config.limits.max_body_size,
        admin_token: config.admin_token.clone(),
    })
}

/// Binds a listener with a backlog deep enough for connection bursts (the
/// kernel caps it at `net.core.somaxconn`); tokio's default is 1024.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// lets in-flight requests finish for up to `config.shutdown_timeout`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let service = AccessLog::new(app(proxy_state(&config)));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));

    // Connections over the limit are not refused: they wait in the kernel's
    // listen backlog until a permit frees up, which is what a client retrying
    // against a busy server would want.
    let permits = Arc::new(Semaphore::new(config.limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %config.describe(),
        "llmproxy serving"
    );
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of
                    // spinning, and keep serving the connections we have.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
        let connection = builder
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = watched.await {
                tracing::debug!(%err, "client connection ended with an error");
            }
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        deadline = ?config.shutdown_timeout,
        "shutting down: no longer accepting, draining in-flight requests"
    );
    match tokio::time::timeout(config.shutdown_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!("shutdown deadline reached; closing the remaining connections"),
    }
    Ok(())
}
