//! Forwarding over the wire: routes, path joining, byte-exact bodies both ways.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test]
async fn health_check_answers_healthy_json() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    let got = get(&proxy.url("/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.json(), serde_json::json!({"status": "healthy"}));
    assert!(
        upstream.requests().is_empty(),
        "health check must not reach the upstream"
    );
}

#[tokio::test]
async fn chat_completion_is_forwarded_byte_exact_both_ways() {
    // Not valid UTF-8 and not JSON: the proxy must not look inside.
    let request_body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let answer = r#"{"id":"chatcmpl-1","choices":[{"message":{"content":"héllo 世界 👋"}}],  "odd spacing" : true}"#;
    let upstream = spawn_upstream(move |_| Reply::json(200, answer)).await;
    let proxy = spawn_proxy(&upstream).await;

    let got = post(&proxy.url("/v1/chat/completions"), request_body.clone()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, answer.as_bytes());

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].uri.path(), "/v1/chat/completions");
    assert_eq!(seen[0].body, request_body);
}

#[tokio::test]
async fn every_v1_endpoint_is_forwarded_with_method_path_and_query() {
    let upstream =
        spawn_upstream(|r| Reply::json(200, &format!(r#"{{"path":"{}"}}"#, r.uri))).await;
    let proxy = spawn_proxy(&upstream).await;
    let cases = [
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/ft%3Agpt-4o%3Aacme"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/files?purpose=batch&limit=2"),
        ("DELETE", "/v1/files/file-abc"),
        ("POST", "/v1/audio/speech"),
    ];
    for (method, path) in cases {
        let got = send(
            Request::builder()
                .method(method)
                .uri(proxy.url(path))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200, "{method} {path}");
        assert_eq!(got.json()["path"], path, "{method} {path}");
    }
    let seen = upstream.requests();
    let methods: Vec<&str> = seen.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "POST", "POST", "GET", "GET", "POST", "GET", "DELETE", "POST"
        ]
    );
}

#[tokio::test]
async fn base_url_with_its_own_path_prefix_is_joined() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy_with(config_for(&format!(
        "http://{}/openai/deployments/v1/",
        upstream.addr
    )))
    .await;
    post(
        &proxy.url("/v1/chat/completions?api-version=2025-01-01"),
        "{}",
    )
    .await;
    let seen = upstream.requests();
    assert_eq!(
        seen[0].uri,
        "/openai/deployments/v1/chat/completions?api-version=2025-01-01"
    );
}

