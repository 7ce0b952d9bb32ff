//! Upstreams that speak another API than OpenAI's, over real sockets: an
//! OpenAI client talking to an Anthropic-dialect upstream through
//! llmproxy, the upstream checking what it received.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly and spawns freely"
)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

const MESSAGE: &str = include_str!("fixtures/anthropic/message_tool_use.json");
const STREAM: &str = include_str!("fixtures/anthropic/stream_tool_use.sse");
const STREAM_ERROR: &str = include_str!("fixtures/anthropic/stream_error.sse");
const OVERLOADED: &str = include_str!("fixtures/anthropic/error_overloaded.json");

/// An Anthropic-dialect upstream: the fixture answers by what the request
/// asks (`stream`, or a model named `overloaded` / `broken`).
async fn anthropic_upstream() -> Upstream {
    spawn_upstream(|request| {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let sse = |text: &'static str| {
            // Sent in pieces that split lines (and a UTF-8 character).
            let bytes = text.as_bytes();
            let chunks = bytes
                .chunks(37)
                .map(|c| (Duration::ZERO, Bytes::copy_from_slice(c)))
                .collect();
            Reply::sse(chunks)
        };
        match (body["model"].as_str(), body["stream"] == true) {
            (Some("overloaded"), _) => Reply::json(529, OVERLOADED),
            (Some("broken"), _) => sse(STREAM_ERROR),
            (_, true) => sse(STREAM),
            (_, false) => Reply::json(200, MESSAGE),
        }
    })
    .await
}

async fn gateway(upstream: &Upstream) -> Proxy {
    let yaml = format!(
        "upstream:\n  base_url: {}\n  provider: anthropic\n  default_max_tokens: 1024\n  default_headers:\n    x-api-key: sk-ant-upstream-secret\n",
        upstream.base_url()
    );
    spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await
}

/// A whole answer body as text.
async fn body_text(response: http::Response<hyper::body::Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn chat(proxy: &Proxy, body: Value) -> Request<Full<Bytes>> {
    Request::post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-openai-client-key")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

#[tokio::test]
async fn an_openai_request_reaches_an_anthropic_upstream_translated_and_comes_back() {
    let upstream = anthropic_upstream().await;
    let proxy = gateway(&upstream).await;
    let got = send(chat(
        &proxy,
        json!({"model": "claude-sonnet-4-5", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
        ]}),
    ))
    .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let answer = got.json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(answer["usage"]["prompt_tokens"], 3119);
    assert!(got.header("content-length").is_some());

    let seen = &upstream.requests()[0];
    assert_eq!(seen.uri.path(), "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], "sk-ant-upstream-secret");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(
        !seen.headers.contains_key("authorization"),
        "the client's OpenAI key must not reach Anthropic"
    );
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        sent["system"],
        json!([{"type": "text", "text": "Be brief."}])
    );
    assert_eq!(sent["max_tokens"], 1024, "the configured default");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}])
    );
}

#[tokio::test]
async fn a_stream_is_translated_chunk_by_chunk_and_ends_with_done() {
    let upstream = anthropic_upstream().await;
    let proxy = gateway(&upstream).await;
    let response = client()
        .request(chat(
            &proxy,
            json!({"model": "claude-sonnet-4-5", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "Weather?"}]}),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().get("content-length").is_none());
    let text = body_text(response).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"content\":\"Okay, let's check the weather — ☀️ for\""));
    assert!(text.contains("\"finish_reason\":\"tool_calls\""));
    assert!(text.contains("\"completion_tokens\":89"));
}

