//! Connections to one upstream, kept and reused: HTTP/1.1 connections one
//! exchange at a time, HTTP/2 connections (negotiated by ALPN on `https://`,
//! or spoken with prior knowledge when the upstream sets `http2: true`)
//! shared by many streams, a new one opened when every open one is full.
//!
//! Why not hyper-util's pooled client: per request it checks a connection
//! out of a locked map keyed by scheme and host, rebuilds the URI in origin
//! form, and for HTTP/1 spawns a task (with a oneshot) that waits for the
//! connection to go idle and puts it back. Here each upstream has its own
//! pool (no key to build or hash), the URI is built once in the form the
//! connection speaks, and an HTTP/1 connection goes back into the pool from
//! the answer's body the moment it ends, with no task. On HTTP/2 many
//! streams share one connection, so thousands of held streams cost one
//! socket and one pair of buffers instead of one each.
//!
//! A connection's own task (hyper's dispatcher) lives as long as its sender:
//! dropping the last sender, or the upstream closing the socket, ends it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::UpstreamBody;
use super::client::TimedConnect;

/// The connector every pool dials with: DNS, TCP, TLS, under one timeout.
pub type Connector = TimedConnect<HttpsConnector<HttpConnector>>;

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// How long an unused connection is kept. Below the usual 120 s of provider
/// load balancers, so we close first and never send on a socket they are
/// about to close.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an exchange produced no answer head.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (DNS, TCP, TLS, or the connect timeout).
    Connect(super::client::BoxError),
    /// The connection failed, or the request body did, before the head.
    Http(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(_) => f.write_str("connect error"),
            Self::Http(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(err) => Some(err.as_ref()),
            Self::Http(err) => err.source(),
        }
    }
}

/// An HTTP/1.1 connection waiting for its next exchange.
struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// An HTTP/2 connection and the streams open on it now.
struct Shared {
    sender: http2::SendRequest<UpstreamBody>,
    streams: Arc<AtomicUsize>,
}

/// Streams assumed allowed per HTTP/2 connection until the upstream's
/// settings say otherwise (RFC 9113 §6.5.2 recommends at least 100).
const INITIAL_STREAMS: usize = 100;

/// One upstream's connections.
pub struct Pool {
    connector: Connector,
    /// `scheme://authority`: what the connector dials.
    destination: http::Uri,
    /// Cleartext HTTP/2 with prior knowledge (`http2: true`).
    prior_knowledge: bool,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    idle: Mutex<Vec<Idle>>,
    shared: Mutex<Vec<Shared>>,
    /// The most streams the upstream allows on one HTTP/2 connection (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`), copied by each connection every
    /// time it takes a request (hyper exposes it only there). One value for
    /// the pool: a new connection starts with what the others learnt, and
    /// until a lower limit is learnt, streams over it wait in hyper's queue
    /// for a free slot rather than fail.
    stream_limit: Arc<AtomicUsize>,
    /// The upstream answered ALPN with `h2` (or `prior_knowledge`).
    negotiated_h2: AtomicBool,
    /// Held while an HTTP/2 connection is being opened.
    connecting: tokio::sync::Mutex<()>,
}

/// What a sent request holds until its answer's body ends: the HTTP/1
/// connection to give back, or the HTTP/2 stream slot to free.
pub struct Lease {
    inner: LeaseInner,
}

enum LeaseInner {
    H1 {
        pool: Arc<Pool>,
        sender: Option<http1::SendRequest<UpstreamBody>>,
    },
    H2(Arc<AtomicUsize>),
}

impl Lease {
    /// The answer's body ended cleanly: the HTTP/1 connection can carry the
    /// next exchange. A lease dropped without this (the client left, the
    /// body failed) takes its connection with it, so an unfinished answer
    /// can never be read by the next request.
    pub fn release(&mut self) {
        if let LeaseInner::H1 { pool, sender } = &mut self.inner
            && let Some(sender) = sender.take()
            && !sender.is_closed()
        {
            pool.lock_idle().push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let LeaseInner::H2(streams) = &self.inner {
            streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Pool {
    /// A pool for the upstream at `destination` (`scheme://authority`).
    pub fn new(connector: Connector, destination: http::Uri, prior_knowledge: bool) -> Self {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false);
        Self {
            connector,
            destination,
            prior_knowledge,
            h1: http1::Builder::new(),
            h2,
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(Vec::new()),
            stream_limit: Arc::new(AtomicUsize::new(INITIAL_STREAMS)),
            negotiated_h2: AtomicBool::new(false),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    // A panic while a lock is held cannot leave these lists half-changed
    // (each change is one push or pop), so a poisoned lock is still usable.
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_shared(&self) -> std::sync::MutexGuard<'_, Vec<Shared>> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` (its URI in origin form, as HTTP/1.1 writes it) and
    /// waits for the answer's head.
    pub async fn send(
        self: &Arc<Self>,
        mut request: http::Request<UpstreamBody>,
    ) -> Result<(http::Response<Incoming>, Lease), SendError> {
        if let Some(lease) = self.shared_stream() {
            return self.send_h2(lease, request).await;
        }
        // An idle HTTP/1 connection may have been closed by the upstream in
        // the instant before we wrote to it; a request that was never sent
        // is tried again, on the next idle connection or a new one.
        while let Some(mut sender) = self.checkout().await {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.h1_lease(sender))),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Http(failed.into_error())),
                },
            }
        }
        // HTTP/2 connections are opened one at a time: requests that find
        // every connection full while one is being opened wait for it and
        // take its free slots, instead of each opening its own.
        let connecting = if self.prior_knowledge || self.negotiated_h2.load(Ordering::Relaxed) {
            let guard = self.connecting.lock().await;
            if let Some(lease) = self.shared_stream() {
                drop(guard);
                return self.send_h2(lease, request).await;
            }
            Some(guard)
        } else {
            None
        };
        // Boxed: connecting (a TLS session, handshakes) is a large future,
        // and every request's future would otherwise carry its size — and
        // copy it when the pipeline's future is boxed — to use it rarely.
        match Box::pin(self.connect()).await? {
            Connected::H1(mut sender) => {
                drop(connecting);
                match sender.send_request(request).await {
                    Ok(response) => Ok((response, self.h1_lease(sender))),
                    Err(err) => Err(SendError::Http(err)),
                }
            }
            Connected::H2(lease) => {
                drop(connecting);
                self.send_h2(lease, request).await
            }
        }
    }

