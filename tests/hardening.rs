//! Hostile clients and hostile upstreams, over real sockets: one regression
//! test per defect of the adversarial trial (issue 7), HTTP/1.1 and h2.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(yaml: &str) -> llmproxy::config::FileConfig {
    llmproxy::config::parse(yaml, "test").unwrap()
}

/// One upstream, one model `m` routed to it, plus extra YAML at the top level.
fn routed(upstream: &str, model_extra: &str, top_extra: &str) -> llmproxy::config::FileConfig {
    config(&format!(
        "upstreams:\n  a:\n    base_url: {upstream}\nmodels:\n  m:\n{model_extra}    deployments:\n      - upstream: a\n{top_extra}"
    ))
}

fn assert_proxy_error(got: &Got, status: u16, code: &str) {
    assert_eq!(
        got.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&got.body)
    );
    assert_eq!(got.json()["error"]["code"], code);
}

/// A client that speaks h2 with prior knowledge over plain TCP (h2c).
fn h2_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn h2_get(url: &str) -> Got {
    let response = h2_client()
        .request(Request::get(url).body(Full::default()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Reads what the server sends until it closes, within `limit`; the status
/// line's code, or `None` when it closed without an answer.
async fn status_of(stream: &mut TcpStream, limit: Duration) -> Option<u16> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

// 1 ---------------------------------------------------------------------------

#[tokio::test]
async fn dot_segments_never_reach_the_upstream_over_http1_or_h2() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{}/openai/v1", upstream.addr))).await;
    let paths = [
        "/v1/../../internal/x",
        "/v1/%2e%2e/%2e%2e/internal/x",
        "/v1/models/..%2f..%2finternal",
        "/v1/./../internal",
        "/v1/..;/internal",
    ];
    for path in paths {
        let (answer, _) = raw_exchange(
            proxy.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid_path"), "{path}: {answer}");

        let got = h2_get(&proxy.url(path)).await;
        assert_proxy_error(&got, 400, "invalid_path");
    }
    assert!(
        upstream.requests().is_empty(),
        "reached the upstream: {:?}",
        upstream.requests()
    );
    // Ordinary paths still go through, to the base URL's prefix.
    let got = h2_get(&proxy.url("/v1/models/ft%3Agpt-4o")).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        upstream.requests()[0].uri.path(),
        "/openai/v1/models/ft%3Agpt-4o"
    );
}

// 2 ---------------------------------------------------------------------------

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let mut file = config_for(&upstream.base_url());
    file.limits.header_read_timeout = Duration::from_millis(500);
    file.limits.max_connections = Some(2);
    let proxy = spawn_proxy_with(file).await;

    // One sends nothing, one half the HTTP/2 preface: both fill the cap.
    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut half_preface = TcpStream::connect(proxy.addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();

    // A real client gets in once they are gone.
    let got = tokio::time::timeout(Duration::from_secs(5), get(&proxy.url("/")))
        .await
        .expect("a new client was locked out by silent connections");
    assert_eq!(got.status, 200);

    for stream in [&mut silent, &mut half_preface] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the silent connection stayed open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(4));
}

// 3 ---------------------------------------------------------------------------

#[tokio::test]
async fn a_stalled_request_body_gets_a_408_and_gives_its_memory_back() {
    let upstream = spawn_upstream(|_| Reply::json(200, r#"{"ok":true}"#)).await;
    let proxy = spawn_proxy_with(routed(
        &upstream.base_url(),
        "",
        "limits:\n  body_read_timeout: 500ms\n  max_body_size: 1MiB\n  max_buffered_bytes: 1MiB\n",
    ))
    .await;

    // Declares 700 KiB, sends a little and stalls.
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 716800\r\n\r\n{\"model\":\"m\"")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Its 700 KiB are reserved: another 700 KiB body does not fit the budget.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 716800\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut second, Duration::from_secs(5)).await,
        Some(503)
    );

    let started = Instant::now();
    assert_eq!(
        status_of(&mut stalled, Duration::from_secs(5)).await,
        Some(408)
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // The budget is back: a normal request goes through.
    let got = post(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"m","messages":[]}"#,
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(upstream.requests().len() == 1);
}

#[tokio::test]
async fn a_stalled_streamed_body_gets_a_408() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let mut file = config_for(&upstream.base_url());
    file.limits.body_read_timeout = Duration::from_millis(500);
    let proxy = spawn_proxy_with(file).await;
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\nabc")
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut stalled, Duration::from_secs(5)).await,
        Some(408)
    );
}

// 4 ---------------------------------------------------------------------------

