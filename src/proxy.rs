//! The forward path: one client request becomes one upstream request, and
//! the upstream's answer streams back unchanged.
//!
//! The phases, in order:
//! 1. **request filter** — refuse a declared body over the limit (413) before
//!    any upstream work;
//! 2. **pick upstream** — join the configured base URL with the request path;
//! 3. **upstream request filter** — apply the header policy (`headers.rs`);
//!    the body is streamed through a byte limit, never buffered;
//! 4. **send** — on the pooled client, bounded by `timeouts.response_headers`;
//!    failures before response headers become OpenAI-shaped errors
//!    (502/504/413); an upstream error *answer* is forwarded as it is;
//! 5. **response filter** — drop hop-by-hop headers;
//! 6. **body** — the upstream body, wrapped only in the idle timeout; chunks
//!    go to the client as they arrive, and a failure aborts the response.
//!
//! Logging happens once per request in `access_log.rs`, not here: a failure
//! reaches the log line through the response (`error::Failure`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{Version, header};
use http_body_util::Limited;
use tokio::time::Instant;

use crate::access_log::UpstreamInfo;
use crate::config::Upstream;
use crate::error::ProxyError;
use crate::headers;
use crate::stream::IdleTimeout;
use crate::upstream::{self, UpstreamClient};

/// What the forward path needs, shared by every request.
pub struct Proxy {
    /// The configured upstream.
    pub upstream: Upstream,
    /// The pooled client.
    pub client: UpstreamClient,
    /// Largest request body, in bytes.
    pub max_body_size: u64,
}

/// Forwards one `/v1/*` request.
pub async fn forward(
    State(proxy): State<Arc<Proxy>>,
    request: Request,
) -> Result<Response, ProxyError> {
    let (mut parts, body) = request.into_parts();

    // A body that announces itself as too large is refused before any upstream work.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > proxy.max_body_size) {
        return Err(ProxyError::BodyTooLarge {
            limit: proxy.max_body_size,
        });
    }

    let uri = proxy
        .upstream
        .base_url
        .join(&parts.uri)
        .map_err(|e| ProxyError::BadRequest(format!("cannot forward this path: {e}")))?;

    headers::to_upstream_request(
        &mut parts.headers,
        &proxy.upstream.host,
        &proxy.upstream.default_headers,
    );
    parts.uri = uri;
    // The client picks HTTP/1.1 or HTTP/2 per connection (ALPN); the version
    // the client spoke to us says nothing about the upstream.
    parts.version = Version::HTTP_11;
    let upstream_request = http::Request::from_parts(
        parts,
        Limited::new(
            body,
            usize::try_from(proxy.max_body_size).unwrap_or(usize::MAX),
        ),
    );

    let timeouts = &proxy.upstream.timeouts;
    let sent_at = Instant::now();
    let response = match tokio::time::timeout(
        timeouts.response_headers,
        proxy.client.request(upstream_request),
    )
    .await
    {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => return Err(upstream::classify(&err, timeouts, proxy.max_body_size)),
        Err(_) => return Err(ProxyError::UpstreamTimeout(timeouts.response_headers)),
    };
    let headers_after = sent_at.elapsed();

    let (mut parts, body) = response.into_parts();
    headers::to_client_response(&mut parts.headers);
    // hyper writes the status line for the client's own protocol; an HTTP/2
    // version from the upstream would only trigger a warning.
    parts.version = Version::HTTP_11;
    parts.extensions.insert(UpstreamInfo {
        status: parts.status,
        headers_after,
    });
    Ok(Response::from_parts(
        parts,
        Body::new(IdleTimeout::new(body, timeouts.idle)),
    ))
}
