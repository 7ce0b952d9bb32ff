//! The built-in mock upstream's failure injection, so retries, fallbacks,
//! timeouts and breakers can be tried offline.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use llmproxy::mock::MockConfig;
use tokio::net::TcpListener;

async fn mock(config: MockConfig) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(llmproxy::mock::serve(listener, config));
    format!("http://{addr}/v1")
}

fn fast() -> MockConfig {
    MockConfig {
        chunks: 5,
        delay: Duration::ZERO,
        ..Default::default()
    }
}

async fn chat(
    base: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let mut request = Request::post(format!("{base}/chat/completions"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = format!(r#"{{"model":"m","stream":{stream},"messages":[]}}"#);
    client()
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_mock_fails_when_asked_through_the_proxy() {
    let base = mock(fast()).await;
    let proxy = spawn_proxy_with(config_for(&base)).await;
    let through = proxy.url("/v1");

    let response = chat(&through, false, &[("x-mock-status", "503")]).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("injected 503"));

    let started = Instant::now();
    let response = chat(&through, false, &[("x-mock-head-delay-ms", "300")]).await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let response = chat(&through, true, &[("x-mock-cut-after", "2")]).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.into_body().collect().await.is_err(),
        "a cut stream must fail, not end"
    );
}

#[tokio::test]
async fn fail_status_answers_every_request_with_it() {
    let base = mock(MockConfig {
        fail_status: Some(429),
        ..fast()
    })
    .await;
    let response = chat(&base, false, &[]).await;
    assert_eq!(response.status(), 429);
    let got = get(&format!("{base}/models")).await;
    assert_eq!(got.status, 429);
}

#[tokio::test]
async fn the_mock_answer_is_a_whole_sentence() {
    let base = mock(fast()).await;
    for chunks in ["1", "5", "20"] {
        let response = chat(&base, false, &[("x-mock-chunks", chunks)]).await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let content = json["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            content.ends_with('.') && !content.ends_with(":."),
            "{chunks}: {content}"
        );
    }
}

#[tokio::test]
async fn a_dialect_serves_its_own_paths_and_refuses_the_others_in_its_shape() {
    use llmproxy::mock::MockDialect;
    let post = |url: String, body: &'static str| async move {
        let request = Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let response = client().request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
        )
    };
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let message = r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let gemini = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;

    let base = mock(MockConfig {
        dialect: MockDialect::Anthropic,
        ..fast()
    })
    .await;
    let (status, answer) = post(format!("{base}/messages"), message).await;
    assert_eq!((status, answer["type"].as_str()), (200, Some("message")));
    let (status, answer) = post(format!("{base}/chat/completions"), chat).await;
    assert_eq!(
        (status, answer["error"]["type"].as_str()),
        (404, Some("not_found_error"))
    );
    assert_eq!(answer["type"], "error");
    let models = client()
        .request(
            Request::get(format!("{base}/models"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let models: serde_json::Value =
        serde_json::from_slice(&models.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(models["data"][0]["type"], "model", "Anthropic's list shape");

    let base = mock(MockConfig {
        dialect: MockDialect::Gemini,
        ..fast()
    })
    .await;
    let root = base.trim_end_matches("/v1");
    let (status, answer) = post(
        format!("{root}/v1beta/models/gemini-x:generateContent"),
        gemini,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        answer["candidates"][0]["content"]["parts"][0]["text"].is_string(),
        "{answer}"
    );
    let (status, answer) = post(format!("{base}/messages"), message).await;
    assert_eq!(
        (status, answer["error"]["status"].as_str()),
        (404, Some("NOT_FOUND"))
    );

    let base = mock(MockConfig {
        dialect: MockDialect::Openai,
        ..fast()
    })
    .await;
    let root = base.trim_end_matches("/v1");
    let (status, answer) = post(format!("{base}/chat/completions"), chat).await;
    assert_eq!(
        (status, answer["object"].as_str()),
        (200, Some("chat.completion"))
    );
    let (status, answer) = post(
        format!("{root}/v1beta/models/gemini-x:generateContent"),
        gemini,
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}
