//! The request pipeline: one `/v1/*` request from the client's head to the
//! upstream's answer, through fixed stages in a fixed order.
//!
//! | stage | when it runs | what it does today | on failure |
//! |---|---|---|---|
//! | 1. **admit** | first, before any work | method and path ([`wire`]), declared size | 405 / 400 / 413 |
//! | 2. **authenticate** | after admit | nothing yet: the seam where virtual keys will be checked (and the key header removed) | 401 / 403 |
//! | 3. **limit** | after authenticate | an in-flight permit (held until the answer ends), the body deadline | 503 / 408 |
//! | 4. **route** | after limit | no `models`: the first upstream, body streamed. `models`: read the JSON body (bounded in size, time and gateway-wide bytes), resolve `model` | 404 / 400 / 503 |
//! | 5. **attempt** | per try | one send ([`upstream::attempt`]); routed: the model's retry chain and fallbacks ([`routing`]) | 502 / 504 / the upstream's answer |
//! | 6. **observe** | on the answer | routed: `x-llmproxy-upstream` / `x-llmproxy-attempts` and the model and attempt path for the log line; the body is wrapped (timeouts, held permits) and streams back | the body fails, never ends cleanly |
//!
//! The access log and request id (`telemetry::AccessLog`) wrap this from
//! outside, so every answer, an error included, gets one log line. A stage
//! that is not configured costs nothing: the single-upstream request never
//! touches routing, buffers nothing, and its future stays small (the routed
//! one is boxed; `bench/callgrind.sh` measures both).
//!
//! [`wire`]: crate::wire
//! [`upstream::attempt`]: crate::upstream::attempt
//! [`routing`]: crate::routing

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method};
use http_body_util::BodyExt;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::ProxyError;
use crate::ingress::openai;
use crate::routing::retry::{Attempted, Trace};
use crate::routing::{ModelRouter, fallback};
use crate::state::AppState;
use crate::stream::{BodyTimedOut, Deadline, Hold, Observed};
use crate::telemetry::{ATTEMPTS_HEADER, RoutedRequest, UPSTREAM_HEADER};
use crate::upstream::RequestBody;
use crate::upstream::attempt::{Outcome, buffered, send};
use crate::wire;

/// Serves one `/v1/*` request through the stages.
pub async fn forward(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ProxyError> {
    let (parts, body) = request.into_parts();

    // 1. admit
    wire::check_method(&parts.method)?;
    wire::check_path(parts.uri.path())?;
    // hyper has already refused a malformed length; what is left is the size.
    let declared = wire::content_length(&parts.headers)
        .map_err(|err| ProxyError::BadRequest(err.to_string()))?;
    if declared.is_some_and(|len| len > state.upstreams.max_body_size) {
        return Err(ProxyError::BodyTooLarge {
            limit: state.upstreams.max_body_size,
        });
    }

    // 2. authenticate: no keys are configured yet; nothing to check.

    // 3. limit. Each request in flight may hold an upstream socket: counting
    // requests, not only connections, keeps HTTP/2 multiplexing inside the
    // fd budget.
    let Ok(permit) = Arc::clone(&state.in_flight).try_acquire_owned() else {
        return Err(ProxyError::Overloaded(
            "requests in flight (limits.max_in_flight)",
        ));
    };
    let body = Deadline::new(body, state.body_read_timeout);

    // 4–6. route, attempt, observe.
    match &state.router {
        None => {
            let Some(target) = state.upstreams.targets.first() else {
                return Err(ProxyError::UpstreamUnreachable("no upstream".into()));
            };
            send(
                state.upstreams.max_body_size,
                target,
                target.upstream.timeouts,
                parts,
                body,
                Some(permit),
            )
            .await
        }
        // Boxed so the single-upstream future stays as small as before routing
        // existed: its size is measurable on every request (bench/HISTORY.md).
        Some(router) => Ok(Box::pin(routed(&state, router, parts, body, declared, permit)).await),
    }
}

/// Stages 4–6 for a routed request: always an answer, the error ones
/// included, so the routing headers and log fields are on every one.
async fn routed(
    state: &AppState,
    router: &ModelRouter,
    parts: http::request::Parts,
    body: RequestBody,
    declared: Option<u64>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let mut trace = Trace::default();
    let mut model = None;
    let outcome = route(state, router, parts, body, declared, &mut model, &mut trace).await;
    let mut response = match outcome {
        Ok(response) => response.map(|body| Body::new(Observed::new(body, Hold(permit)))),
        Err(err) => err.into_response(),
    };
    if trace.attempts > 0 {
        let headers = response.headers_mut();
        if let Some(upstream) = trace.upstream.take() {
            headers.insert(UPSTREAM_HEADER, upstream);
        }
        headers.insert(ATTEMPTS_HEADER, HeaderValue::from(trace.attempts));
    }
    if let Some(model) = model {
        response.extensions_mut().insert(RoutedRequest {
            model: model.into_boxed_str(),
            attempts: trace.attempts,
            path: trace.path.into_boxed_str(),
        });
    }
    response
}

/// Picks the upstream by the request's `model` and serves it there.
async fn route(
    state: &AppState,
    router: &ModelRouter,
    parts: http::request::Parts,
    body: RequestBody,
    declared: Option<u64>,
    requested: &mut Option<String>,
    trace: &mut Trace,
) -> Outcome {
    let first = state.upstreams.targets.first();
    if parts.method == Method::GET && parts.uri.path() == "/v1/models" {
        return Ok(openai::list_models(router.listed()));
    }
    let Some(first) = first else {
        return Err(ProxyError::UpstreamUnreachable("no upstream".into()));
    };
    // Requests with no model to route by go to the first upstream, streamed.
    if parts.method != Method::POST || !openai::is_json(&parts.headers) {
        let max = state.upstreams.max_body_size;
        return send(max, first, first.upstream.timeouts, parts, body, ()).await;
    }

    let (bytes, _budget) = read_body(state, body, declared).await?;
    let Some((model, span)) = openai::requested_model(&bytes)? else {
        let max = state.upstreams.max_body_size;
        return send(
            max,
            first,
            first.upstream.timeouts,
            parts,
            buffered(bytes),
            (),
        )
        .await;
    };
    let model: &str = requested.insert(model);
    let primary = router
        .resolve(model)
        .ok_or_else(|| ProxyError::ModelNotFound(model.to_owned()))?;
    let request = Attempted {
        parts: &parts,
        bytes: &bytes,
        model,
        span,
    };
    fallback::serve(&state.upstreams, router, primary, &request, trace).await
}

/// Reads a request body that routing must see whole, within the body limit,
/// the body deadline, and the gateway-wide budget of buffered bytes. The
/// returned permit holds the body's share of that budget until dropped.
///
/// A declared length is reserved from the budget before a byte is read (so
/// twenty clients announcing 31 MiB and stalling cannot take 620 MiB); a
/// chunked body reserves as it arrives.
async fn read_body(
    state: &AppState,
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
        Arc::clone(&state.body_budget)
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
        if total > state.upstreams.max_body_size {
            return Err(ProxyError::BodyTooLarge {
                limit: state.upstreams.max_body_size,
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