#[tokio::test]
async fn provider_errors_and_failures_reach_the_client_honestly() {
    let upstream = anthropic_upstream().await;
    let proxy = gateway(&upstream).await;
    // 529 overloaded: status kept, body in the OpenAI shape.
    let got = send(chat(&proxy, json!({"model": "overloaded", "messages": []}))).await;
    assert_eq!(got.status.as_u16(), 529);
    assert_eq!(got.json()["error"]["type"], "overloaded_error");
    assert_eq!(got.json()["error"]["message"], "Overloaded");
    // An in-band error mid-stream: the response aborts, no [DONE].
    let response = client()
        .request(chat(
            &proxy,
            json!({"model": "broken", "stream": true, "messages": []}),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.into_body().collect().await.is_err(),
        "the stream must not look complete"
    );
    // An endpoint Anthropic cannot serve: 400 naming the provider.
    let got = send(
        Request::post(proxy.url("/v1/embeddings"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                b"{\"model\":\"m\",\"input\":\"x\"}",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["code"], "not_supported_by_provider");
    assert!(String::from_utf8_lossy(&got.body).contains("Anthropic"));
    // A request that cannot be translated: 400 naming the field.
    let got = send(chat(&proxy, json!({"model": "m", "n": 3, "messages": []}))).await;
    assert_eq!(got.status, 400);
    assert!(String::from_utf8_lossy(&got.body).contains("`n`"));
    assert_eq!(
        upstream.requests().len(),
        2,
        "refused requests are never sent"
    );
}

/// A gateway with virtual keys and a temporary SQLite store in front of an
/// Anthropic-dialect `upstream`, and one key; the store goes with it.
struct Keyed {
    proxy: Proxy,
    key: String,
    db: std::path::PathBuf,
}

const ADMIN: &str = "admin-token-for-tests-0123";

impl Keyed {
    async fn new(upstream: &Upstream, extra: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let db = std::env::temp_dir().join(format!(
            "llmproxy-providers-{}-{}.db",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let yaml = format!(
            "upstream:\n  base_url: {}\n  provider: anthropic\n  default_headers:\n    x-api-key: sk-ant-upstream-secret\n\
             admin:\n  token: {ADMIN}\nstore:\n  url: sqlite://{}\n  flush_interval: 100ms\n\
             keys:\n  required: true\n{extra}",
            upstream.base_url(),
            db.display()
        );
        let proxy = spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await;
        for _ in 0..200 {
            let got = send(Self::admin(
                &proxy,
                "POST",
                "/admin/keys",
                r#"{"name":"k"}"#,
            ))
            .await;
            if got.status == 201 {
                let key = got.json()["key"].as_str().unwrap().to_owned();
                return Self { proxy, key, db };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the gateway did not start");
    }

    fn admin(proxy: &Proxy, method: &str, path: &str, body: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(proxy.url(path))
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    /// The usage records, once there are `n` (within 2 s).
    async fn records(&self, n: usize) -> Vec<Value> {
        let mut records = Vec::new();
        for _ in 0..100 {
            let got = send(Self::admin(
                &self.proxy,
                "GET",
                "/admin/usage/records?limit=10",
                "",
            ))
            .await;
            records = got.json()["data"].as_array().unwrap().clone();
            if records.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(records.len(), n, "{records:?}");
        records
    }
}

impl Drop for Keyed {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
        }
    }
}

#[tokio::test]
async fn translated_traffic_is_accounted_from_the_providers_own_usage() {
    let upstream = anthropic_upstream().await;
    let gateway = Keyed::new(
        &upstream,
        "prices:\n  claude-*:\n    input: 3\n    output: 15\n",
    )
    .await;
    let with_key = |body: Value| {
        Request::post(gateway.proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", gateway.key))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let got = send(with_key(
        json!({"model": "claude-sonnet-4-5", "messages": []}),
    ))
    .await;
    assert_eq!(got.status, 200);
    // 3119 prompt tokens (cache included) × 3 + 503 × 15 USD per million.
    assert_eq!(got.header("x-llmproxy-cost-usd"), Some("0.016902000"));
    // A stream that did not ask for usage: none in the client's copy, but recorded.
    let streamed = client()
        .request(with_key(
            json!({"model": "claude-sonnet-4-5", "stream": true, "messages": []}),
        ))
        .await
        .unwrap();
    let text = body_text(streamed).await;
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let records = gateway.records(2).await;
    let stream_record = records.iter().find(|r| r["prompt_tokens"] == 582).unwrap();
    assert_eq!(stream_record["completion_tokens"], 89);
    assert_eq!(stream_record["cached_tokens"], 100);
    assert_eq!(stream_record["source"], "reported");

    // The Responses API to the same deployment: billed from the same usage,
    // whole and streamed (the usage inside `response.completed`).
    let responses = |body: Value| {
        Request::post(gateway.proxy.url("/v1/responses"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", gateway.key))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let got = send(responses(
        json!({"model": "claude-sonnet-4-5", "input": "hi"}),
    ))
    .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.header("x-llmproxy-cost-usd"), Some("0.016902000"));
    let streamed = client()
        .request(responses(
            json!({"model": "claude-sonnet-4-5", "input": "hi", "stream": true}),
        ))
        .await
        .unwrap();
    let text = body_text(streamed).await;
    assert!(text.contains("event: response.completed"), "{text}");
    let records = gateway.records(4).await;
    let reported: Vec<(u64, u64, u64)> = records
        .iter()
        .map(|r| {
            let n = |field: &str| r[field].as_u64().unwrap();
            (
                n("prompt_tokens"),
                n("completion_tokens"),
                n("cached_tokens"),
            )
        })
        .collect();
    assert_eq!(
        reported.iter().filter(|t| **t == (3119, 503, 1024)).count(),
        2,
        "whole answers, Chat and Responses: {reported:?}"
    );
    assert_eq!(
        reported.iter().filter(|t| **t == (582, 89, 100)).count(),
        2,
        "streams, Chat and Responses: {reported:?}"
    );
}

#[tokio::test]
async fn a_model_falls_back_from_an_openai_deployment_to_an_anthropic_one() {
    let openai = spawn_upstream(|_| {
        Reply::json(
            503,
            r#"{"error":{"message":"down","type":"server_error","param":null,"code":null}}"#,
        )
    })
    .await;
    let anthropic = anthropic_upstream().await;
    let yaml = format!(
        "upstreams:\n  openai:\n    base_url: {}\n  claude:\n    base_url: {}\n    provider: anthropic\n    default_headers:\n      x-api-key: sk-ant\n\
         models:\n  smart:\n    retry:\n      attempts: 1\n    fallbacks: [claude-smart]\n    deployments:\n      - upstream: openai\n        model: gpt-4o\n\
         \x20 claude-smart:\n    deployments:\n      - upstream: claude\n        model: claude-sonnet-4-5\n",
        openai.base_url(),
        anthropic.base_url()
    );
    let proxy = spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await;
    let got = send(chat(
        &proxy,
        json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]}),
    ))
    .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.header("x-llmproxy-upstream"), Some("claude"));
    assert_eq!(got.json()["object"], "chat.completion");
    assert_eq!(openai.requests().len(), 1);
    let sent: Value = serde_json::from_slice(&anthropic.requests()[0].body).unwrap();
    assert_eq!(
        sent["model"], "claude-sonnet-4-5",
        "the deployment's model name"
    );
}

const GEMINI_RESPONSE: &str = include_str!("fixtures/gemini/response_function_call.json");
const GEMINI_STREAM: &str = include_str!("fixtures/gemini/stream.sse");
const GEMINI_QUOTA: &str = include_str!("fixtures/gemini/error_quota.json");

/// A Gemini-dialect upstream answering with the fixtures (a model named
/// `quota` is over its quota), streams in `piece`-byte reads, and a proxy
/// in front of it with the key in `x-goog-api-key`.
async fn gemini_gateway(piece: usize) -> (Upstream, Proxy) {
    let upstream = spawn_upstream(move |request| {
        let path = request.uri.path().to_owned();
        if path.contains("quota") {
            Reply::json(429, GEMINI_QUOTA)
        } else if path.ends_with(":streamGenerateContent") {
            Reply::sse(
                GEMINI_STREAM
                    .as_bytes()
                    .chunks(piece)
                    .map(|c| (Duration::ZERO, Bytes::copy_from_slice(c)))
                    .collect(),
            )
        } else {
            Reply::json(200, GEMINI_RESPONSE)
        }
    })
    .await;
    let base = upstream.base_url().replace("/v1", "/v1beta");
    let yaml = format!(
        "upstream:\n  base_url: {base}\n  provider: gemini\n  default_headers:\n    x-goog-api-key: goog-secret\n"
    );
    let proxy = spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await;
    (upstream, proxy)
}

#[tokio::test]
async fn an_openai_request_reaches_a_gemini_upstream_translated_and_comes_back() {
    let (upstream, proxy) = gemini_gateway(29).await;
    let got = send(chat(
        &proxy,
        json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]}),
    ))
    .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(
        got.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(got.json()["usage"]["completion_tokens"], 70);
    let seen = &upstream.requests()[0];
    assert_eq!(
        seen.uri.path(),
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(seen.headers["x-goog-api-key"], "goog-secret");
    assert!(!seen.headers.contains_key("authorization"));

    let response = client()
        .request(chat(
            &proxy,
            json!({"model": "gemini-2.5-flash", "stream": true, "messages": []}),
        ))
        .await
        .unwrap();
    let text = body_text(response).await;
    assert!(
        text.contains("The sky — ☀️ is") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert_eq!(upstream.requests()[1].uri.query(), Some("alt=sse"));

    let got = send(chat(&proxy, json!({"model": "quota", "messages": []}))).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["error"]["type"], "RESOURCE_EXHAUSTED");
}

#[tokio::test]
async fn azure_deployments_get_their_path_and_version_and_the_bytes_pass_unchanged() {
    const ANSWER: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}]}"#;
    let upstream = spawn_upstream(|_| Reply::json(200, ANSWER)).await;
    let base = upstream.base_url().trim_end_matches("/v1").to_owned();
    let yaml = format!(
        "upstream:\n  base_url: {base}\n  provider: azure\n  api_version: 2024-06-01\n  default_headers:\n    api-key: azure-secret\n"
    );
    let config = llmproxy::config::parse(&yaml, "test").unwrap();
    let proxy = spawn_proxy_with(config).await;
    let body = r#"{"model":"gpt4o-prod",  "messages":[{"role":"user","content":"hi"}]}"#;
    let got = send(
        Request::post(proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-client")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], ANSWER.as_bytes());
    let seen = &upstream.requests()[0];
    assert_eq!(
        seen.uri.to_string(),
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(&seen.body[..], body.as_bytes(), "byte-exact");
    assert_eq!(seen.headers["api-key"], "azure-secret");
    assert!(!seen.headers.contains_key("authorization"));
    let got = send(chat(&proxy, json!({"model": "a/b", "messages": []}))).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["code"], "not_supported_by_provider");
    // The Messages API reaches a deployment too: as Chat, on its path.
    let body =
        r#"{"model":"gpt4o-prod","max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#;
    let got = send(messages(&proxy, body, Some(("x-api-key", "sk-ant-client")))).await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.json()["content"][0]["text"], "hello");
    let seen = &upstream.requests()[1];
    assert_eq!(
        seen.uri.to_string(),
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-06-01"
    );
    assert!(!seen.headers.contains_key("x-api-key"));
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    );
}

