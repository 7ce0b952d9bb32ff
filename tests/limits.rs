//! Protection limits: slow header senders and connection caps.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let mut file = config_for(&upstream.base_url());
    file.limits.header_read_timeout = Duration::from_millis(500);
    let proxy = spawn_proxy_with(file).await;

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was kept open");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(upstream.requests().is_empty());
    // The proxy still serves everyone else.
    assert_eq!(get(&proxy.url("/")).await.status, 200);
}

#[tokio::test]
async fn connections_over_the_limit_wait_until_one_closes() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let mut file = config_for(&upstream.base_url());
    file.limits.max_connections = Some(2);
    let proxy = spawn_proxy_with(file).await;

    const HEALTH: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(HEALTH).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream); // keep-alive: the connection stays open
    }

    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    third.write_all(HEALTH).await.unwrap();
    let mut buf = vec![0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served past the limit of 2"
    );

    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[tokio::test]
async fn default_body_limit_takes_a_32_mib_image_payload() {
    // A base64 image request of ~20 MiB must pass with the default limit.
    let upstream =
        spawn_upstream(|r| Reply::json(200, &format!(r#"{{"got":{}}}"#, r.body.len()))).await;
    let proxy = spawn_proxy(&upstream).await;
    let image = "A".repeat(20 * 1024 * 1024);
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}]}}"#
    );
    let len = body.len();
    let got = post(&proxy.url("/v1/chat/completions"), body).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["got"], len);
}
