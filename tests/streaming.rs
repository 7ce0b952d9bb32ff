//! Streaming: chunks arrive as they are sent, byte-exact; cancellation and
//! upstream failures propagate; a slow client gets backpressure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STREAM_REQUEST: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
    Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"stream\":true}";

#[tokio::test]
async fn each_chunk_reaches_the_client_as_the_upstream_sends_it() {
    let gap = Duration::from_millis(300);
    let upstream = spawn_upstream(move |_| {
        Reply::sse(
            (0..5)
                .map(|i| {
                    (
                        if i == 0 { Duration::ZERO } else { gap },
                        event(&format!("{i}")),
                    )
                })
                .collect(),
        )
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;

    let start = Instant::now();
    let response = open_stream(&proxy.url("/v1/chat/completions")).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            arrivals.push(start.elapsed());
            received.extend_from_slice(&data);
        }
    }
    let expected: Vec<u8> = (0..5)
        .flat_map(|i| event(&i.to_string()).to_vec())
        .collect();
    assert_eq!(received, expected);
    // The first chunk is in hand long before the upstream even sends the last (1.2 s).
    assert!(
        arrivals[0] < Duration::from_millis(250),
        "first chunk after {:?}",
        arrivals[0]
    );
    assert!(*arrivals.last().unwrap() >= Duration::from_millis(1200));
    assert!(arrivals.len() >= 5, "chunks were merged: {arrivals:?}");
    // Each chunk arrives about when it was sent: never held for the next one.
    for pair in arrivals.windows(2) {
        let spacing = pair[1] - pair[0];
        assert!(
            spacing > Duration::from_millis(150),
            "chunks held back: {arrivals:?}"
        );
    }
}