#[tokio::test]
async fn the_messages_api_passes_through_to_an_anthropic_upstream_unchanged() {
    let upstream = anthropic_upstream().await;
    let proxy = gateway(&upstream).await;
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":[{"type":"thinking","thinking":"x","signature":"EqQBCgIYAhIM"},{"type":"text","text":"hi"}]}]}"#;
    let got = send(
        Request::post(proxy.url("/v1/messages"))
            .header("content-type", "application/json")
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "interleaved-thinking-2025-05-14")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        &got.body[..],
        MESSAGE.as_bytes(),
        "the answer as Anthropic sent it"
    );
    let seen = &upstream.requests()[0];
    assert_eq!(seen.uri.path(), "/v1/messages");
    assert_eq!(
        &seen.body[..],
        body.as_bytes(),
        "byte-exact, signed thinking intact"
    );
    assert_eq!(
        seen.headers["anthropic-beta"],
        "interleaved-thinking-2025-05-14"
    );
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert_eq!(seen.headers["x-api-key"], "sk-ant-upstream-secret");
    // Without the client's version, the configured one.
    let got = send(
        Request::post(proxy.url("/v1/messages/count_tokens"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"claude-sonnet-4-5","messages":[]}"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        upstream.requests()[1].headers["anthropic-version"],
        "2023-06-01"
    );
    assert_eq!(
        upstream.requests()[1].uri.path(),
        "/v1/messages/count_tokens"
    );
    // Claude Code reads the model list at its start: Anthropic's own.
    let got = send(
        Request::get(proxy.url("/v1/models"))
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = &upstream.requests()[2];
    assert_eq!(
        (seen.method.as_str(), seen.uri.path()),
        ("GET", "/v1/models")
    );
    assert_eq!(seen.headers["x-api-key"], "sk-ant-upstream-secret");
}

#[tokio::test]
async fn messages_passed_through_are_billed_from_anthropics_usage() {
    let upstream = anthropic_upstream().await;
    let gateway = Keyed::new(&upstream, "").await;
    // Claude Code sends its key as x-api-key; the body must reach Anthropic untouched.
    let streamed = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[]}"#;
    let response = client()
        .request(
            Request::post(gateway.proxy.url("/v1/messages"))
                .header("content-type", "application/json")
                .header("x-api-key", &gateway.key)
                .body(Full::new(Bytes::from_static(streamed.as_bytes())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        body_text(response).await,
        STREAM,
        "the stream as Anthropic sent it"
    );
    let seen = &upstream.requests()[0];
    assert_eq!(
        &seen.body[..],
        streamed.as_bytes(),
        "no stream_options added to a Messages request"
    );
    assert_eq!(
        seen.headers["x-api-key"], "sk-ant-upstream-secret",
        "never the virtual key"
    );
    let records = gateway.records(1).await;
    assert_eq!(records[0]["prompt_tokens"], 582);
    assert_eq!(records[0]["completion_tokens"], 89);
    assert_eq!(records[0]["cached_tokens"], 100);
}

/// The built-in mock as an OpenAI-compatible upstream, and a proxy in front.
async fn proxy_to_openai_mock() -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = llmproxy::mock::MockConfig {
        chunks: 5,
        delay: Duration::from_millis(1),
        ..Default::default()
    };
    tokio::spawn(llmproxy::mock::serve(listener, mock));
    spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await
}

fn messages(
    proxy: &Proxy,
    body: &'static str,
    header: Option<(&str, &str)>,
) -> Request<Full<Bytes>> {
    let mut request = Request::post(proxy.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01");
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    request
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn the_messages_front_door_speaks_anthropic_to_an_openai_upstream() {
    let proxy = proxy_to_openai_mock().await;
    let body = r#"{"model":"gpt-4o","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}"#;
    let got = send(messages(&proxy, body, None)).await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let answer = got.json();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["usage"]["input_tokens"], 8);
    assert_eq!(answer["usage"]["output_tokens"], 5);

    let streamed = r#"{"model":"gpt-4o","max_tokens":32,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = client()
        .request(messages(&proxy, streamed, None))
        .await
        .unwrap();
    let text = body_text(response).await;
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"message_start"));
    assert_eq!(kinds[1], "content_block_start");
    assert_eq!(
        &kinds[kinds.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(text.contains("\"output_tokens\":5"), "{text}");

    // An upstream error: Anthropic's error shape, the status kept.
    let got = send(messages(&proxy, body, Some(("x-mock-status", "429")))).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["type"], "error");
    assert_eq!(got.json()["error"]["type"], "rate_limit_error");

    // A stream cut upstream: an `error` event, then the abort.
    let response = client()
        .request(messages(&proxy, streamed, Some(("x-mock-cut-after", "2"))))
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut seen = Vec::new();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => seen.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    let seen = String::from_utf8(seen).unwrap();
    assert!(failed, "the stream must not look complete: {seen}");
    assert!(!seen.contains("message_stop"), "{seen}");
    assert!(
        seen.ends_with("\n\n") && seen.contains("event: error\n"),
        "an error event last: {seen}"
    );
}

#[tokio::test]
async fn the_proxys_own_failures_take_anthropics_shape_on_the_messages_front_door() {
    // Nothing listens upstream: llmproxy's own 502.
    let proxy = spawn_proxy_with(config_for("http://127.0.0.1:9/v1")).await;
    let body = r#"{"model":"gpt-4o","max_tokens":8,"messages":[]}"#;
    let got = send(messages(&proxy, body, None)).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["type"], "error");
    assert_eq!(got.json()["error"]["type"], "api_error");
    assert!(
        got.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream")
    );
    // The OpenAI front door keeps OpenAI's shape.
    let got = send(chat(&proxy, json!({"model": "gpt-4o", "messages": []}))).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["error"]["code"], "upstream_unreachable");
}

