//! The forward path: one client request becomes one upstream request, and
//! the upstream's answer streams back unchanged.
//!
//! The phases, in order:
//! 1. **request filter** — refuse a declared body over the limit (413) before
//!    any upstream work;
//! 2. **pick upstream** — with no `models` configured, the one upstream and
//!    the body streamed as it comes (never buffered). With `models`, a JSON
//!    body is read (bounded by the body limit) to find `model`; the route
//!    picks a deployment, and only the `model` value is rewritten when the
//!    deployment names it differently — every other byte stays as sent;
//! 3. **upstream request filter** — join the base URL, apply the header
//!    policy (`headers.rs`);
//! 4. **send** — on the upstream's pooled client, bounded by
//!    `timeouts.response_headers`; failures before response headers become
//!    OpenAI-shaped errors (502/504/413); an upstream error *answer* is
//!    forwarded as it is;
//! 5. **response filter** — drop hop-by-hop headers; when routing, name the
//!    upstream that answered (`x-llmproxy-upstream`, `x-llmproxy-attempts`);
//! 6. **body** — the upstream body, wrapped only in the idle timeout (and the
//!    deployment's in-flight count when routed); chunks go to the client as
//!    they arrive, and a failure aborts the response.
//!
//! Logging happens once per request in `access_log.rs`, not here: a failure
//! reaches the log line through the response (`error::Failure`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::access_log::UpstreamInfo;
use crate::config::Upstream;
use crate::error::ProxyError;
use crate::headers;
use crate::router::{DeploymentState, InFlight, ModelRouter, Route, Unavailable};
use crate::stream::{Holding, IdleTimeout};
use crate::upstream::{self, UpstreamClient};

/// One upstream with its own pooled client (timeouts differ per upstream).
pub struct Target {
    /// The configured upstream.
    pub upstream: Upstream,
    /// The pooled client.
    pub client: UpstreamClient,
    /// `x-llmproxy-upstream` for its answers, made once.
    pub name_header: HeaderValue,
}

/// What the forward path needs, shared by every request.
pub struct Proxy {
    /// The upstreams; the first serves requests no model route claims.
    pub targets: Vec<Target>,
    /// Model routing, when `models` is configured.
    pub router: Option<ModelRouter>,
    /// Largest request body, in bytes.
    pub max_body_size: u64,
    /// Guards `GET /admin/status`; `None` turns it off.
    pub admin_token: Option<crate::headers::Secret>,
}

/// The response header naming the upstream that answered.
pub const UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-llmproxy-upstream");
/// The response header counting the attempts made.
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-llmproxy-attempts");

/// Forwards one `/v1/*` request.
pub async fn forward(
    State(proxy): State<Arc<Proxy>>,
    request: Request,
) -> Result<Response, ProxyError> {
    let (parts, body) = request.into_parts();

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

    match &proxy.router {
        None => send(&proxy, 0, parts, body, None, 1).await,
        // Boxed so the single-upstream future stays as small as before routing
        // existed: its size is measurable on every request (bench/HISTORY.md).
        Some(router) => Box::pin(route(&proxy, router, parts, body)).await,
    }
}

