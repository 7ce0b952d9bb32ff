//! Connections to one upstream, kept and reused: HTTP/1.1 connections one
//! exchange at a time ([`super::h1`], driven by the request's own task),
//! HTTP/2 connections (negotiated by ALPN on `https://`, or spoken with
//! prior knowledge when the upstream sets `http2: true`; hyper's client)
//! shared by many streams, a new one opened when every open one is full.
//!
//! Why not hyper-util's pooled client: per request it checks a connection
//! out of a locked map keyed by scheme and host, rebuilds the URI in origin
//! form, and for HTTP/1 spawns a task (with a oneshot) that waits for the
//! connection to go idle and puts it back. Here each upstream has its own
//! pool (no key to build or hash), the URI is built once in the form the
//! connection speaks, and an HTTP/1 connection goes back into the pool from
//! the answer's body the moment it ends. On HTTP/2 many streams share one
//! connection, so thousands of held streams cost one socket and one pair of
//! buffers instead of one each.
//!
//! An idle HTTP/1 connection has no task: the pool holds it, and checks it
//! is still open (without waiting) when it takes it out. An HTTP/2
//! connection's task (hyper's) lives as long as its senders.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::UpstreamBody;
use super::client::{BoxError, TimedConnect};
use super::h1::{self, H1Error};

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
    Connect(BoxError),
    /// An HTTP/1.1 exchange failed before the head.
    H1(H1Error),
    /// An HTTP/2 exchange failed, or its request body did, before the head.
    H2(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(_) => f.write_str("connect error"),
            Self::H1(err) => err.fmt(f),
            Self::H2(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(err) => Some(err.as_ref()),
            Self::H1(err) => err.source(),
            Self::H2(err) => err.source(),
        }
    }
}

/// An HTTP/1.1 connection waiting for its next exchange.
struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// An upstream answer's body, from either protocol.
pub enum ResponseBody {
    /// Read from the socket by the body itself.
    H1(h1::ResponseBody),
    /// hyper's HTTP/2 stream.
    H2(Incoming),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both are Unpin, so the enum is too.
        match self.get_mut() {
            Self::H1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(body) => body.is_end_stream(),
            Self::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(body) => body.size_hint(),
            Self::H2(body) => body.size_hint(),
        }
    }
}

/// An upstream answer.
pub type Answer = http::Response<ResponseBody>;

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

/// What an HTTP/2 stream holds until its answer's body ends: its slot on
/// the connection. (An HTTP/1 answer's body holds its connection itself.)
pub struct Lease(Option<Arc<AtomicUsize>>);

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(streams) = &self.0 {
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
        request: http::Request<UpstreamBody>,
    ) -> Result<(Answer, Lease), SendError> {
        if let Some(lease) = self.shared_stream() {
            return self.send_h2(lease, request).await;
        }
        if let Some(conn) = self.checkout() {
            return match conn.send(request, self).await {
                Ok(answer) => Ok((answer.map(ResponseBody::H1), Lease(None))),
                // The upstream closed this idle connection as we wrote to
                // it: the same bytes go out again on a fresh one.
                Err(h1::Failed {
                    replay: Some(replay),
                    ..
                }) => match Box::pin(self.connect()).await? {
                    Connected::H1(fresh) => fresh
                        .resend(replay, self)
                        .await
                        .map(|answer| (answer.map(ResponseBody::H1), Lease(None)))
                        .map_err(SendError::H1),
                    Connected::H2(_) => Err(SendError::H1(H1Error::Closed(
                        "before sending a response, and the new connection speaks HTTP/2",
                    ))),
                },
                Err(failed) => Err(SendError::H1(failed.error)),
            };
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
            Connected::H1(conn) => {
                drop(connecting);
                match conn.send(request, self).await {
                    Ok(answer) => Ok((answer.map(ResponseBody::H1), Lease(None))),
                    Err(failed) => Err(SendError::H1(failed.error)),
                }
            }
            Connected::H2(lease) => {
                drop(connecting);
                self.send_h2(lease, request).await
            }
        }
    }

    /// Takes back an HTTP/1.1 connection whose answer ended cleanly.
    pub fn put_back(&self, conn: h1::Conn) {
        self.lock_idle().push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    async fn send_h2(
        &self,
        (mut sender, streams): (http2::SendRequest<UpstreamBody>, Arc<AtomicUsize>),
        mut request: http::Request<UpstreamBody>,
    ) -> Result<(Answer, Lease), SendError> {
        // The slot is counted from here, so a failed send frees it too.
        let lease = Lease(Some(streams));
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
            Ok(response) => Ok((response.map(ResponseBody::H2), lease)),
            Err(err) => Err(SendError::H2(err)),
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
    /// young enough; older or closed ones are dropped (closed) on the way.
    fn checkout(&self) -> Option<h1::Conn> {
        loop {
            let mut idle = self.lock_idle().pop()?;
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.conn.is_reusable() {
                return Some(idle.conn);
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
            let (sender, connection) = h2.handshake(io).await.map_err(SendError::H2)?;
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
        Ok(Connected::H1(h1::Conn::new(TokioIo::new(io))))
    }
}

enum Connected {
    H1(h1::Conn),
    H2((http2::SendRequest<UpstreamBody>, Arc<AtomicUsize>)),
}

#[expect(
    clippy::disallowed_methods,
    reason = "an HTTP/2 connection's task holds no work shutdown must wait for: each stream \
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