fn responses(proxy: &Proxy, body: Value) -> Request<Full<Bytes>> {
    Request::post(proxy.url("/v1/responses"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-openai-client-key")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The stream's body up to its end or its failure, and whether it failed.
async fn until_end(response: http::Response<hyper::body::Incoming>) -> (String, bool) {
    let mut body = response.into_body();
    let mut seen = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => seen.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => return (String::from_utf8(seen).unwrap(), true),
        }
    }
    (String::from_utf8(seen).unwrap(), false)
}

#[tokio::test]
async fn the_responses_api_reaches_an_anthropic_deployment_translated() {
    let upstream = anthropic_upstream().await;
    let proxy = gateway(&upstream).await;
    let request = json!({
        "model": "claude-sonnet-4-5", "store": false, "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "max_output_tokens": 300,
    });
    let got = send(responses(&proxy, request.clone())).await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let answer = got.json();
    assert_eq!(
        (answer["object"].as_str(), answer["status"].as_str()),
        (Some("response"), Some("completed"))
    );
    let call = answer["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["type"] == "function_call")
        .unwrap();
    assert_eq!(call["name"], "get_weather");
    assert!(serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).is_ok());
    assert_eq!(answer["usage"]["input_tokens"], 3119);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.uri.path(), "/v1/messages");
    assert!(!seen.headers.contains_key("authorization"));
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        sent["system"],
        json!([{"type": "text", "text": "Be brief."}])
    );
    assert_eq!(sent["max_tokens"], 300);
    assert_eq!(sent["tools"][0]["name"], "get_weather");

    // Streamed: `response.*` events, function call arguments included.
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let response = client().request(responses(&proxy, streamed)).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (text, failed) = until_end(response).await;
    assert!(!failed, "{text}");
    assert!(text.starts_with("event: response.created\n"), "{text}");
    assert!(text.contains("event: response.function_call_arguments.delta\n"));
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: response.completed\n"), "{last}");
    assert!(last.contains("\"output_tokens\":89"), "{last}");

    // A stream that fails upstream: an `error` event, then the abort.
    let mut broken = request.clone();
    broken["stream"] = true.into();
    broken["model"] = "broken".into();
    let (text, failed) =
        until_end(client().request(responses(&proxy, broken)).await.unwrap()).await;
    assert!(failed, "the stream must not look complete: {text}");
    assert!(!text.contains("response.completed"));
    assert!(
        text.trim_end()
            .rsplit("\n\n")
            .next()
            .unwrap()
            .starts_with("event: error\n"),
        "{text}"
    );

    // Stateful requests need OpenAI: 400 saying why, nothing sent.
    let before = upstream.requests().len();
    let mut stateful = request;
    stateful["previous_response_id"] = "resp_123".into();
    let got = send(responses(&proxy, stateful)).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["code"], "not_supported_by_provider");
    assert!(
        got.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("previous_response_id")
    );
    assert_eq!(upstream.requests().len(), before);
}

