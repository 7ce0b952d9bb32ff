//! One attempt: one request sent to one upstream, its answer's head
//! awaited within the timeouts, and its body wrapped to stream back.
//!
//! An attempt knows nothing of routing: the caller says which target, with
//! which timeouts, and hands over whatever must stay held while the answer
//! streams (the request's in-flight permit, a deployment's concurrency
//! slot). Failures before the response head become [`ProxyError`]s naming
//! the upstream; an upstream's own error answer is an `Ok` response, passed
//! on untouched.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::Version;
use http_body_util::Limited;
use tokio::time::Instant;

use crate::config::Timeouts;
use crate::error::ProxyError;
use crate::headers;
use crate::stream::{Deadline, Hold, IdleTimeout, Observed};
use crate::telemetry::UpstreamInfo;
use crate::upstream::{RequestBody, Target, classify, providers};

/// What one attempt ends with: the upstream's answer (any status), or why
/// there is none.
pub type Outcome = Result<Response, ProxyError>;

/// A buffered body (routed requests), in the type the upstream client sends.
pub fn buffered(bytes: Bytes) -> RequestBody {
    // Already complete: the deadline never arms.
    Deadline::new(Body::from(bytes), Duration::MAX)
}

/// Sends the request to `target` and streams the answer back; `held` stays
/// alive until the answer's body ends (or is dropped).
pub async fn send<H: Send + Sync + 'static>(
    max_body_size: u64,
    target: &Target,
    timeouts: Timeouts,
    mut parts: http::request::Parts,
    body: RequestBody,
    held: H,
) -> Outcome {
    let upstream = &target.upstream;
    // A provider other than OpenAI gets its own request, and its answer is
    // translated back below; pass-through never enters `providers`.
    let (body, translating) = match &upstream.provider {
        // One comparison on the pass-through path: the Messages front door.
        crate::config::Provider::OpenAi if !parts.uri.path().starts_with("/v1/messages") => {
            (body, None)
        }
        provider => {
            match providers::prepare(provider, &upstream.name, &mut parts, body, max_body_size)
                .await?
            {
                providers::Prepared::Send(body, pending) => (body, pending),
                providers::Prepared::Answered(response) => return Ok(response),
            }
        }
    };
    let path = upstream
        .base_url
        .join(&parts.uri)
        .map_err(|e| ProxyError::BadRequest(format!("cannot forward this path: {e}")))?;

    headers::to_upstream_request(
        &mut parts.headers,
        &upstream.host,
        &upstream.default_headers,
    );
    // Origin form for HTTP/1.1; the pool makes the absolute form if the
    // connection turns out to be HTTP/2.
    parts.uri = http::Uri::from(path);
    // The pool picks HTTP/1.1 or HTTP/2 per connection; the version the
    // client spoke to us says nothing about the upstream.
    parts.version = Version::HTTP_11;
    let upstream_request = http::Request::from_parts(
        parts,
        Limited::new(body, usize::try_from(max_body_size).unwrap_or(usize::MAX)),
    );

    // The headers wait is also bounded by what is left of the total.
    let headers_wait = timeouts.total.map_or(timeouts.response_headers, |t| {
        t.min(timeouts.response_headers)
    });
    let sent_at = Instant::now();
    let sending = target.pool.send(upstream_request);
    let (response, lease) = match tokio::time::timeout(headers_wait, sending).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            return Err(classify(&err, &timeouts, max_body_size).at_upstream(&target.label));
        }
        Err(_) => {
            return Err(ProxyError::UpstreamTimeout(headers_wait).at_upstream(&target.label));
        }
    };
    let headers_after = sent_at.elapsed();
    // No upgrade was asked for (`Upgrade` never crosses), so a 101 is a
    // broken upstream; forwarding it would leave the client on a dead socket.
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProxyError::UpstreamProtocol(
            "answered 101 Switching Protocols to a request that asked for no upgrade".into(),
        )
        .at_upstream(&target.label));
    }

    let (mut parts, body) = response.into_parts();
    headers::to_client_response(&mut parts.headers);
    // hyper writes the status line for the client's own protocol; an HTTP/2
    // version from the upstream would only trigger a warning.
    parts.version = Version::HTTP_11;
    parts.extensions.insert(UpstreamInfo {
        status: parts.status,
        headers_after,
    });
    let body = IdleTimeout::new(body, timeouts.idle).with_total(sent_at, timeouts.total);
    let response = Response::from_parts(
        parts,
        // Held until the body ends: an HTTP/2 stream's slot, the caller's permits.
        Body::new(Observed::new(body, Hold((lease, held)))),
    );
    Ok(match translating {
        None => response,
        Some(pending) => providers::answer(pending, response).await,
    })
}