/// Picks the upstream by the request's `model` and sends it there.
async fn route(
    proxy: &Proxy,
    router: &ModelRouter,
    parts: http::request::Parts,
    body: Body,
) -> Result<Response, ProxyError> {
    if parts.method == Method::GET && parts.uri.path() == "/v1/models" {
        return Ok(list_models(router));
    }
    if parts.method != Method::POST || !is_json(&parts.headers) {
        return send(proxy, 0, parts, body, None, 1).await;
    }

    let limit = usize::try_from(proxy.max_body_size).unwrap_or(usize::MAX);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ProxyError::BodyTooLarge {
                limit: proxy.max_body_size,
            });
        }
        Err(err) => {
            return Err(ProxyError::BadRequest(format!(
                "reading the request body failed: {err}"
            )));
        }
    };
    let Some((model, span)) = requested_model(&bytes)? else {
        return send(proxy, 0, parts, Body::from(bytes), None, 1).await;
    };
    let primary = router
        .resolve(&model)
        .ok_or_else(|| ProxyError::ModelNotFound(model.clone()))?;
    let request = Attempted {
        parts: &parts,
        bytes: &bytes,
        model: &model,
        span,
    };
    let mut attempts = 0u32;
    let (mut result, mut exhausted) = attempt_chain(proxy, primary, &request, &mut attempts).await;
    // Its deployments exhausted, the model hands over to its fallbacks in order.
    let mut fallbacks = primary.fallbacks.iter().filter_map(|&i| router.route(i));
    while exhausted {
        let Some(fallback) = fallbacks.next() else {
            break;
        };
        (result, exhausted) = attempt_chain(proxy, fallback, &request, &mut attempts).await;
    }
    if primary.context_window_fallbacks.is_empty() {
        return result;
    }
    // A request too long for the model's context goes to a bigger one.
    for fallback in primary
        .context_window_fallbacks
        .iter()
        .filter_map(|&i| router.route(i))
    {
        let response = match result {
            Ok(response) if response.status() == http::StatusCode::BAD_REQUEST => response,
            other => return other,
        };
        let (too_long, response) = context_length_exceeded(response).await;
        if !too_long {
            return Ok(response);
        }
        result = attempt_chain(proxy, fallback, &request, &mut attempts)
            .await
            .0;
    }
    result
}

/// What a routed attempt carries into `send`.
struct Routed {
    deployment: Arc<DeploymentState>,
    /// Held until the answer has been streamed.
    in_flight: InFlight,
    timeouts: crate::config::ModelTimeouts,
}

/// The parts of a routed request every attempt is built from.
struct Attempted<'a> {
    parts: &'a http::request::Parts,
    bytes: &'a Bytes,
    /// The model the client asked for, and where it stands in `bytes`.
    model: &'a str,
    span: std::ops::Range<usize>,
}

/// Whether an upstream's 400 says the request exceeds the context window.
/// Error bodies are small; the answer is rebuilt from the bytes read.
async fn context_length_exceeded(response: Response) -> (bool, Response) {
    const ERROR_BODY_LIMIT: usize = 64 * 1024;
    let (parts, body) = response.into_parts();
    match Limited::new(body, ERROR_BODY_LIMIT).collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            let hit = bytes
                .windows(b"context_length_exceeded".len())
                .any(|w| w == b"context_length_exceeded");
            (hit, Response::from_parts(parts, Body::from(bytes)))
        }
        Err(err) => (
            false,
            ProxyError::UpstreamUnreachable(format!("reading the upstream's error failed: {err}"))
                .into_response(),
        ),
    }
}

