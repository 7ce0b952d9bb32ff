//! The upstream connector and the mapping of send failures to [`ProxyError`].
//!
//! `https://` goes through rustls (ALPN offers HTTP/2 and HTTP/1.1), and
//! TCP_NODELAY is set so a streamed chunk is never held back by Nagle.
//! `timeouts.connect` bounds the whole connection set-up, TLS handshake
//! included ([`TimedConnect`]). Connections are kept in [`super::pool`].

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::Timeouts;
use crate::error::ProxyError;
use crate::upstream::h1::H1Error;
use crate::upstream::pool::{Connector, SendError};

/// A request body on its way upstream: the client's (streamed, or buffered
/// when routing had to read it), bounded by `limits.body_read_timeout`.
pub type RequestBody = crate::stream::Deadline<axum::body::Body>;

/// The request body sent upstream, also capped at the body limit.
pub type UpstreamBody = Limited<RequestBody>;

/// Boxed error of the connector.
pub type BoxError = Box<dyn StdError + Send + Sync>;

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

/// Builds the connector. Trust roots come from the system store (so private
/// CAs work), falling back to the bundled Mozilla roots when it is empty.
pub fn connector(timeouts: &Timeouts) -> Connector {
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
    TimedConnect {
        inner: tls
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http),
        timeout: timeouts.connect,
    }
}

/// Names a failed upstream exchange (no response headers received).
///
/// The message is built from the error chain, which holds no header values:
/// keys cannot leak through it.
pub fn classify(err: &SendError, timeouts: &Timeouts, limit: u64) -> ProxyError {
    let hyper_err = match err {
        SendError::Connect(cause) => {
            if find::<std::io::Error>(cause.as_ref())
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                return ProxyError::ConnectTimeout(timeouts.connect);
            }
            return ProxyError::UpstreamUnreachable(chain(err));
        }
        SendError::H1(H1Error::RequestBody(cause)) => {
            return request_body_failed(cause.as_ref(), limit);
        }
        SendError::H1(H1Error::Protocol(_)) => return ProxyError::UpstreamProtocol(chain(err)),
        SendError::H1(_) => return ProxyError::UpstreamUnreachable(chain(err)),
        SendError::H2(hyper_err) => hyper_err,
    };
    if hyper_err.is_user() {
        // The client's own request body failed (too large, too slow, gone).
        return request_body_failed(hyper_err, limit);
    }
    if hyper_err.is_parse() {
        return ProxyError::UpstreamProtocol(chain(hyper_err));
    }
    ProxyError::UpstreamUnreachable(chain(hyper_err))
}

/// The client's request body failed while it was being sent upstream.
fn request_body_failed(cause: &(dyn StdError + 'static), limit: u64) -> ProxyError {
    if find::<LengthLimitError>(cause).is_some() {
        return ProxyError::BodyTooLarge { limit };
    }
    if let Some(timed_out) = find::<crate::stream::BodyTimedOut>(cause) {
        return ProxyError::RequestBodyTimeout(timed_out.0);
    }
    // The client disconnected mid-upload.
    ProxyError::BadRequest(format!("reading the request body failed: {}", chain(cause)))
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
