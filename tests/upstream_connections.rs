//! Upstream connections: HTTP/1.1 connections reused one exchange at a
//! time and never after an unfinished answer; HTTP/2 (`http2: true`)
//! streams sharing connections up to the upstream's stream limit.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;

const CHAT: &str = r#"{"model":"m","messages":[]}"#;

fn slow_stream(events: usize, gap: Duration) -> Reply {
    Reply::sse(
        (0..events)
            .map(|i| {
                (
                    if i == 0 { Duration::ZERO } else { gap },
                    event(&i.to_string()),
                )
            })
            .collect(),
    )
}

fn expected_stream(events: usize) -> Vec<u8> {
    (0..events)
        .flat_map(|i| event(&i.to_string()).to_vec())
        .collect()
}

fn spawn_stream(url: String) -> tokio::task::JoinHandle<Got> {
    tokio::spawn(async move { post(&url, r#"{"stream":true}"#).await })
}

fn h2_config(upstream: &Upstream) -> llmproxy::config::FileConfig {
    let mut file = config_for(&upstream.base_url());
    file.upstream.http2 = true;
    file
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = spawn_upstream(|_| Reply::json(200, r#"{"ok":true}"#)).await;
    let proxy = spawn_proxy(&upstream).await;
    for _ in 0..5 {
        let got = post(&proxy.url("/v1/chat/completions"), CHAT).await;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], br#"{"ok":true}"#);
    }
    assert_eq!(upstream.opened.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.requests().len(), 5);
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.version == http::Version::HTTP_11)
    );
}

#[tokio::test]
async fn a_connection_whose_answer_was_left_unfinished_is_never_reused() {
    let upstream = spawn_upstream(|recorded| {
        if recorded.body.starts_with(b"{\"stream\"") {
            slow_stream(20, Duration::from_millis(100))
        } else {
            Reply::json(200, r#"{"ok":true}"#)
        }
    })
    .await;
    let proxy = spawn_proxy(&upstream).await;

    // The client reads the first event, then leaves.
    let mut body = open_stream(&proxy.url("/v1/chat/completions"))
        .await
        .into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, event("0"));
    drop(body);
    upstream
        .wait_closed(1, Duration::from_secs(5))
        .await
        .unwrap();

    // The next request gets a fresh connection and a whole, clean answer.
    let got = post(&proxy.url("/v1/chat/completions"), CHAT).await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], br#"{"ok":true}"#);
    assert_eq!(upstream.opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_upstream_that_closes_each_connection_after_answering_is_met_with_a_fresh_one() {
    // No `Connection: close`: the socket just closes after the answer, as a
    // server's idle timeout would.
    let addr = spawn_raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}",
        true,
    )
    .await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    for i in 0..20 {
        let got = post(&proxy.url("/v1/chat/completions"), CHAT).await;
        assert_eq!(got.status, 200, "request {i}: {:?}", got.body);
        assert_eq!(&got.body[..], br#"{"ok":true}"#, "request {i}");
        if i % 2 == 0 {
            // Half the time the close has surely arrived before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn http2_streams_share_one_upstream_connection() {
    let upstream = spawn_h2_upstream(100, |_| slow_stream(5, Duration::from_millis(50))).await;
    let proxy = spawn_proxy_with(h2_config(&upstream)).await;
    let url = proxy.url("/v1/chat/completions");
    // The first request opens the connection; the rest share it.
    assert_eq!(
        post(&url, r#"{"stream":true}"#).await.body,
        expected_stream(5)
    );
    let streams: Vec<_> = (0..10)
        .map(|_| spawn_stream(proxy.url("/v1/chat/completions")))
        .collect();
    for stream in streams {
        let got = stream.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, expected_stream(5));
    }
    assert_eq!(upstream.opened.load(Ordering::SeqCst), 1);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 11);
    for request in &requests {
        assert_eq!(request.version, http::Version::HTTP_2);
        // The target travels as :authority and :path; no Host header.
        assert_eq!(
            request.uri.authority().map(|a| a.as_str()),
            Some(upstream.addr.to_string().as_str())
        );
        assert_eq!(request.uri.path(), "/v1/chat/completions");
        assert!(request.headers.get("host").is_none());
    }
}

#[tokio::test]
async fn http2_opens_another_connection_when_the_upstream_stream_limit_is_reached() {
    let upstream = spawn_h2_upstream(2, |_| slow_stream(10, Duration::from_millis(50))).await;
    let proxy = spawn_proxy_with(h2_config(&upstream)).await;
    let url = proxy.url("/v1/chat/completions");
    // The limit is copied from the connection each time it takes a request:
    // after two, the upstream's SETTINGS (2 streams) are known.
    for _ in 0..2 {
        let got = post(&url, r#"{"stream":true}"#).await;
        assert_eq!(got.body, expected_stream(10));
    }
    let streams: Vec<_> = (0..5)
        .map(|_| spawn_stream(proxy.url("/v1/chat/completions")))
        .collect();
    for stream in streams {
        let got = stream.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, expected_stream(10));
    }
    // Five streams held at once, two per connection: three connections.
    assert_eq!(upstream.opened.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_http2_client_that_leaves_resets_only_its_own_stream() {
    let upstream = spawn_h2_upstream(100, |_| slow_stream(20, Duration::from_millis(100))).await;
    let proxy = spawn_proxy_with(h2_config(&upstream)).await;
    let url = proxy.url("/v1/chat/completions");

    let staying = spawn_stream(proxy.url("/v1/chat/completions"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut body = open_stream(&url).await.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        event("0")
    );
    drop(body);
    // The upstream stops sending to the stream that was left (its reset
    // reaches the upstream's body channel) while the other one goes on.
    let got = staying.await.unwrap();
    assert_eq!(got.body, expected_stream(20));
    assert_eq!(upstream.opened.load(Ordering::SeqCst), 1);
    assert!(
        upstream.sent_bytes.load(Ordering::SeqCst) < 2 * expected_stream(20).len(),
        "the left stream was sent whole"
    );
}

async fn through_raw(answer: &'static [u8], body: &'static str) -> Got {
    let addr = spawn_raw_upstream(answer, true).await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    post(&proxy.url("/v1/chat/completions"), body).await
}

#[tokio::test]
async fn interim_answers_are_skipped_and_the_final_one_passes() {
    let got = through_raw(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        CHAT,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], b"ok");
    assert!(got.header("link").is_none());
}

#[tokio::test]
async fn chunked_answers_with_extensions_and_trailers_arrive_whole() {
    let got = through_raw(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
          5;name=value\r\nhello\r\n7\r\n, world\r\n0\r\nx-checksum: 1\r\n\r\n",
        CHAT,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], b"hello, world");
}

#[tokio::test]
async fn an_answer_without_length_runs_to_the_close_and_is_not_reused() {
    let addr = spawn_raw_upstream(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true).await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    for _ in 0..3 {
        let got = post(&proxy.url("/v1/chat/completions"), CHAT).await;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], b"until the end");
    }
}

#[tokio::test]
async fn an_invalid_content_length_from_the_upstream_is_a_502() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5x\r\n\r\nhello"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        b"HTTP/1.1 2000 OK\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    ] {
        let got = through_raw(answer, CHAT).await;
        assert_eq!(got.status, 502, "{}", String::from_utf8_lossy(answer));
        assert_eq!(got.json()["error"]["code"], "upstream_protocol_error");
    }
}

