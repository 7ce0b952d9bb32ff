//! The request pipeline: one `/v1/*` request from the client's head to the
//! upstream's answer, through fixed stages in a fixed order.
//!
//! | stage | when it runs | what it does today | on failure |
//! |---|---|---|---|
//! | 1. **admit** | first, before any work | method and path ([`wire`]), declared size | 405 / 400 / 413 |
//! | 2. **authenticate** | with a store ([`accounts`]) | the virtual key (`keys.required`; every key header removed either way), the key's models | 401 / 403 |
//! | 3. **limit** | after authenticate | an in-flight permit (held until the answer ends), the body deadline; with a key: budget, RPM, TPM (an estimate, settled later), a concurrency slot | 503 / 408 / 429 |
//! | 4. **route** | after limit | no `models`: the first upstream, body streamed. `models`: read the JSON body (bounded in size, time and gateway-wide bytes), resolve `model` | 404 / 400 / 503 |
//! | 5. **attempt** | per try | one send ([`upstream::attempt`]); routed: the model's retry chain and fallbacks ([`routing`]) | 502 / 504 / the upstream's answer |
//! | 6. **observe** | on the answer | with a store: the usage [`Meter`] (JSON answers read whole for `usage` and the cost headers, streams scanned as they pass), one record per request; routed: `x-llmproxy-upstream` / `x-llmproxy-attempts` and the model and attempt path for the log line; the body is wrapped (timeouts, held permits) and streams back | the body fails, never ends cleanly |
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
//! [`accounts`]: crate::state::Accounts
//! [`Meter`]: crate::usage::Meter

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method};
use http_body_util::BodyExt;
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::Key;
use crate::error::ProxyError;
use crate::error::RateLimit;
use crate::ingress::openai;
use crate::limits::shared::SharedLimits;
use crate::limits::{Dimension, KeyState, Slot, Verdict};
use crate::routing::retry::{Attempted, Trace};
use crate::routing::{ModelRouter, fallback};
use crate::state::{Accounts, AppState};
use crate::stream::{BodyTimedOut, Deadline, Hold, Observed};
use crate::telemetry::RequestId;
use crate::telemetry::{ATTEMPTS_HEADER, RoutedRequest, UPSTREAM_HEADER};
use crate::usage::{self, Meter, Metered};

/// What a non-streamed answer cost, USD.
const COST_HEADER: &str = "x-llmproxy-cost-usd";
/// A client's opt-in to the cost in its stream's usage chunk (never forwarded).
const STREAM_COST_HEADER: &str = "x-llmproxy-stream-cost";
/// Its prompt tokens.
const PROMPT_TOKENS_HEADER: &str = "x-llmproxy-prompt-tokens";
/// Its completion tokens.
const COMPLETION_TOKENS_HEADER: &str = "x-llmproxy-completion-tokens";
use crate::upstream::RequestBody;
use crate::upstream::attempt::{Outcome, buffered, send};
use crate::wire;