#[tokio::test]
async fn h2_multiplexing_stays_within_the_in_flight_cap() {
    let upstream = spawn_upstream(|_| {
        let mut reply = Reply::json(200, "{}");
        reply.head_delay = Duration::from_millis(300);
        reply
    })
    .await;
    let mut file = config_for(&upstream.base_url());
    file.limits.max_connections = Some(2);
    let proxy = spawn_proxy_with(file).await;

    let client = h2_client();
    let mut tasks = Vec::new();
    for _ in 0..150 {
        let client = client.clone();
        let url = proxy.url("/v1/models");
        tasks.push(tokio::spawn(async move {
            let response = client
                .request(Request::get(url).body(Full::default()).unwrap())
                .await
                .unwrap();
            response.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + busy, 150, "{statuses:?}");
    assert!(ok >= 2, "{statuses:?}");
    let sockets = upstream.opened.load(Ordering::SeqCst);
    assert!(
        sockets <= 2,
        "{sockets} upstream sockets for max_connections: 2"
    );
}

// 5 ---------------------------------------------------------------------------

#[tokio::test]
async fn a_chunked_answer_with_a_content_length_arrives_whole() {
    for length in ["5", "100"] {
        let answer: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n"
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let addr = spawn_raw_upstream(answer, true).await;
        let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
        let response = client()
            .request(
                Request::get(proxy.url("/v1/models"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_ne!(
            response
                .headers()
                .get("content-length")
                .map(|v| v.as_bytes()),
            Some(length.as_bytes())
        );
        let body = response.into_body().collect().await;
        assert_eq!(
            &body.expect("the answer arrived broken").to_bytes()[..],
            b"hello world",
            "content-length {length}"
        );
    }
}

// 6 ---------------------------------------------------------------------------

#[tokio::test]
async fn absurd_retry_after_values_do_not_panic_a_routed_request() {
    for (name, value) in [("retry-after", "1e20"), ("retry-after-ms", "1e30")] {
        let upstream = spawn_upstream(move |_| {
            Reply::json(429, r#"{"error":{"message":"slow down"}}"#).header(name, value)
        })
        .await;
        let proxy = spawn_proxy_with(routed(
            &upstream.base_url(),
            "    retry:\n      backoff: 1ms\n",
            "",
        ))
        .await;
        let got = post(&proxy.url("/v1/chat/completions"), r#"{"model":"m"}"#).await;
        // Over the retry-after cap: the upstream's own answer, untouched.
        assert_eq!(got.status, 429, "{name}: {value}");
        assert_eq!(got.header(name), Some(value));
        assert_eq!(&got.body[..], br#"{"error":{"message":"slow down"}}"#);
    }
}

// 7 ---------------------------------------------------------------------------

#[tokio::test]
async fn the_connect_timeout_covers_the_tls_handshake() {
    // Accepts TCP, never answers the ClientHello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut file = config_for(&format!("https://{addr}/v1"));
    file.upstream.timeouts.connect = Duration::from_millis(300);
    file.upstream.timeouts.response_headers = Duration::from_secs(20);
    let proxy = spawn_proxy_with(file).await;
    let started = Instant::now();
    let got = get(&proxy.url("/v1/models")).await;
    assert_proxy_error(&got, 504, "upstream_connect_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

// 8 ---------------------------------------------------------------------------

#[tokio::test]
async fn a_large_400_passes_through_whole_with_context_window_fallbacks() {
    let big = format!(
        r#"{{"error":{{"message":"{}","code":"invalid_value"}}}}"#,
        "x".repeat(200 * 1024)
    );
    let body = big.clone();
    let a = spawn_upstream(move |_| Reply::json(400, &body)).await;
    let b = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let yaml = format!(
        "upstreams:\n  a:\n    base_url: {}\n  b:\n    base_url: {}\nmodels:\n  small:\n    context_window_fallbacks: [big]\n    deployments:\n      - upstream: a\n  big:\n    deployments:\n      - upstream: b\n",
        a.base_url(),
        b.base_url()
    );
    let proxy = spawn_proxy_with(config(&yaml)).await;
    let got = post(&proxy.url("/v1/chat/completions"), r#"{"model":"small"}"#).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.body.len(), big.len());
    assert!(got.body == big.as_bytes());
    assert!(b.requests().is_empty());
}

// 9 ---------------------------------------------------------------------------

#[tokio::test]
async fn an_unasked_for_101_is_a_502() {
    let addr = spawn_raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        false,
    )
    .await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    let got = get(&proxy.url("/v1/models")).await;
    assert_proxy_error(&got, 502, "upstream_protocol_error");
}

// 10 --------------------------------------------------------------------------

#[tokio::test]
async fn connect_and_trace_are_refused_with_405() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    for method in ["CONNECT", "TRACE"] {
        let (answer, _) = raw_exchange(
            proxy.addr,
            format!(
                "{method} /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 405"), "{method}: {answer}");
        assert!(answer.contains("method_not_allowed"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("allow: get"),
            "{answer}"
        );
    }
    assert!(upstream.requests().is_empty());
}

// Decisions -------------------------------------------------------------------

#[tokio::test]
async fn wrong_admin_tokens_are_throttled() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy_with(config(&format!(
        "upstream:\n  base_url: {}\nadmin:\n  token: the-right-admin-token\n",
        upstream.base_url()
    )))
    .await;
    let ask = |token: &'static str| {
        let url = proxy.url("/admin/status");
        async move {
            send(
                Request::get(url)
                    .header("authorization", format!("Bearer {token}"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .status
            .as_u16()
        }
    };
    // 25 guesses: whichever second they fall in, one second sees at least
    // 13 of them, so the throttle must answer at least one with 429.
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(ask("a-wrong-admin-token").await);
    }
    assert!(statuses.contains(&401), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // Throttled means throttled: the right token waits for the next second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ask("the-right-admin-token").await, 200);
}

#[tokio::test]
async fn a_client_halfway_through_its_headers_does_not_hold_shutdown() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let mut file = config_for(&upstream.base_url());
    file.limits.header_read_timeout = Duration::from_secs(15);
    file.shutdown_timeout = Duration::from_secs(20);
    let mut proxy = spawn_proxy_with(file).await;
    let mut half = TcpStream::connect(proxy.addr).await.unwrap();
    half.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let silent = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.task)
        .await
        .expect("shutdown waited for a client that never finished its headers")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(silent);
}

#[tokio::test]
async fn an_absurd_content_length_is_refused_before_the_upstream() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    let (answer, _) = raw_exchange(
        proxy.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    // hyper refuses this length itself (431) before llmproxy sees a request.
    assert!(
        answer.starts_with("HTTP/1.1 4"),
        "not refused with a 4xx: {answer}"
    );
    let (answer, _) = raw_exchange(
        proxy.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(upstream.requests().is_empty());
}