#[tokio::test]
async fn a_broken_chunk_mid_body_aborts_the_answer() {
    let addr = spawn_raw_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        false,
    )
    .await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    let (status, aborted) =
        post_expecting_abort(&proxy.url("/v1/chat/completions"), r#"{"stream":true}"#).await;
    assert_eq!(status, 200);
    assert!(aborted, "a broken answer must never look complete");
}

#[tokio::test]
async fn uploads_stream_through_with_their_length_or_chunked() {
    let upstream = spawn_upstream(|r| Reply::json(200, &r.body.len().to_string())).await;
    let proxy = spawn_proxy(&upstream).await;
    // A sized body: sent with its Content-Length.
    let big = vec![b'x'; 300_000];
    let got = post(&proxy.url("/v1/uploads"), big.clone()).await;
    assert_eq!(&got.body[..], b"300000");
    // A body of unknown length: sent chunked, arriving whole.
    let (mut tx, body) = http_body_util::channel::Channel::<bytes::Bytes, std::io::Error>::new(4);
    let url = proxy.url("/v1/uploads");
    let sending = tokio::spawn(async move {
        for _ in 0..30 {
            tx.send_data(bytes::Bytes::from(vec![b'y'; 10_000]))
                .await
                .unwrap();
        }
    });
    let response =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http()
            .request(http::Request::post(url).body(body).unwrap())
            .await
            .unwrap();
    sending.await.unwrap();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&answer[..], b"300000");
    let requests = upstream.requests();
    assert_eq!(requests[0].headers["content-length"], "300000");
    assert_eq!(requests[1].headers["transfer-encoding"], "chunked");
    assert_eq!(requests[1].body.len(), 300_000);
}