#[tokio::test]
async fn multibyte_utf8_split_across_chunks_is_forwarded_byte_exact() {
    let text = "data: {\"content\":\"héllo 世界 👋 𝄞\"}\n\n"
        .as_bytes()
        .to_vec();
    // Split inside every multi-byte character.
    let pieces: Vec<(Duration, Bytes)> = text
        .chunks(3)
        .map(|c| (Duration::from_millis(2), Bytes::copy_from_slice(c)))
        .collect();
    let upstream = spawn_upstream(move |_| Reply::sse(pieces.clone())).await;
    let proxy = spawn_proxy(&upstream).await;
    let got = post(&proxy.url("/v1/chat/completions"), r#"{"stream":true}"#).await;
    assert_eq!(got.body, text);
}

#[tokio::test]
async fn client_disconnect_mid_stream_closes_the_upstream_connection() {
    let upstream = spawn_upstream(|_| {
        Reply::sse(
            (0..200)
                .map(|i| (Duration::from_millis(50), event(&i.to_string())))
                .collect(),
        )
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;

    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(STREAM_REQUEST).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert_eq!(upstream.closed.load(Ordering::SeqCst), 0);
    drop(stream);

    let took = upstream
        .wait_closed(1, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The upstream stopped before its 10 s answer was sent.
    assert!(upstream.sent_bytes.load(Ordering::SeqCst) < 200 * 8);
}

#[tokio::test]
async fn client_disconnect_before_response_headers_cancels_the_upstream_request() {
    let upstream = spawn_upstream(|_| {
        let mut reply = Reply::json(200, "{}");
        reply.head_delay = Duration::from_secs(30);
        reply
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(STREAM_REQUEST).await.unwrap();
    // Wait until the upstream holds the request, then leave.
    tokio::time::timeout(Duration::from_secs(5), async {
        while upstream.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    drop(stream);
    upstream
        .wait_closed(1, Duration::from_secs(1))
        .await
        .unwrap();
}

/// Reads a raw HTTP/1.1 response and reports whether its body was complete.
async fn read_until_end(stream: &mut tokio::net::TcpStream) -> (Vec<u8>, bool) {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the proxy neither finished nor aborted the response"),
        }
    }
    let text = String::from_utf8_lossy(&all).to_string();
    let complete = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        text.ends_with("\r\n0\r\n\r\n")
    } else {
        let head_end = text.find("\r\n\r\n").unwrap() + 4;
        let length: usize = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        all.len() - head_end == length
    };
    (all, complete)
}

#[tokio::test]
async fn upstream_dying_mid_stream_never_looks_complete_downstream() {
    for sized in [false, true] {
        let upstream = spawn_upstream(move |_| {
            let mut reply = Reply::sse(
                (0..3)
                    .map(|i| (Duration::from_millis(20), event(&i.to_string())))
                    .collect(),
            );
            reply.end = End::Abort;
            if sized {
                // Declares more than it sends, then dies: a truncated sized body.
                reply.sized = true;
                reply.missing = 100;
            }
            reply
        })
        .await;
        let proxy = spawn_proxy(&upstream).await;

        // Raw: the wire must show an abnormal end.
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(STREAM_REQUEST).await.unwrap();
        let (bytes, complete) = read_until_end(&mut stream).await;
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("data: 2"),
            "the chunks before the failure arrive: {text}"
        );
        assert!(
            !complete,
            "sized={sized}: a truncated stream looked complete: {text}"
        );
    }
}

#[tokio::test]
async fn a_real_client_sees_an_error_when_the_upstream_dies() {
    let upstream = spawn_dying_upstream().await;
    let proxy = spawn_proxy(&upstream).await;
    let (status, aborted) = post_expecting_abort(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_eq!(status, 200);
    assert!(aborted, "body must fail, not end cleanly");
}

#[tokio::test]
async fn a_stream_silent_past_the_idle_timeout_is_aborted() {
    let upstream = spawn_upstream(|_| {
        let mut reply = Reply::sse(vec![(Duration::ZERO, event("first"))]);
        reply.end = End::Hang;
        reply
    })
    .await;
    let mut file = config_for(&upstream.base_url());
    file.upstream.timeouts.idle = Duration::from_millis(300);
    let proxy = spawn_proxy_with(file).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(STREAM_REQUEST).await.unwrap();
    let start = Instant::now();
    let (bytes, complete) = read_until_end(&mut stream).await;
    assert!(String::from_utf8_lossy(&bytes).contains("data: first"));
    assert!(!complete);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    upstream
        .wait_closed(1, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn long_generations_are_not_cut_while_chunks_keep_coming() {
    // 1.5 s in all, but never more than 100 ms of silence under a 400 ms idle timeout.
    let upstream = spawn_upstream(|_| {
        Reply::sse(
            (0..15)
                .map(|i| (Duration::from_millis(100), event(&i.to_string())))
                .collect(),
        )
    })
    .await;
    let mut file = config_for(&upstream.base_url());
    file.upstream.timeouts.idle = Duration::from_millis(400);
    let proxy = spawn_proxy_with(file).await;
    let got = post(&proxy.url("/v1/chat/completions"), r#"{"stream":true}"#).await;
    assert_eq!(
        got.body.len(),
        (0..15)
            .map(|i: i32| event(&i.to_string()).len())
            .sum::<usize>()
    );
}

#[tokio::test]
async fn a_slow_client_applies_backpressure_instead_of_growing_memory() {
    // 64 MiB offered as fast as possible to a client that reads nothing.
    let total = 64 * 1024 * 1024;
    let upstream = spawn_upstream(move |_| {
        let chunk = Bytes::from(vec![b'z'; 64 * 1024]);
        let mut reply = Reply::sse(
            (0..total / chunk.len())
                .map(|_| (Duration::ZERO, chunk.clone()))
                .collect(),
        );
        reply.sized = true;
        reply
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(STREAM_REQUEST).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let buffered = upstream.sent_bytes.load(Ordering::SeqCst);
    // What is in flight is bounded by socket buffers and a chunk or two of
    // proxy buffering, far below the 64 MiB offered.
    assert!(
        buffered < 24 * 1024 * 1024,
        "{} MiB buffered for a stalled client",
        buffered >> 20
    );

    // And once the client reads, everything arrives.
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        received += n;
        if received >= total {
            break;
        }
    }
    assert!(received >= total, "received {received} of {total}");
}