/// Serves one `/v1/*` request through the stages.
pub async fn forward(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ProxyError> {
    // Anthropic's front door answers llmproxy's own failures in Anthropic's
    // error shape (its clients' recovery logic reads it); one comparison
    // for every other request.
    if request.uri().path().starts_with("/v1/messages") {
        let response = stages(state, request)
            .await
            .unwrap_or_else(IntoResponse::into_response);
        return Ok(crate::ingress::anthropic::own_error(response));
    }
    stages(state, request).await
}

/// Stages 1–6.
async fn stages(state: Arc<AppState>, request: Request) -> Result<Response, ProxyError> {
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

    // 3. limit. Each request in flight may hold an upstream socket: counting
    // requests, not only connections, keeps HTTP/2 multiplexing inside the
    // fd budget.
    let Ok(permit) = Arc::clone(&state.in_flight).try_acquire_owned() else {
        return Err(ProxyError::Overloaded(
            "requests in flight (limits.max_in_flight)",
        ));
    };
    let body = Deadline::new(body, state.body_read_timeout);

    // 2. authenticate, and the key's own limits: only with a store.
    if let Some(accounts) = &state.accounts {
        return Ok(Box::pin(metered(&state, accounts, parts, body, declared, permit)).await);
    }

    // 4–6. route, attempt, observe.
    dispatch(&state, parts, body, declared, permit).await
}

/// Stages 4–6: the first upstream, or the model's route.
async fn dispatch(
    state: &AppState,
    parts: http::request::Parts,
    body: RequestBody,
    declared: Option<u64>,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ProxyError> {
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
        Some(router) => Ok(Box::pin(routed(state, router, parts, body, declared, permit)).await),
    }
}

/// Stages 2–6 with a store: the key, its limits and budget, then the
/// request, metered. Always an answer (the error ones included).
async fn metered(
    state: &AppState,
    accounts: &Accounts,
    mut parts: http::request::Parts,
    body: RequestBody,
    declared: Option<u64>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let start = std::time::Instant::now();
    match admit_key(state, accounts, &mut parts, body, declared).await {
        Err(err) => err.into_response(),
        Ok((admitted, body)) => {
            let request_id = parts
                .extensions
                .get::<RequestId>()
                .map_or_else(String::new, |id| id.as_str().to_owned());
            let stream = admitted.stream;
            let price = admitted
                .model
                .as_deref()
                .and_then(|model| accounts.settings.price(model));
            let edit = match price {
                // Opting in to the cost is opting in to the usage chunk.
                Some(price) if admitted.stream_cost => Some(usage::strip::Edit::AddCost(price)),
                _ if admitted.strip_usage => Some(usage::strip::Edit::Strip),
                _ => None,
            };
            let metered = Metered {
                sink: accounts.sink.clone(),
                price,
                key: admitted.key,
                request_id,
                model: admitted.model.unwrap_or_default(),
                upstream: String::new(),
                prompt_estimate: admitted.prompt_estimate,
                reservations: admitted.reservations,
                slot: admitted.slot,
                start,
            };
            let response = match dispatch(state, parts, body, declared, permit).await {
                Ok(response) => response,
                Err(err) => err.into_response(),
            };
            observe_usage(state, metered, response, stream, edit).await
        }
    }
}

/// What the key stage let through.
struct Admitted {
    /// llmproxy asked for the stream's usage: the client's copy drops it.
    strip_usage: bool,
    /// The client or its key asked for the cost in the usage chunk.
    stream_cost: bool,
    key: Option<Arc<Key>>,
    model: Option<String>,
    stream: bool,
    prompt_estimate: u64,
    /// TPM reservations to settle (the key's, the model's).
    reservations: [Option<usage::Reservation>; 2],
    slot: Option<Slot>,
}

/// Authenticates the key (when required), reads the JSON body for the
/// model and the token estimate, and takes what the key's limits allow;
/// everything taken is given back if a later check refuses.
async fn admit_key(
    state: &AppState,
    accounts: &Accounts,
    parts: &mut http::request::Parts,
    body: RequestBody,
    declared: Option<u64>,
) -> Result<(Admitted, RequestBody), ProxyError> {
    let key = if accounts.settings.keys_required {
        Some(accounts.keys.authenticate(&mut parts.headers)?)
    } else {
        for name in &crate::auth::KEY_HEADERS {
            // Without required keys a client's credential header is its own
            // business, but a virtual key must never reach a provider.
            if parts.headers.get(name).is_some_and(|v| {
                v.as_bytes()
                    .windows(crate::auth::KEY_PREFIX.len())
                    .any(|w| w == crate::auth::KEY_PREFIX.as_bytes())
            }) {
                parts.headers.remove(name);
            }
        }
        None
    };
    let mut stream_cost = parts
        .headers
        .remove(STREAM_COST_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true") || v.as_bytes() == b"1");
    let mut strip_usage = false;
    let (body, facts, size) = if parts.method == Method::POST && openai::is_json(&parts.headers) {
        let (mut bytes, _budget) = read_body(state, body, declared).await?;
        let facts = openai::facts(&bytes);
        let size = bytes.len() as u64;
        // Usage must come from the upstream: a stream that did not ask for
        // it asks upstream, and the client's copy is stripped of it.
        // Only Chat and legacy Completions know `stream_options`.
        if facts.stream
            && parts.uri.path().ends_with("/completions")
            && let Some(asked) = openai::with_usage_requested(&bytes)
        {
            bytes = asked;
            strip_usage = true;
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        }
        (buffered(bytes), facts, size)
    } else {
        (body, openai::Facts::default(), 0)
    };
    // About four bytes of JSON per prompt token: an estimate for the
    // token limit and for a request whose usage never arrives.
    let prompt_estimate = size.div_ceil(4);
    if let Some(key) = &key {
        stream_cost |= key.record.stream_cost;
    }
    let mut admitted = Admitted {
        strip_usage,
        stream_cost,
        key: None,
        stream: facts.stream,
        model: facts.model,
        prompt_estimate,
        reservations: [None, None],
        slot: None,
    };
    let shared = accounts.shared.as_deref();
    let estimate = prompt_estimate.saturating_add(facts.max_tokens.unwrap_or(0));
    let mut by_key = Taken::default();
    if let Some(key) = &key {
        if let Some(model) = &admitted.model
            && !key.allows(model)
        {
            return Err(ProxyError::ModelNotAllowed(model.clone()));
        }
        let record = &key.record;
        if let Some(budget) = record.budget_nano_usd {
            let now = crate::store::unix_ms();
            if key.state.spent_now(record, now) >= budget {
                let resets = match crate::limits::budget_period(record, now).1 {
                    Some(end) => format!("it resets at {}", crate::admin::keys::rfc3339(end)),
                    None => "it is a lifetime budget and does not reset".to_owned(),
                };
                return Err(ProxyError::BudgetExceeded(format!(
                    "this API key has spent its budget of {} USD; {resets}",
                    budget as f64 / 1e9
                )));
            }
        }
        by_key = take_limits(
            &key.state,
            shared,
            &record.id,
            (record.rpm, record.tpm),
            estimate,
            Whose::Key,
        )
        .await?;
        if let Some(max) = record.max_concurrent {
            match crate::limits::acquire_slot(&key.state, max) {
                Some(slot) => admitted.slot = Some(slot),
                None => {
                    by_key.give_back(&key.state, estimate);
                    return Err(by_key.refused(
                        Whose::Key,
                        &format!("{max} concurrent requests"),
                        "requests",
                        std::time::Duration::from_secs(1),
                    ));
                }
            }
        }
        if let Some((limit, verdict)) = by_key.tokens {
            admitted.reservations[0] = Some(usage::Reservation {
                state: Arc::clone(&key.state),
                limit,
                shared: verdict.shared,
                reserved: estimate,
            });
        }
    }
    if let Some((pattern, model)) = admitted
        .model
        .as_deref()
        .and_then(|name| crate::config::matching(&accounts.models, name))
    {
        let limit = model.limit;
        match take_limits(
            &model.state,
            shared,
            &model.id,
            (limit.rpm, limit.tpm),
            estimate,
            Whose::Model(pattern),
        )
        .await
        {
            Ok(taken) => {
                if let Some((limit, verdict)) = taken.tokens {
                    admitted.reservations[1] = Some(usage::Reservation {
                        state: Arc::clone(&model.state),
                        limit,
                        shared: verdict.shared,
                        reserved: estimate,
                    });
                }
            }
            Err(err) => {
                if let Some(key) = &key {
                    by_key.give_back(&key.state, estimate);
                }
                return Err(err);
            }
        }
    }
    admitted.key = key;
    Ok((admitted, body))
}

/// Whose limits a refusal names.
#[derive(Clone, Copy)]
enum Whose<'a> {
    Key,
    Model(&'a str),
}

/// What one set of RPM/TPM buckets admitted.
#[derive(Default)]
struct Taken {
    requests: Option<(u64, Verdict)>,
    tokens: Option<(u64, Verdict)>,
}

impl Taken {
    /// Gives back what was taken (the request was refused further on).
    fn give_back(&self, state: &KeyState, estimate: u64) {
        for (dimension, n, taken) in [
            (Dimension::Requests, 1, self.requests),
            (Dimension::Tokens, estimate, self.tokens),
        ] {
            if let Some((limit, verdict)) = taken
                && verdict.retry_after.is_none()
            {
                state.settle(dimension, verdict.shared, n, 0, limit);
            }
        }
    }

    /// The 429 for a limit of `what`, with both buckets' headers.
    fn refused(
        &self,
        whose: Whose<'_>,
        what: &str,
        kind: &'static str,
        retry_after: std::time::Duration,
    ) -> ProxyError {
        let whose = match whose {
            Whose::Key => "this API key's limit".to_owned(),
            Whose::Model(pattern) => format!("the limit for model {pattern} (over all keys)"),
        };
        ProxyError::RateLimited(Box::new(RateLimit {
            message: format!("{whose} of {what} is reached; retry after {retry_after:.1?}"),
            kind,
            retry_after,
            requests: self.requests.map(|(_, v)| v.quota()),
            tokens: self.tokens.map(|(_, v)| v.quota()),
        }))
    }
}

/// Takes one request and `estimate` tokens from `state`'s buckets with
/// limits `(rpm, tpm)`, shared through Redis when configured; on a refusal
/// gives back what it took.
async fn take_limits(
    state: &KeyState,
    shared: Option<&SharedLimits>,
    id: &str,
    (rpm, tpm): (Option<u64>, Option<u64>),
    estimate: u64,
    whose: Whose<'_>,
) -> Result<Taken, ProxyError> {
    let mut taken = Taken::default();
    if let Some(limit) = rpm {
        let verdict = state
            .take(shared, id, Dimension::Requests, 1, limit)
            .await
            .map_err(|_| ProxyError::LimitsUnavailable)?;
        taken.requests = Some((limit, verdict));
        if let Some(retry) = verdict.retry_after {
            return Err(taken.refused(
                whose,
                &format!("{limit} requests per minute"),
                "requests",
                retry,
            ));
        }
    }
    if let Some(limit) = tpm {
        match state
            .take(shared, id, Dimension::Tokens, estimate, limit)
            .await
        {
            Ok(verdict) => {
                taken.tokens = Some((limit, verdict));
                if let Some(retry) = verdict.retry_after {
                    taken.give_back(state, estimate);
                    return Err(taken.refused(
                        whose,
                        &format!("{limit} tokens per minute"),
                        "tokens",
                        retry,
                    ));
                }
            }
            Err(_) => {
                taken.give_back(state, estimate);
                return Err(ProxyError::LimitsUnavailable);
            }
        }
    }
    Ok(taken)
}

/// Wraps the answer in its usage meter. A JSON answer is read whole first
/// (bounded by [`usage::MAX_JSON`]) so its cost can go in the headers; a
/// stream is metered as it passes, unchanged.
async fn observe_usage(
    state: &AppState,
    mut metered: Metered,
    response: Response,
    stream: bool,
    edit: Option<usage::strip::Edit>,
) -> Response {
    let headers = response.headers();
    metered.upstream = headers
        .get(UPSTREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| state.upstreams.names().first().map(|n| (*n).to_owned()))
        .unwrap_or_default();
    let attempt = headers
        .get(ATTEMPTS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .map_or(&b""[..], |v| v.as_bytes())
        .to_vec();
    let status = response.status().as_u16();
    let mut meter = Meter::new(metered, status, attempt, &content_type);
    let json = !stream && meter.reads_json();
    if !json {
        if let Some(edit) = edit
            && meter.reads_sse()
        {
            let (mut parts, body) = response.into_parts();
            parts.headers.remove(http::header::CONTENT_LENGTH);
            // The meter sees the upstream's bytes, usage chunk included.
            let body = usage::strip::EditUsage::new(Observed::new(body, meter), edit);
            return Response::from_parts(parts, Body::new(body));
        }
        return response.map(|body| Body::new(Observed::new(body, meter)));
    }
    let (mut parts, mut body) = response.into_parts();
    let mut whole = BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if whole.len() + data.len() > usage::MAX_JSON {
                        // Too big to hold: the rest streams through, metered.
                        whole.extend_from_slice(data);
                        let head = whole.freeze();
                        crate::stream::Observer::on_data(&mut meter, &head, false);
                        let rest = usage::Prefixed::new(head, body);
                        return Response::from_parts(parts, Body::new(Observed::new(rest, meter)));
                    }
                    whole.extend_from_slice(data);
                }
            }
            Err(err) => {
                crate::stream::Observer::on_error(&mut meter, &err);
                return ProxyError::UpstreamProtocol(format!(
                    "the answer's body failed before it ended: {err}"
                ))
                .into_response();
            }
        }
    }
    let whole = whole.freeze();
    crate::stream::Observer::on_data(&mut meter, &whole, true);
    if let Some((tokens, cost)) = meter.settle(true) {
        let headers = &mut parts.headers;
        headers.insert(COST_HEADER, usage::usd_header(cost));
        headers.insert(
            PROMPT_TOKENS_HEADER,
            HeaderValue::from(tokens.prompt_tokens),
        );
        headers.insert(
            COMPLETION_TOKENS_HEADER,
            HeaderValue::from(tokens.completion_tokens),
        );
    }
    Response::from_parts(parts, Body::from(whole))
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