    fn h1_lease(self: &Arc<Self>, sender: http1::SendRequest<UpstreamBody>) -> Lease {
        Lease {
            inner: LeaseInner::H1 {
                pool: Arc::clone(self),
                sender: Some(sender),
            },
        }
    }

    async fn send_h2(
        &self,
        (mut sender, streams): (http2::SendRequest<UpstreamBody>, Arc<AtomicUsize>),
        mut request: http::Request<UpstreamBody>,
    ) -> Result<(http::Response<Incoming>, Lease), SendError> {
        // The slot is counted from here, so a failed send frees it too.
        let lease = Lease {
            inner: LeaseInner::H2(streams),
        };
        // HTTP/2 carries the target as `:scheme`, `:authority` and `:path`,
        // and `:authority` replaces `Host` (RFC 9113 §8.3.1).
        let mut target = http::uri::Parts::default();
        target.scheme = self.destination.scheme().cloned();
        target.authority = self.destination.authority().cloned();
        target.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = http::Uri::from_parts(target) {
            *request.uri_mut() = uri;
        }
        request.headers_mut().remove(http::header::HOST);
        match sender.send_request(request).await {
            Ok(response) => Ok((response, lease)),
            Err(err) => Err(SendError::Http(err)),
        }
    }

    /// A stream slot on an open HTTP/2 connection with room for one more.
    fn shared_stream(&self) -> Option<(http2::SendRequest<UpstreamBody>, Arc<AtomicUsize>)> {
        let mut shared = self.lock_shared();
        if shared.is_empty() {
            return None;
        }
        shared.retain(|conn| !conn.sender.is_closed());
        let limit = self.stream_limit.load(Ordering::Relaxed);
        shared.iter().find_map(|conn| {
            let open = conn.streams.load(Ordering::Relaxed);
            (open < limit).then(|| {
                conn.streams.fetch_add(1, Ordering::Relaxed);
                (conn.sender.clone(), Arc::clone(&conn.streams))
            })
        })
    }

    /// The most recently used idle HTTP/1 connection that is still open and
    /// young enough; older or closed ones are dropped on the way (which
    /// ends their tasks).
    async fn checkout(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        loop {
            let idle = self.lock_idle().pop()?;
            if idle.sender.is_closed() || idle.since.elapsed() >= IDLE_TIMEOUT {
                continue;
            }
            let mut sender = idle.sender;
            // Given back the moment its last answer ended, a connection may
            // not have polled for its next request yet; it does so at once.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<Connected, SendError> {
        let io: Io = tower::ServiceExt::oneshot(self.connector.clone(), self.destination.clone())
            .await
            .map_err(SendError::Connect)?;
        if self.prior_knowledge || io.connected().is_negotiated_h2() {
            self.negotiated_h2.store(true, Ordering::Relaxed);
            // Until its own settings arrive, a new connection reports (and
            // keeps to) what the others learnt.
            let mut h2 = self.h2.clone();
            h2.initial_max_send_streams(self.stream_limit.load(Ordering::Relaxed));
            let (sender, connection) = h2.handshake(io).await.map_err(SendError::Http)?;
            let limit = Arc::clone(&self.stream_limit);
            spawn_connection(async move {
                let mut connection = std::pin::pin!(connection);
                std::future::poll_fn(|cx| {
                    let polled = connection.as_mut().poll(cx);
                    limit.store(connection.current_max_send_streams(), Ordering::Relaxed);
                    polled
                })
                .await
            });
            let streams = Arc::new(AtomicUsize::new(1));
            self.lock_shared().push(Shared {
                sender: sender.clone(),
                streams: Arc::clone(&streams),
            });
            return Ok(Connected::H2((sender, streams)));
        }
        let (sender, connection) = self.h1.handshake(io).await.map_err(SendError::Http)?;
        spawn_connection(connection);
        Ok(Connected::H1(sender))
    }
}

enum Connected {
    H1(http1::SendRequest<UpstreamBody>),
    H2((http2::SendRequest<UpstreamBody>, Arc<AtomicUsize>)),
}

#[expect(
    clippy::disallowed_methods,
    reason = "a pooled connection's task holds no work shutdown must wait for: each exchange \
              on it is awaited by its request, which the task tracker waits for, and an idle \
              connection would only hold the drain until its idle timeout"
)]
fn spawn_connection<F>(connection: F)
where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "upstream connection ended with an error");
        }
    });
}