#[tokio::test]
async fn the_messages_and_responses_apis_reach_a_gemini_deployment() {
    let (upstream, proxy) = gemini_gateway(23).await;
    let body = r#"{"model":"gemini-2.5-flash","max_tokens":64,"system":"Be brief.","messages":[{"role":"user","content":"Weather?"}]}"#;
    let got = send(messages(&proxy, body, Some(("x-api-key", "sk-ant-client")))).await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let answer = got.json();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["stop_reason"], "tool_use");
    let tools: Vec<&str> = answer["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|block| block["name"].as_str())
        .collect();
    assert_eq!(
        tools,
        ["get_weather", "get_time"],
        "parallel calls stay apart"
    );
    let seen = &upstream.requests()[0];
    assert_eq!(
        seen.uri.path(),
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(seen.headers["x-goog-api-key"], "goog-secret");
    assert!(
        !seen.headers.contains_key("x-api-key"),
        "the client's key stays here"
    );
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent["systemInstruction"]["parts"][0]["text"], "Be brief.");

    let streamed = r#"{"model":"gemini-2.5-flash","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Sky?"}]}"#;
    let (text, failed) = until_end(
        client()
            .request(messages(&proxy, streamed, None))
            .await
            .unwrap(),
    )
    .await;
    assert!(!failed, "{text}");
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"message_start"));
    assert_eq!(&kinds[kinds.len() - 2..], ["message_delta", "message_stop"]);
    assert!(text.contains("The sky"), "{text}");

    let quota = r#"{"model":"quota","max_tokens":8,"messages":[{"role":"user","content":"x"}]}"#;
    let got = send(messages(&proxy, quota, None)).await;
    assert_eq!(got.status, 429);
    assert_eq!(
        (
            got.json()["type"].as_str(),
            got.json()["error"]["type"].as_str()
        ),
        (Some("error"), Some("rate_limit_error"))
    );

    // The Responses API too, streamed.
    let request = json!({"model": "gemini-2.5-flash", "input": "Sky?", "stream": true});
    let (text, failed) =
        until_end(client().request(responses(&proxy, request)).await.unwrap()).await;
    assert!(!failed, "{text}");
    assert!(
        text.contains("event: response.output_text.delta\n") && text.contains("The sky"),
        "{text}"
    );
    assert!(
        text.trim_end()
            .rsplit("\n\n")
            .next()
            .unwrap()
            .starts_with("event: response.completed\n")
    );
}

#[tokio::test]
async fn count_tokens_is_estimated_where_the_upstream_has_none() {
    let upstream = spawn_upstream(|_| Reply::json(500, "{}")).await;
    let proxy = spawn_proxy_with(config_for(&upstream.base_url())).await;
    // Every string counts ("Be brief", "user", "Hiya", "x", 27 letters):
    // ⌈44 / 4⌉ = 11.
    let body = r#"{"model":"gpt-4o","system":"Be brief","messages":[{"role":"user","content":"Hiya"}],"tools":[{"name":"x","description":"abcdefghijklmnopqrstuvwxyzA"}]}"#;
    let request = Request::post(proxy.url("/v1/messages/count_tokens"))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let got = send(request).await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.json(), json!({"input_tokens": 11}));
    assert_eq!(got.header("x-llmproxy-token-count"), Some("estimate"));
    assert!(
        upstream.requests().is_empty(),
        "answered without the upstream"
    );
}
