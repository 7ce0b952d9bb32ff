//! A built-in OpenAI-compatible fake upstream (`llmproxy mock-upstream`), so
//! the demo, the SDK tests and the benchmarks run with no key and no network.
//!
//! It answers `POST /v1/chat/completions` (streamed when `"stream": true`,
//! with `stream_options.include_usage` honoured), `GET /v1/models` and
//! `POST /v1/embeddings`. The answer is `chunks` words; a streamed answer
//! sends one word per SSE event, `delay` apart. Per request, the headers
//! `x-mock-chunks` and `x-mock-delay-ms` override both, and
//! `x-mock-timestamps` adds `llmproxy_mock_sent_us` (Unix µs at send time) to
//! each streamed chunk, so a benchmark can measure per-chunk delay (in the
//! Anthropic dialect the words themselves become `llmproxy_mock_sent_us=N`,
//! which a translation carries through).
//! `POST /v1/uploads` drains the body and answers its size, for body throughput.
//!
//! It also speaks Anthropic's Messages API on `POST /v1/messages` (for
//! `provider: anthropic` upstreams): the same words, streamed as Anthropic's
//! event sequence when asked, a `tool_use` of the first tool when the request
//! has `tools`, usage with cache tokens, and failures in Anthropic's error
//! shape (`x-mock-status: 529` is its `overloaded_error`). And Gemini's, on
//! `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse` (for `provider: gemini`): the same
//! words, a `functionCall` of the first declared function, `usageMetadata`
//! with thinking tokens, failures in Google's error shape.
//!
//! `--dialect openai|anthropic|gemini` serves one of the three (the others'
//! paths answer 404 in its error shape); by default it serves all three.
//!
//! Failures, to try retries, fallbacks, timeouts and breakers offline:
//! `--fail-status N` answers every request with that error; per request,
//! `x-mock-status: N` does the same, `x-mock-head-delay-ms` waits before the
//! response headers, and `x-mock-cut-after: N` cuts a stream after N words
//! (the connection fails, no `[DONE]`). The headers cross llmproxy like any
//! other, so a client can set them through the proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Which wire format the mock speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MockDialect {
    /// All three at once (each on its own paths).
    #[default]
    All,
    /// OpenAI's: chat completions, models, embeddings.
    Openai,
    /// Anthropic's Messages API (and count_tokens).
    Anthropic,
    /// Gemini's generateContent / streamGenerateContent.
    Gemini,
}

/// Mock upstream settings.
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// Words in each answer (one SSE chunk each when streamed).
    pub chunks: usize,
    /// Pause before each streamed chunk.
    pub delay: Duration,
    /// Answer every request with this error status instead.
    pub fail_status: Option<u16>,
    /// The wire format served; the others' paths answer 404.
    pub dialect: MockDialect,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            chunks: 20,
            delay: Duration::from_millis(50),
            fail_status: None,
            dialect: MockDialect::All,
        }
    }
}

struct Mock {
    config: MockConfig,
    counter: AtomicU64,
}

const WORDS: [&str; 12] = [
    "Hello",
    "from",
    "the",
    "llmproxy",
    "mock",
    "upstream:",
    "every",
    "word",
    "is",
    "a",
    "streamed",
    "chunk.",
];