#[tokio::test]
async fn paths_outside_v1_are_an_openai_404_and_never_forwarded() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    for path in [
        "/chat/completions",
        "/v2/chat/completions",
        "/v1",
        "/admin?token=x",
    ] {
        let got = post(&proxy.url(path), "{}").await;
        assert_eq!(got.status, 404, "{path}");
        let json = got.json();
        assert_eq!(json["error"]["type"], "invalid_request_error", "{path}");
        assert_eq!(json["error"]["code"], "not_found", "{path}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("POST"), "{message}");
        assert!(
            !message.contains("token"),
            "the query never shows: {message}"
        );
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn ten_megabyte_bodies_arrive_intact_both_ways() {
    let body: Bytes = (0..10 * 1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<u8>>()
        .into();
    let upstream = spawn_upstream(|r| {
        let mut reply = Reply::json(200, "");
        reply.chunks = r
            .body
            .chunks(1 << 20)
            .map(|c| (Duration::ZERO, Bytes::copy_from_slice(c)))
            .collect();
        reply
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;
    let got = post(&proxy.url("/v1/files"), body.clone()).await;
    assert_eq!(got.status, 200);
    assert_eq!(upstream.requests()[0].body.len(), body.len());
    assert!(
        upstream.requests()[0].body == body,
        "upstream got a different request body"
    );
    assert!(got.body == body, "client got a different response body");
}

#[tokio::test]
async fn gzip_bodies_pass_through_undecoded() {
    // A real gzip stream of `{"ok":true}`; the proxy must neither decode nor re-encode it.
    const GZIP: &[u8] = &[
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0xab, 0x56, 0xca, 0xcf, 0x56,
        0xb2, 0x2a, 0x29, 0x2a, 0x4d, 0xad, 0x05, 0x00, 0x90, 0x5f, 0xd4, 0xa7, 0x0b, 0x00, 0x00,
        0x00,
    ];
    let upstream = spawn_upstream(|r| {
        assert_eq!(r.headers["accept-encoding"], "gzip");
        let mut reply = Reply::json(200, "").header("content-encoding", "gzip");
        reply.chunks = vec![(Duration::ZERO, Bytes::from_static(GZIP))];
        reply
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;
    let got = send(
        Request::post(proxy.url("/v1/chat/completions"))
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(&got.body[..], GZIP);
}

#[tokio::test]
async fn two_hundred_concurrent_streams_are_byte_exact() {
    let upstream = spawn_upstream(|r| {
        let id = std::str::from_utf8(&r.body).unwrap().to_owned();
        Reply::sse(
            (0..20)
                .map(|i| {
                    (
                        Duration::from_millis(5),
                        event(&format!(
                            "{{\"stream\":{id},\"chunk\":{i},\"pad\":\"ü€𝄞\"}}"
                        )),
                    )
                })
                .collect(),
        )
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;
    let url = proxy.url("/v1/chat/completions");
    let mut tasks = Vec::new();
    for id in 0..200 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            (id, post(&url, id.to_string()).await)
        }));
    }
    for task in tasks {
        let (id, got) = task.await.unwrap();
        assert_eq!(got.status, 200);
        let expected: String = (0..20)
            .map(|i| format!("data: {{\"stream\":{id},\"chunk\":{i},\"pad\":\"ü€𝄞\"}}\n\n"))
            .collect();
        assert_eq!(got.body, expected.as_bytes(), "stream {id}");
    }
    assert_eq!(upstream.requests().len(), 200);
}

#[tokio::test]
async fn every_response_carries_a_fresh_llmproxy_request_id() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    let a = post(&proxy.url("/v1/chat/completions"), "{}").await;
    let b = get(&proxy.url("/")).await;
    let c = get(&proxy.url("/nope")).await;
    let ids: Vec<&str> = [&a, &b, &c]
        .iter()
        .map(|g| {
            g.header("x-llmproxy-request-id")
                .expect("request id header")
        })
        .collect();
    assert!(ids.iter().all(|id| id.len() == 32));
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[1], ids[2]);
}

#[tokio::test]
async fn http2_clients_are_served_too() {
    let upstream = spawn_upstream(|_| Reply::sse(vec![(Duration::ZERO, event("h2"))])).await;
    let proxy = spawn_proxy(&upstream).await;
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let response = h2
        .request(
            Request::post(proxy.url("/v1/chat/completions"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-llmproxy-request-id"));
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, event("h2"));
    // The upstream got an ordinary HTTP/1.1 request with its own Host.
    assert_eq!(
        upstream.requests()[0].headers["host"],
        upstream.addr.to_string()
    );
}

/// The `dur` of one `name;dur=x` entry of a Server-Timing header.
fn timing(got: &Got, name: &str) -> f64 {
    let all: Vec<&str> = got
        .headers
        .get_all("server-timing")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    all.iter()
        .flat_map(|v| v.split(','))
        .find_map(|entry| {
            entry
                .trim()
                .strip_prefix(&format!("{name};dur="))
                .map(|d| d.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {name} entry in {all:?}"))
}

#[tokio::test]
async fn server_timing_reports_the_proxys_time_and_the_upstreams() {
    let upstream = spawn_upstream(|_| {
        let mut reply = Reply::json(200, "{}").header("server-timing", "db;dur=3");
        reply.head_delay = Duration::from_millis(200);
        reply
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    let upstream_ms = timing(&got, "upstream");
    let own_ms = timing(&got, "llmproxy");
    assert!(
        (200.0..2000.0).contains(&upstream_ms),
        "upstream {upstream_ms} ms"
    );
    assert!((0.0..50.0).contains(&own_ms), "llmproxy {own_ms} ms");
    assert_eq!(
        timing(&got, "db"),
        3.0,
        "the upstream's own entries are kept"
    );

    let health = get(&proxy.url("/")).await;
    assert!(timing(&health, "llmproxy") < 50.0);
}
