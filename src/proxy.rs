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
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version, header};
use http_body_util::{BodyExt, Limited};
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::access_log::{RequestedModel, UpstreamInfo};
use crate::config::Upstream;
use crate::error::ProxyError;
use crate::headers;
use crate::routing::{DeploymentState, InFlight, ModelRouter, Route, Unavailable};
use crate::stream::{BodyTimedOut, Deadline, Holding, IdleTimeout, Replay};
use crate::upstream::{self, RequestBody, UpstreamClient};
use crate::wire;

/// One upstream with its own pooled client (timeouts differ per upstream).
pub struct Target {
    /// The configured upstream.
    pub upstream: Upstream,
    /// The pooled client.
    pub client: UpstreamClient,
    /// `x-llmproxy-upstream` for its answers, made once.
    pub name_header: HeaderValue,
    /// How errors name it: `name (host:port)`, or `host:port` alone.
    pub label: Arc<str>,
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
    /// Throttles wrong admin tokens.
    pub admin_guard: crate::admin::Guard,
    /// Permits for requests in flight (`limits.max_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// Permits for request bytes buffered at once, over every request
    /// (`limits.max_buffered_bytes`).
    pub body_budget: Arc<Semaphore>,
    /// How long a client may take to send its request body.
    pub body_read_timeout: Duration,
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

    // The request filter: what may be forwarded at all, before any upstream work.
    wire::check_method(&parts.method)?;
    wire::check_path(parts.uri.path())?;
    // hyper has already refused a malformed length; what is left is the size.
    let declared = wire::content_length(&parts.headers)
        .map_err(|err| ProxyError::BadRequest(err.to_string()))?;
    if declared.is_some_and(|len| len > proxy.max_body_size) {
        return Err(ProxyError::BodyTooLarge {
            limit: proxy.max_body_size,
        });
    }
    // Each request in flight may hold an upstream socket: counting requests,
    // not only connections, keeps HTTP/2 multiplexing inside the fd budget.
    let Ok(permit) = Arc::clone(&proxy.in_flight).try_acquire_owned() else {
        return Err(ProxyError::Overloaded(
            "requests in flight (limits.max_in_flight)",
        ));
    };
    let body = Deadline::new(body, proxy.body_read_timeout);

    match &proxy.router {
        None => send(&proxy, Attempt::single(), parts, body, Some(permit)).await,
        // Boxed so the single-upstream future stays as small as before routing
        // existed: its size is measurable on every request (bench/HISTORY.md).
        Some(router) => {
            let mut trace = Trace::default();
            let result = Box::pin(route(&proxy, router, parts, body, declared, &mut trace)).await;
            let mut response = match result {
                Ok(response) => response.map(|body| Body::new(Holding::new(body, permit))),
                Err(err) => {
                    let mut response = err.into_response();
                    if trace.attempts > 0 {
                        response
                            .headers_mut()
                            .insert(ATTEMPTS_HEADER, HeaderValue::from(trace.attempts));
                    }
                    response
                }
            };
            if let Some(model) = trace.model {
                response
                    .extensions_mut()
                    .insert(RequestedModel(model.into_boxed_str()));
            }
            Ok(response)
        }
    }
}

/// What a routed request did, for its answer and its log line.
#[derive(Default)]
struct Trace {
    /// The model it asked for.
    model: Option<String>,
    /// Attempts made, over the model and its fallbacks.
    attempts: u32,
}

/// Picks the upstream by the request's `model` and sends it there.
async fn route(
    proxy: &Proxy,
    router: &ModelRouter,
    parts: http::request::Parts,
    body: RequestBody,
    declared: Option<u64>,
    trace: &mut Trace,
) -> Result<Response, ProxyError> {
    if parts.method == Method::GET && parts.uri.path() == "/v1/models" {
        return Ok(list_models(router));
    }
    if parts.method != Method::POST || !is_json(&parts.headers) {
        return send(proxy, Attempt::single(), parts, body, None).await;
    }

    let (bytes, _budget) = read_body(proxy, body, declared).await?;
    let Some((model, span)) = requested_model(&bytes)? else {
        return send(proxy, Attempt::single(), parts, buffered(bytes), None).await;
    };
    let model: &str = trace.model.insert(model);
    let primary = router
        .resolve(model)
        .ok_or_else(|| ProxyError::ModelNotFound(model.to_owned()))?;
    let request = Attempted {
        parts: &parts,
        bytes: &bytes,
        model,
        span,
    };
    let attempts = &mut trace.attempts;
    let (mut result, mut exhausted) = attempt_chain(proxy, primary, &request, attempts).await;
    // Its deployments exhausted, the model hands over to its fallbacks in order.
    let mut fallbacks = primary.fallbacks.iter().filter_map(|&i| router.route(i));
    while exhausted {
        let Some(fallback) = fallbacks.next() else {
            break;
        };
        (result, exhausted) = attempt_chain(proxy, fallback, &request, attempts).await;
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
        result = attempt_chain(proxy, fallback, &request, attempts).await.0;
    }
    result
}