/// The mock's router.
pub fn router(config: MockConfig) -> Router {
    let state = Arc::new(Mock {
        config,
        counter: AtomicU64::new(0),
    });
    let speaks = |dialect| matches!(config.dialect, MockDialect::All) || config.dialect == dialect;
    let mut router = Router::new();
    if speaks(MockDialect::Openai) {
        router = router
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/uploads", post(uploads));
    }
    if config.dialect == MockDialect::Anthropic {
        router = router.route(
            "/v1/models",
            get(|| async {
                axum::Json(json!({
                    "data": [{"type": "model", "id": "claude-mock", "display_name": "Claude (mock)", "created_at": "2025-01-01T00:00:00Z"}],
                    "has_more": false, "first_id": "claude-mock", "last_id": "claude-mock",
                }))
            }),
        );
    }
    if speaks(MockDialect::Anthropic) {
        router = router.route("/v1/messages", post(messages)).route(
            "/v1/messages/count_tokens",
            post(|body: Bytes| async move {
                axum::Json(json!({"input_tokens": body.len().div_ceil(4)}))
            }),
        );
    }
    if speaks(MockDialect::Gemini) {
        router = router.route("/v1beta/models/{*call}", post(gemini));
    }
    let dialect = config.dialect;
    router
        .fallback(move || async move {
            let message = "mock upstream: unknown path";
            let body = match dialect {
                MockDialect::Anthropic => json!({"type": "error", "error": {"type": "not_found_error", "message": message}}),
                MockDialect::Gemini => json!({"error": {"code": 404, "message": message, "status": "NOT_FOUND"}}),
                _ => json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "not_found"}}),
            };
            (StatusCode::NOT_FOUND, axum::Json(body))
        })
        .with_state(state)
}

/// Serves the mock on `listener` until the process ends.
pub async fn serve(listener: TcpListener, config: MockConfig) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY, Nagle holds each small SSE event until the previous one is ACKed.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(config)).await
}

/// The answer's words, joined with spaces, one per chunk; the last of
/// `total` ends the sentence.
fn word(i: usize, total: usize) -> String {
    let word = WORDS[i % WORDS.len()];
    let mut text = if i == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    };
    if i + 1 == total {
        text = text.trim_end_matches([':', '.']).to_owned();
        text.push('.');
    }
    text
}

/// The failure a request asked for (or `--fail-status` imposes), after its
/// head delay: an OpenAI-shaped error answer.
async fn injected(mock: &Mock, headers: &HeaderMap) -> Option<Response> {
    if let Some(ms) = header_number(headers, "x-mock-head-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
    }
    let status = header_number(headers, "x-mock-status")
        .and_then(|n| u16::try_from(n).ok())
        .or(mock.config.fail_status)
        .and_then(|n| StatusCode::from_u16(n).ok())
        .filter(|s| s.is_client_error() || s.is_server_error())?;
    let code = match status.as_u16() {
        429 => "rate_limit_exceeded",
        400 => "invalid_request_error",
        _ => "server_error",
    };
    let mut response = (
        status,
        axum::Json(json!({"error": {"message": format!("mock upstream: injected {status}"), "type": code, "param": null, "code": code}})),
    )
        .into_response();
    if matches!(status.as_u16(), 429 | 503) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    Some(response)
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})),
    )
        .into_response()
}