/// Tries one route's deployments until one answers with something that is
/// not worth retrying, within the route's retry policy. Returns the last
/// result and whether it ended exhausted (still retryable when attempts or
/// the deadline ran out), so the caller can fall back to another model.
///
/// Nothing has reached the client while this runs (a body is only streamed
/// once an answer is kept), so a retry can never duplicate output. A client
/// that leaves drops this future, which ends the chain wherever it is,
/// backoff included.
async fn attempt_chain(
    proxy: &Proxy,
    route: &Route,
    request: &Attempted<'_>,
    attempts: &mut u32,
) -> (Result<Response, ProxyError>, bool) {
    let policy = route.retry;
    let started = Instant::now();
    let mut tried = 0u64;
    let mut attempt = 1u32;
    loop {
        let now = crate::router::now_ms();
        let admitted = match route.pick_available(tried, now) {
            Ok(admitted) => admitted,
            // Nowhere to go: exhausted, so fallbacks get a turn.
            Err(Unavailable::Cooling) => {
                let error = ProxyError::ModelUnavailable {
                    model: route.name.clone(),
                    retry_after: Duration::from_millis(route.retry_after_ms(now)),
                };
                return (Err(error), true);
            }
            Err(Unavailable::AtCapacity) => {
                return (Err(ProxyError::ModelAtCapacity(route.name.clone())), true);
            }
        };
        let (index, in_flight, _probe) = (admitted.index, admitted.in_flight, admitted.probe);
        let deployment = Arc::clone(admitted.deployment);
        tried |= 1u64.checked_shl(index as u32).unwrap_or(0);
        let wanted = route.upstream_model(&deployment, request.model);
        let body = if wanted == request.model {
            request.bytes.clone()
        } else {
            rename_model(request.bytes, request.span.clone(), wanted)
        };
        let mut headers = request.parts.headers.clone();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut builder = http::Request::new(());
        *builder.method_mut() = request.parts.method.clone();
        *builder.uri_mut() = request.parts.uri.clone();
        *builder.headers_mut() = headers;
        let (attempt_parts, ()) = builder.into_parts();
        *attempts += 1;
        let result = send(
            proxy,
            deployment.upstream,
            attempt_parts,
            Body::from(body),
            Some(Routed {
                deployment: Arc::clone(&deployment),
                in_flight,
                timeouts: route.timeouts,
            }),
            *attempts,
        )
        .await;
        let failed = match &result {
            Ok(response) => retryable_status(response.status()),
            Err(err) => err.is_retryable(),
        };
        if failed {
            deployment.record_failure(crate::router::now_ms());
        } else {
            deployment.record_success();
        }

        let untried_left = (tried.count_ones() as usize) < route.deployments.len();
        let wait = match &result {
            Ok(response) if retryable_status(response.status()) => {
                let backoff = backoff(&policy, attempt);
                match retry_after(response.headers()) {
                    // Another deployment is not bound by this one's retry-after.
                    Some(_) if untried_left => Some(backoff),
                    Some(asked) if asked <= policy.retry_after_cap => Some(asked.max(backoff)),
                    Some(_) => None,
                    None => Some(backoff),
                }
            }
            Err(err) if err.is_retryable() => Some(backoff(&policy, attempt)),
            _ => return (result, false),
        };
        match wait {
            Some(wait)
                if attempt < policy.attempts && started.elapsed() + wait < policy.deadline =>
            {
                drop(result);
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            // Retryable, but out of attempts, time, or patience for retry-after.
            _ => return (result, true),
        }
    }
}

/// Upstream answers worth another attempt: rate limits and server trouble.
fn retryable_status(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

/// Exponential backoff with full jitter: a random wait up to
/// `backoff × 2^(attempt−1)`, capped at `max_backoff`.
fn backoff(policy: &crate::config::Retry, attempt: u32) -> Duration {
    let ceiling = policy
        .backoff
        .saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(policy.max_backoff);
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(crate::router::random() % micros.saturating_add(1))
}

/// The wait an upstream asks for: `retry-after-ms`, else `retry-after` in
/// seconds (an HTTP date is not honoured: providers send seconds).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    number("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| number("retry-after").map(Duration::from_secs_f64))
}

/// Sends the request to `proxy.targets[target]` and streams the answer back.
async fn send(
    proxy: &Proxy,
    target: usize,
    mut parts: http::request::Parts,
    body: Body,
    routed: Option<Routed>,
    attempt: u32,
) -> Result<Response, ProxyError> {
    let Some(target) = proxy.targets.get(target) else {
        return Err(ProxyError::UpstreamUnreachable("no such upstream".into()));
    };
    let upstream = &target.upstream;
    let uri = upstream
        .base_url
        .join(&parts.uri)
        .map_err(|e| ProxyError::BadRequest(format!("cannot forward this path: {e}")))?;

    headers::to_upstream_request(
        &mut parts.headers,
        &upstream.host,
        &upstream.default_headers,
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

    let timeouts = match &routed {
        Some(routed) => upstream.timeouts.with(routed.timeouts),
        None => upstream.timeouts,
    };
    // The headers wait is also bounded by what is left of the total.
    let headers_wait = timeouts.total.map_or(timeouts.response_headers, |t| {
        t.min(timeouts.response_headers)
    });
    let sent_at = Instant::now();
    let response =
        match tokio::time::timeout(headers_wait, target.client.request(upstream_request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => return Err(upstream::classify(&err, &timeouts, proxy.max_body_size)),
            Err(_) => return Err(ProxyError::UpstreamTimeout(headers_wait)),
        };
    let headers_after = sent_at.elapsed();

    let (mut parts, body) = response.into_parts();
    headers::to_client_response(&mut parts.headers);
    // Which upstream answered only says something when there are several;
    // the single-upstream path stays as lean as before routing (bench/HISTORY.md).
    if proxy.router.is_some() {
        parts
            .headers
            .insert(UPSTREAM_HEADER, target.name_header.clone());
        parts
            .headers
            .insert(ATTEMPTS_HEADER, HeaderValue::from(attempt));
    }
    // hyper writes the status line for the client's own protocol; an HTTP/2
    // version from the upstream would only trigger a warning.
    parts.version = Version::HTTP_11;
    parts.extensions.insert(UpstreamInfo {
        status: parts.status,
        headers_after,
        routed: proxy.router.is_some(),
    });
    let body = IdleTimeout::new(body, timeouts.idle).with_total(sent_at, timeouts.total);
    let body = match routed {
        None => Body::new(body),
        Some(routed) => {
            routed.deployment.observe(headers_after);
            // The deployment stays busy until the answer has been streamed.
            Body::new(Holding::new(body, routed.in_flight))
        }
    };
    Ok(Response::from_parts(parts, body))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// Only the top-level `model`, borrowed raw so its position in the body is known.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
}

/// The requested model and the byte range of its JSON string in `body`;
/// `None` when the body has no `model`.
fn requested_model(body: &[u8]) -> Result<Option<(String, std::ops::Range<usize>)>, ProxyError> {
    let head: Head<'_> = serde_json::from_slice(body)
        .map_err(|e| ProxyError::BadRequest(format!("the request body is not valid JSON: {e}")))?;
    let Some(raw) = head.model else {
        return Ok(None);
    };
    let model: String = serde_json::from_str(raw.get())
        .map_err(|_| ProxyError::BadRequest("`model` must be a string".into()))?;
    // `raw` borrows from `body`: its offset is where the value starts.
    let start = (raw.get().as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
    Ok(Some((model, start..start + raw.get().len())))
}

/// `body` with the `model` value at `span` replaced by `name`, byte for byte otherwise.
fn rename_model(body: &Bytes, span: std::ops::Range<usize>, name: &str) -> Bytes {
    let quoted = serde_json::Value::from(name).to_string();
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// `GET /v1/models` when routing: the configured public names, in the OpenAI list shape.
fn list_models(router: &ModelRouter) -> Response {
    let data: Vec<serde_json::Value> = router
        .listed()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "llmproxy"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_found_and_renamed_without_touching_other_bytes() {
        let body = Bytes::from_static(
            br#"{ "messages" : [{"role":"user","content":"model: \"x\""}], "model":"gpt-4o" ,"n":1}"#,
        );
        let (model, span) = requested_model(&body).unwrap().unwrap();
        assert_eq!(model, "gpt-4o");
        assert_eq!(&body[span.clone()], br#""gpt-4o""#);
        let renamed = rename_model(&body, span, "gpt-4o-2024-08-06");
        assert_eq!(
            &renamed[..],
            br#"{ "messages" : [{"role":"user","content":"model: \"x\""}], "model":"gpt-4o-2024-08-06" ,"n":1}"#
        );
    }

    #[test]
    fn bodies_without_a_string_model_are_named_problems() {
        assert!(requested_model(br#"{"input":"x"}"#).unwrap().is_none());
        let err = requested_model(br#"{"model": 5}"#).unwrap_err().to_string();
        assert!(err.contains("`model` must be a string"), "{err}");
        let err = requested_model(br#"{"model": "a""#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