/// Reads a request body that routing must see whole, within the body limit,
/// the body deadline, and the gateway-wide budget of buffered bytes. The
/// returned permit holds the body's share of that budget until dropped.
///
/// A declared length is reserved from the budget before a byte is read (so
/// twenty clients announcing 31 MiB and stalling cannot take 620 MiB); a
/// chunked body reserves as it arrives.
async fn read_body(
    proxy: &Proxy,
    body: RequestBody,
    declared: Option<u64>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ProxyError> {
    let over_budget =
        || ProxyError::Overloaded("buffered request bytes (limits.max_buffered_bytes)");
    let reserve = |bytes: u64| -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        if bytes == 0 {
            return Ok(None);
        }
        let n = u32::try_from(bytes).map_err(|_| over_budget())?;
        Arc::clone(&proxy.body_budget)
            .try_acquire_many_owned(n)
            .map(Some)
            .map_err(|_| over_budget())
    };
    let mut held = reserve(declared.unwrap_or(0))?;
    let capacity = declared.map_or(0, |len| usize::try_from(len).unwrap_or(0));
    let mut buffer = BytesMut::with_capacity(capacity);
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| match err.downcast_ref::<BodyTimedOut>() {
            Some(timed_out) => ProxyError::RequestBodyTimeout(timed_out.0),
            None => ProxyError::BadRequest(format!("reading the request body failed: {err}")),
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = buffer.len() as u64 + data.len() as u64;
        if total > proxy.max_body_size {
            return Err(ProxyError::BodyTooLarge {
                limit: proxy.max_body_size,
            });
        }
        if declared.is_none() {
            match (held.as_mut(), reserve(data.len() as u64)?) {
                (Some(held), Some(more)) => held.merge(more),
                (None, more) => held = more,
                (Some(_), None) => {}
            }
        }
        buffer.extend_from_slice(&data);
    }
    Ok((buffer.freeze(), held))
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
///
/// Only the first 64 KiB are read to decide (provider error bodies are far
/// smaller); whatever was read is put back in front of the rest, so the
/// client gets the upstream's whole answer, however long, when it is not
/// a context-length error.
async fn context_length_exceeded(response: Response) -> (bool, Response) {
    const PEEK: usize = 64 * 1024;
    const CODE: &[u8] = b"context_length_exceeded";
    let (parts, mut body) = response.into_parts();
    let mut peeked = BytesMut::new();
    while peeked.len() < PEEK {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    peeked.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => {
                return (
                    false,
                    ProxyError::UpstreamUnreachable(format!(
                        "reading the upstream's error failed: {err}"
                    ))
                    .into_response(),
                );
            }
            None => break,
        }
    }
    let hit = peeked.windows(CODE.len()).any(|w| w == CODE);
    let body = Body::new(Replay::new(peeked.freeze(), body));
    (hit, Response::from_parts(parts, body))
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
    // The last attempt's own failure: when the breakers then close every
    // door, it is the real cause, and the answer names it.
    let mut last_error: Option<ProxyError> = None;
    loop {
        let now = crate::routing::now_ms();
        let admitted = match route.pick_available(tried, now) {
            Ok(admitted) => admitted,
            // Nowhere to go: exhausted, so fallbacks get a turn.
            Err(reason) => {
                let error = match (last_error, reason) {
                    (Some(error), _) => error,
                    (None, Unavailable::Cooling) => ProxyError::ModelUnavailable {
                        model: route.name.clone(),
                        retry_after: Duration::from_millis(route.retry_after_ms(now)),
                    },
                    (None, Unavailable::AtCapacity) => {
                        ProxyError::ModelAtCapacity(route.name.clone())
                    }
                };
                return (Err(error), true);
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
            Attempt {
                target: deployment.upstream,
                number: *attempts,
                routed: Some(Routed {
                    deployment: Arc::clone(&deployment),
                    in_flight,
                    timeouts: route.timeouts,
                }),
            },
            attempt_parts,
            buffered(body),
            None,
        )
        .await;
        let failed = match &result {
            Ok(response) => retryable_status(response.status()),
            Err(err) => err.is_retryable(),
        };
        if failed {
            deployment.record_failure(crate::routing::now_ms());
        } else {
            deployment.record_success();
        }

        let untried_left = (tried.count_ones() as usize) < route.deployments.len();
        let wait = match &result {
            Ok(response) if retryable_status(response.status()) => {
                let backoff = backoff(&policy, attempt);
                match wire::retry_after(response.headers()) {
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
                last_error = result.err();
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
    Duration::from_micros(crate::routing::random() % micros.saturating_add(1))
}

/// One attempt: which upstream, its number in the request's chain, and the
/// routing state it holds (none on the single-upstream path).
struct Attempt {
    target: usize,
    number: u32,
    routed: Option<Routed>,
}

impl Attempt {
    /// The one attempt of a request that no model route claims: the first upstream.
    fn single() -> Self {
        Self {
            target: 0,
            number: 1,
            routed: None,
        }
    }
}

/// A buffered body (routed requests), in the type the upstream client sends.
fn buffered(bytes: Bytes) -> RequestBody {
    // Already complete: the deadline never arms.
    Deadline::new(Body::from(bytes), Duration::MAX)
}

/// Sends the request to the attempt's upstream and streams the answer back;
/// `held` (the request's in-flight permit) is released when the answer ends.
async fn send(
    proxy: &Proxy,
    attempt: Attempt,
    mut parts: http::request::Parts,
    body: RequestBody,
    held: Option<OwnedSemaphorePermit>,
) -> Result<Response, ProxyError> {
    let Attempt {
        target,
        number: attempt,
        routed,
    } = attempt;
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
            Ok(Err(err)) => {
                return Err(upstream::classify(&err, &timeouts, proxy.max_body_size)
                    .at_upstream(&target.label));
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
        None => Body::new(Holding::new(body, held)),
        Some(routed) => {
            routed.deployment.observe(headers_after);
            // The deployment stays busy until the answer has been streamed.
            Body::new(Holding::new(body, (routed.in_flight, held)))
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