async fn chat_completions(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(failure) = injected(&mock, &headers).await {
        return failure;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("mock upstream: the body is not JSON");
    };
    let model = request["model"].as_str().unwrap_or("mock-model").to_owned();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let include_usage = request["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let chunks =
        header_number(&headers, "x-mock-chunks").map_or(mock.config.chunks, |n| n as usize);
    let delay =
        header_number(&headers, "x-mock-delay-ms").map_or(mock.config.delay, Duration::from_millis);
    let id = format!(
        "chatcmpl-mock{}",
        mock.counter.fetch_add(1, Ordering::Relaxed)
    );
    let created = unix_now();
    let usage =
        json!({"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks});

    if !stream {
        let content: String = (0..chunks).map(|i| word(i, chunks)).collect();
        let answer = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage, "system_fingerprint": "fp_mock",
        });
        return axum::Json(answer).into_response();
    }

    let timestamps = headers.contains_key("x-mock-timestamps");
    let cut_after = header_number(&headers, "x-mock-cut-after");
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
    #[expect(
        clippy::disallowed_methods,
        reason = "the mock upstream is a tool outside the gateway's task tracker; its streams end with their connection"
    )]
    tokio::spawn(async move {
        // Built at send time so a timestamp says when the chunk left.
        let event = |delta: Value, finish: Value| {
            let mut chunk = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            if timestamps {
                chunk["llmproxy_mock_sent_us"] = json!(unix_micros());
            }
            // As OpenAI does: with include_usage, every other chunk carries
            // `"usage": null`.
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            Bytes::from(format!("data: {chunk}\n\n"))
        };
        if tx
            .send_data(event(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))
            .await
            .is_err()
        {
            return;
        }
        for i in 0..chunks {
            if cut_after.is_some_and(|n| i as u64 >= n) {
                // Queued frames would be overtaken by the abort: let them leave first.
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.abort(std::io::Error::other("mock upstream: injected cut"));
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx
                .send_data(event(json!({"content": word(i, chunks)}), Value::Null))
                .await
                .is_err()
            {
                return; // the client went away
            }
        }
        let mut tail = vec![event(json!({}), json!("stop"))];
        if include_usage {
            let chunk = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage});
            tail.push(Bytes::from(format!("data: {chunk}\n\n")));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for event in tail {
            if tx.send_data(event).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::new(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `POST /v1/messages`: Anthropic's dialect.
async fn messages(State(mock): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(failure) = injected(&mock, &headers).await {
        let status = failure.status();
        let kind = match status.as_u16() {
            529 => "overloaded_error",
            429 => "rate_limit_error",
            400 => "invalid_request_error",
            _ => "api_error",
        };
        return (
            status,
            axum::Json(json!({"type": "error", "error": {"type": kind, "message": format!("mock upstream: injected {status}")}})),
        )
            .into_response();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("mock upstream: the body is not JSON");
    };
    let model = request["model"].as_str().unwrap_or("mock-model").to_owned();
    let chunks =
        header_number(&headers, "x-mock-chunks").map_or(mock.config.chunks, |n| n as usize);
    let delay =
        header_number(&headers, "x-mock-delay-ms").map_or(mock.config.delay, Duration::from_millis);
    let id = format!("msg_mock{}", mock.counter.fetch_add(1, Ordering::Relaxed));
    let timestamps = headers.contains_key("x-mock-timestamps");
    let tool = request["tools"][0]["name"].as_str().map(str::to_owned);
    let usage = json!({"input_tokens": 8, "output_tokens": chunks, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 0});
    let stop_reason = if tool.is_some() {
        "tool_use"
    } else {
        "end_turn"
    };
    if request["stream"] != true {
        let mut content = vec![
            json!({"type": "text", "text": (0..chunks).map(|i| word(i, chunks)).collect::<String>()}),
        ];
        if let Some(name) = &tool {
            content.push(json!({"type": "tool_use", "id": "toolu_mock", "name": name, "input": {"city": "Paris"}}));
        }
        return axum::Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": null, "usage": usage,
        }))
        .into_response();
    }
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
    #[expect(
        clippy::disallowed_methods,
        reason = "the mock upstream is a tool outside the gateway's task tracker; its streams end with their connection"
    )]
    tokio::spawn(async move {
        let event =
            |kind: &str, data: Value| Bytes::from(format!("event: {kind}\ndata: {data}\n\n"));
        let start = json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "usage": {"input_tokens": 8, "output_tokens": 1, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 0}}});
        let head = [
            event("message_start", start),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
        ];
        let mut tail = vec![event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        )];
        if let Some(name) = &tool {
            tail.push(event("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_mock", "name": name, "input": {}}})));
            tail.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}})));
            tail.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}})));
            tail.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ));
        }
        tail.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": chunks}})));
        tail.push(event("message_stop", json!({"type": "message_stop"})));
        for n in 0..head.len() + chunks + tail.len() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let event = match n.checked_sub(head.len()) {
                None => head[n].clone(),
                Some(i) if i < chunks => {
                    // Made when sent: with `x-mock-timestamps` each word is
                    // its send time, which survives a translation (a field
                    // would not).
                    let text = if timestamps {
                        format!("llmproxy_mock_sent_us={} ", unix_micros())
                    } else {
                        word(i, chunks)
                    };
                    // In Anthropic's own key order (`json!` sorts keys), as
                    // the real API writes its most frequent event.
                    Bytes::from(format!(
                        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":{}}}}}\n\n",
                        Value::String(text)
                    ))
                }
                Some(i) => tail[i - chunks].clone(),
            };
            if tx.send_data(event).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::new(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`.
async fn gemini(
    State(mock): State<Arc<Mock>>,
    axum::extract::Path(call): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(failure) = injected(&mock, &headers).await {
        let status = failure.status();
        let kind = match status.as_u16() {
            429 => "RESOURCE_EXHAUSTED",
            400 => "INVALID_ARGUMENT",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        };
        return (
            status,
            axum::Json(json!({"error": {"code": status.as_u16(), "message": format!("mock upstream: injected {status}"), "status": kind}})),
        )
            .into_response();
    }
    let Some((model, method)) = call.split_once(':') else {
        return bad_request("mock upstream: expected models/{model}:generateContent");
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("mock upstream: the body is not JSON");
    };
    let chunks =
        header_number(&headers, "x-mock-chunks").map_or(mock.config.chunks, |n| n as usize);
    let delay =
        header_number(&headers, "x-mock-delay-ms").map_or(mock.config.delay, Duration::from_millis);
    let function = request["tools"][0]["functionDeclarations"][0]["name"]
        .as_str()
        .map(str::to_owned);
    let usage = json!({"promptTokenCount": 8, "candidatesTokenCount": chunks, "thoughtsTokenCount": 3, "totalTokenCount": 11 + chunks});
    let call_part = function
        .as_ref()
        .map(|name| json!({"functionCall": {"name": name, "args": {"city": "Paris"}}}));
    let model = model.to_owned();
    if method == "generateContent" {
        let mut parts =
            vec![json!({"text": (0..chunks).map(|i| word(i, chunks)).collect::<String>()})];
        parts.extend(call_part);
        return axum::Json(json!({
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": usage, "modelVersion": model, "responseId": "mock-gemini",
        }))
        .into_response();
    }
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
    #[expect(
        clippy::disallowed_methods,
        reason = "the mock upstream is a tool outside the gateway's task tracker; its streams end with their connection"
    )]
    tokio::spawn(async move {
        for i in 0..chunks {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut event = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": word(i, chunks)}]}, "index": 0}], "modelVersion": model, "responseId": "mock-gemini"});
            if i + 1 == chunks {
                if let Some(part) = &call_part
                    && let Some(parts) = event["candidates"][0]["content"]["parts"].as_array_mut()
                {
                    parts.push(part.clone());
                }
                event["candidates"][0]["finishReason"] = json!("STOP");
                event["usageMetadata"] = usage.clone();
            }
            if tx
                .send_data(Bytes::from(format!("data: {event}\r\n\r\n")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::new(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn models(State(mock): State<Arc<Mock>>, headers: HeaderMap) -> Response {
    if let Some(failure) = injected(&mock, &headers).await {
        return failure;
    }
    axum::Json(json!({
        "object": "list",
        "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "llmproxy-mock"}],
    }))
    .into_response()
}

async fn embeddings(State(mock): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(failure) = injected(&mock, &headers).await {
        return failure;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("mock upstream: the body is not JSON");
    };
    let inputs = match &request["input"] {
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
        .collect();
    axum::Json(json!({
        "object": "list", "data": data,
        "model": request["model"].as_str().unwrap_or("mock-embedding"),
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }))
    .into_response()
}

/// Drains the body without parsing it, so body throughput is measured, not JSON.
async fn uploads(body: Body) -> Response {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len()),
            Err(_) => return bad_request("mock upstream: the body failed"),
        }
    }
    axum::Json(json!({"object": "upload", "bytes": total})).into_response()
}
