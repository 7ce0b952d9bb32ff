//! The pooled upstream client and the mapping of its failures to [`ProxyError`].
//!
//! One hyper-util client serves every request: connections are pooled and
//! reused, `https://` goes through rustls (ALPN offers HTTP/2 and HTTP/1.1),
//! and TCP_NODELAY is set so a streamed chunk is never held back by Nagle.
//! `timeouts.connect` bounds the whole connection set-up, TLS handshake
//! included ([`TimedConnect`]).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Timeouts;
use crate::error::ProxyError;

/// A request body on its way upstream: the client's (streamed, or buffered
/// when routing had to read it), bounded by `limits.body_read_timeout`.
pub type RequestBody = crate::stream::Deadline<axum::body::Body>;

/// The request body sent upstream, also capped at the body limit.
pub type UpstreamBody = Limited<RequestBody>;

/// The pooled HTTP(S) client.
pub type UpstreamClient = Client<TimedConnect<HttpsConnector<HttpConnector>>, UpstreamBody>;

/// Boxed error of the connector.
type BoxError = Box<dyn StdError + Send + Sync>;

/// A connector whose whole connect — DNS, TCP and the TLS handshake — must
/// finish within `timeout`. hyper-util's own connect timeout covers TCP
/// only, so an https upstream that accepts and never answers the handshake
/// would otherwise hang until the response-headers timeout.
#[derive(Clone)]
pub struct TimedConnect<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower::Service<http::Uri> for TimedConnect<C>
where
    C: tower::Service<http::Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    // One box per new connection, not per request: pooled connections skip this.
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect (TCP and TLS handshake) timed out",
                )) as BoxError),
            }
        })
    }
}

/// How long an unused pooled connection is kept. Below the usual 120 s of
/// provider load balancers, so we close first and never send on a dead socket.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Builds the client. Trust roots come from the system store (so private
/// CAs work), falling back to the bundled Mozilla roots when it is empty.
pub fn client(timeouts: &Timeouts) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.connect));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let tls = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
        Ok(builder) => builder,
        Err(err) => {
            tracing::debug!(%err, "no system trust roots; using the bundled Mozilla roots");
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots()
        }
    };
    let connector = TimedConnect {
        inner: tls
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http),
        timeout: timeouts.connect,
    };

    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}

/// Names a failed upstream exchange (no response headers received).
///
/// The message is built from the error chain, which holds no header values:
/// keys cannot leak through it.
pub fn classify(
    err: &hyper_util::client::legacy::Error,
    timeouts: &Timeouts,
    limit: u64,
) -> ProxyError {
    if find::<LengthLimitError>(err).is_some() {
        return ProxyError::BodyTooLarge { limit };
    }
    if let Some(timed_out) = find::<crate::stream::BodyTimedOut>(err) {
        return ProxyError::RequestBodyTimeout(timed_out.0);
    }
    if err.is_connect() {
        if find::<std::io::Error>(err).is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return ProxyError::ConnectTimeout(timeouts.connect);
        }
        return ProxyError::UpstreamUnreachable(chain(err));
    }
    if let Some(hyper_err) = find::<hyper::Error>(err) {
        if hyper_err.is_user() {
            // The client's own request body failed (it disconnected mid-upload).
            return ProxyError::BadRequest(format!(
                "reading the request body failed: {}",
                chain(err)
            ));
        }
        if hyper_err.is_parse() {
            return ProxyError::UpstreamProtocol(chain(err));
        }
    }
    ProxyError::UpstreamUnreachable(chain(err))
}

/// The first error of type `E` in the source chain.
fn find<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The whole source chain as one line: `a: b: c`.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let part = e.to_string();
        // hyper-util repeats its cause in its own message; keep the line short.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = e.source();
    }
    text
}
