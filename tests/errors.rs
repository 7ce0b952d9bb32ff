//! Upstream errors pass through untouched; the proxy's own failures are
//! OpenAI-shaped JSON with an honest status.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn assert_proxy_error(got: &Got, status: u16, code: &str) {
    assert_eq!(got.status, status, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.header("content-type"), Some("application/json"));
    let json = got.json();
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(json["error"]["type"].is_string());
}

#[tokio::test]
async fn upstream_error_answers_reach_the_client_as_they_were_streamed_or_not() {
    for status in [400u16, 401, 404, 429, 500, 503] {
        let body = format!(
            r#"{{"error":{{"message":"upstream says {status}","type":"upstream_type","param":null,"code":"c{status}"}}}}"#
        );
        let upstream_body = body.clone();
        let upstream = spawn_upstream(move |_| {
            Reply::json(status, &upstream_body)
                .header("retry-after", "7")
                .header("x-ratelimit-remaining-tokens", "0")
                .header("x-request-id", "req_err")
        })
        .await;
        let proxy = spawn_proxy(&upstream).await;
        for stream in [false, true] {
            let request = format!(r#"{{"model":"gpt-4o","stream":{stream},"messages":[]}}"#);
            let got = post(&proxy.url("/v1/chat/completions"), request).await;
            assert_eq!(got.status, status, "stream={stream}");
            assert_eq!(got.body, body.as_bytes(), "status {status} stream={stream}");
            assert_eq!(got.header("retry-after"), Some("7"));
            assert_eq!(got.header("x-ratelimit-remaining-tokens"), Some("0"));
            assert_eq!(got.header("x-request-id"), Some("req_err"));
            assert_eq!(got.header("content-type"), Some("application/json"));
        }
    }
}

#[tokio::test]
async fn refused_connection_is_a_502_in_the_openai_shape() {
    // Bind, note the port, close: nothing listens there any more.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_proxy_error(&got, 502, "upstream_unreachable");
    assert_eq!(got.json()["error"]["type"], "proxy_error");
    assert!(got.header("x-llmproxy-request-id").is_some());
}

#[tokio::test]
async fn unresolvable_host_is_a_502() {
    // `.invalid` never resolves (RFC 6761); the resolver answers at once.
    let mut file = config_for("http://llmproxy-test.invalid/v1");
    file.upstream.timeouts.connect = Duration::from_secs(5);
    let proxy = spawn_proxy_with(file).await;
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    // A resolver that cannot be reached times out instead; either way the client
    // gets an honest gateway error, never a 200 or a hang.
    assert!(matches!(got.status.as_u16(), 502 | 504), "{}", got.status);
}

#[tokio::test]
async fn upstream_that_never_answers_is_a_504_after_the_response_headers_timeout() {
    let upstream = spawn_upstream(|_| {
        let mut reply = Reply::json(200, "{}");
        reply.head_delay = Duration::from_secs(30);
        reply
    })
    .await;
    let mut file = config_for(&upstream.base_url());
    file.upstream.timeouts.response_headers = Duration::from_millis(300);
    let proxy = spawn_proxy_with(file).await;
    let start = Instant::now();
    let got = post(&proxy.url("/v1/chat/completions"), r#"{"stream":true}"#).await;
    let waited = start.elapsed();
    assert_proxy_error(&got, 504, "upstream_timeout");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test]
async fn connect_timeout_is_a_504() {
    // A listener with a full accept queue drops new SYNs, so connect hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(stream);
        }
    }
    let mut file = config_for(&format!("http://{addr}/v1"));
    file.upstream.timeouts.connect = Duration::from_millis(300);
    let proxy = spawn_proxy_with(file).await;
    let start = Instant::now();
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_proxy_error(&got, 504, "upstream_connect_timeout");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(listener);
}

#[tokio::test]
async fn garbage_from_the_upstream_is_a_502() {
    let addr = spawn_raw_upstream(b"this is not http\r\n\r\n", true).await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_proxy_error(&got, 502, "upstream_protocol_error");
}

#[tokio::test]
async fn upstream_closing_without_an_answer_is_a_502() {
    let addr = spawn_raw_upstream(b"", true).await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_eq!(got.status, 502);
}

#[tokio::test]
async fn declared_body_over_the_limit_is_a_413_before_the_upstream_is_asked() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let mut file = config_for(&upstream.base_url());
    file.limits.max_body_size = llmproxy::config::ByteSize(1024);
    let proxy = spawn_proxy_with(file).await;

    // Only the head is sent: the proxy must answer from Content-Length alone.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains(r#""code":"request_too_large""#), "{text}");
    assert!(text.contains("1024"), "the limit is named: {text}");
    assert!(upstream.requests().is_empty());

    // At the limit exactly, it passes.
    let got = post(&proxy.url("/v1/chat/completions"), vec![b'x'; 1024]).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn streamed_body_over_the_limit_is_a_413() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let mut file = config_for(&upstream.base_url());
    file.limits.max_body_size = llmproxy::config::ByteSize(64 * 1024);
    let proxy = spawn_proxy_with(file).await;

    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // 80 KiB in 8 KiB chunks, without the final chunk: the proxy must give up
    // on its own once the limit is crossed.
    let chunk = vec![b'a'; 8192];
    for _ in 0..10 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains(r#""code":"request_too_large""#), "{text}");
}

#[tokio::test]
async fn malformed_requests_get_a_400_and_the_proxy_keeps_serving() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
    ] {
        let (answer, _) = raw_exchange(proxy.addr, garbage, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }
    assert_eq!(get(&proxy.url("/")).await.status, 200, "still serving");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn https_upstreams_speak_tls_offering_http2_and_a_failed_handshake_is_a_502() {
    // A raw server that records the first bytes the proxy sends, then hangs up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut hello = vec![0u8; 4096];
        let n = stream.read(&mut hello).await.unwrap();
        hello.truncate(n);
        let _ = tx.send(hello);
        // Not TLS: the handshake must fail cleanly.
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    });
    let proxy =
        spawn_proxy_with(config_for(&format!("https://localhost:{}/v1", addr.port()))).await;
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_proxy_error(&got, 502, "upstream_unreachable");

    let hello = rx.await.unwrap();
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    let contains = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"localhost"), "SNI names the host");
    assert!(contains(b"\x02h2"), "ALPN offers HTTP/2");
    assert!(contains(b"\x08http/1.1"), "ALPN offers HTTP/1.1");
}
