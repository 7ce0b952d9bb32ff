//! The accept loop: connection cap, protocol detection under a timer,
//! HTTP/1.1 and HTTP/2 settings, and the drain on shutdown. Every task it
//! starts is spawned on the state's task tracker, so shutdown waits for all
//! of them (and later background writers join the same tracker).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use tokio_util::task::TaskTracker;

use crate::config::Config;

/// Resolves when `timeout` has passed without the connection starting a
/// request; never, once it has.
///
/// hyper's `header_read_timeout` only starts once it knows the protocol, and
/// telling HTTP/1 from HTTP/2 waits for 24 bytes with no timer: a client that
/// connects and sends nothing (or half the HTTP/2 preface) would hold its
/// connection slot forever. This bounds the time to the first request; after
/// it, hyper's timer (HTTP/1) and keep-alive pings (HTTP/2) take over. A
/// connection that never started a request is also dropped at once on
/// shutdown (the drain has nothing to wait for).
async fn no_request_by(timeout: Duration, seen: &AtomicBool) {
    tokio::time::sleep(timeout).await;
    if seen.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}

/// Resolves once shutdown has begun if the connection has not started a
/// request by then; never otherwise.
async fn idle_at_shutdown(stopping: &mut tokio::sync::watch::Receiver<bool>, seen: &AtomicBool) {
    if stopping.wait_for(|stopping| *stopping).await.is_err() || seen.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}

/// The per-connection service: notes that a request has started, then
/// hands it to the shared service.
#[derive(Clone)]
struct FirstRequest<S> {
    inner: S,
    seen: Arc<AtomicBool>,
}

impl<S, R> hyper::service::Service<R> for FirstRequest<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.seen.store(true, Ordering::Relaxed);
        self.inner.call(request)
    }
}

/// Binds a listener with a backlog deep enough for connection bursts (the
/// kernel caps it at `net.core.somaxconn`); tokio's default is 1024. An
/// error names the address and `role` (`llmproxy`, `the mock upstream`), so
/// "address already in use" says which server could not start, and where.
pub fn bind(addr: std::net::SocketAddr, role: &str) -> std::io::Result<TcpListener> {
    let bound = (|| {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(8192)
    })();
    bound.map_err(|err| {
        std::io::Error::new(err.kind(), format!("{role} cannot listen on {addr}: {err}"))
    })
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// lets in-flight requests finish for up to `config.shutdown_timeout`.
///
/// `service` is the whole per-request stack (`service()` in lib.rs); the
/// server knows nothing of what it does.
pub async fn serve<S, B>(
    listener: TcpListener,
    config: &Config,
    tasks: TaskTracker,
    service: S,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let first_request_timeout = config.limits.header_read_timeout;

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        // Streams beyond this are refused by the client's own h2 stack; the
        // in-flight cap in `pipeline::forward` bounds what all connections hold.
        .max_concurrent_streams(config.limits.max_streams_per_connection)
        .max_pending_accept_reset_streams(Some(64));

    // Connections over the limit are not refused: they wait in the kernel's
    // listen backlog until a permit frees up, which is what a client retrying
    // against a busy server would want.
    let permits = Arc::new(Semaphore::new(config.limits.max_connections));
    let graceful = GracefulShutdown::new();
    // Tells connections that have not started a request to close at once.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
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
        let seen = Arc::new(AtomicBool::new(false));
        let connection = builder
            .serve_connection(
                TokioIo::new(stream),
                FirstRequest {
                    inner: TowerToHyperService::new(service.clone()),
                    seen: Arc::clone(&seen),
                },
            )
            .into_owned();
        let watched = graceful.watch(connection);
        let mut stopping = stopping.clone();
        tasks.spawn(async move {
            tokio::select! {
                served = watched => {
                    if let Err(err) = served {
                        tracing::debug!(%err, "client connection ended with an error");
                    }
                }
                () = no_request_by(first_request_timeout, &seen) => {
                    tracing::debug!(
                        timeout = ?first_request_timeout,
                        "closed a connection that sent no request (limits.header_read_timeout)"
                    );
                }
                // Nothing to drain on a connection that never started a request
                // (silent, or halfway through its first headers).
                () = idle_at_shutdown(&mut stopping, &seen) => {}
            }
            drop(permit);
        });
    }

    drop(listener);
    let _ = stopping_tx.send(true);
    let connections = graceful.count();
    tracing::info!(
        connections,
        deadline = ?config.shutdown_timeout,
        "shutting down: no longer accepting; draining {connections} connection(s) for up to {:?}; \
         press Ctrl-C (or send SIGTERM) again to quit now",
        config.shutdown_timeout
    );
    let drained = async {
        graceful.shutdown().await;
        tasks.close();
        tasks.wait().await;
    };
    match tokio::time::timeout(config.shutdown_timeout, drained).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!("shutdown deadline reached; closing the remaining connections"),
    }
    Ok(())
}
