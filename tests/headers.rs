//! Header policy as the upstream and the client see it on the wire.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

fn with_defaults(upstream: &Upstream, defaults: &[(&str, &str)]) -> llmproxy::config::FileConfig {
    let mut yaml = format!(
        "upstream:\n  base_url: {}\n  default_headers:\n",
        upstream.base_url()
    );
    for (name, value) in defaults {
        yaml.push_str(&format!("    {name}: \"{value}\"\n"));
    }
    llmproxy::config::parse(&yaml, "test").unwrap()
}

fn all<'a>(r: &'a Recorded, name: &str) -> Vec<&'a str> {
    r.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

#[tokio::test]
async fn default_headers_override_client_headers_case_insensitively_once() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy_with(with_defaults(
        &upstream,
        &[
            ("authorization", "Bearer y"),
            ("OpenAI-Organization", "org-proxy"),
        ],
    ))
    .await;
    // Raw bytes so the client's header casing and duplicates reach the proxy as written.
    let request = "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n\
                   AUTHORIZATION: Bearer x\r\nAuthorization: Bearer x2\r\n\
                   openai-organization: org-client\r\nX-Client: kept\r\n\
                   Content-Length: 2\r\nConnection: close\r\n\r\n{}";
    let (answer, _) = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let seen = &upstream.requests()[0];
    assert_eq!(all(seen, "authorization"), ["Bearer y"]);
    assert_eq!(all(seen, "openai-organization"), ["org-proxy"]);
    assert_eq!(all(seen, "x-client"), ["kept"]);
}

#[tokio::test]
async fn default_headers_are_interpolated_from_the_environment() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let env = |name: &str| (name == "UPSTREAM_KEY").then(|| "sk-from-env".to_owned());
    let file = with_defaults(&upstream, &[("Authorization", "Bearer ${UPSTREAM_KEY}")]);
    let proxy = spawn_proxy_env(file, &env).await;
    post(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_eq!(
        all(&upstream.requests()[0], "authorization"),
        ["Bearer sk-from-env"]
    );
}

#[tokio::test]
async fn client_headers_pass_through_with_every_value_in_order() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    let request = "POST /v1/embeddings HTTP/1.1\r\nHost: proxy\r\n\
                   X-Tag: a\r\nX-Tag: b\r\nx-tag: c\r\nX-Request-Id: client-id-1\r\n\
                   Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    let seen = &upstream.requests()[0];
    assert_eq!(all(seen, "x-tag"), ["a", "b", "c"]);
    assert_eq!(all(seen, "x-request-id"), ["client-id-1"]);
    assert_eq!(all(seen, "content-type"), ["application/json"]);
}

#[tokio::test]
async fn hop_by_hop_headers_never_reach_the_upstream_and_host_is_the_upstreams() {
    let upstream = spawn_upstream(|_| Reply::json(200, "{}")).await;
    let proxy = spawn_proxy(&upstream).await;
    let request = "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy.example\r\n\
                   Connection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: 1\r\n\
                   Keep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
                   TE: trailers\r\nTrailer: x-checksum\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n\
                   Transfer-Encoding: chunked\r\nX-End-To-End: yes\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let seen = &upstream.requests()[0];
    for name in [
        "connection",
        "x-hop-secret",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    ] {
        assert!(
            !seen.headers.contains_key(name),
            "{name} crossed: {:?}",
            seen.headers
        );
    }
    // The body is still streamed chunked, but that framing is the proxy's own
    // connection's: one value, set by the client library, not the client's copy.
    assert_eq!(all(seen, "transfer-encoding"), ["chunked"]);
    assert_eq!(all(seen, "host"), [upstream.addr.to_string().as_str()]);
    assert_eq!(all(seen, "x-end-to-end"), ["yes"]);
    assert_eq!(&seen.body[..], b"{}");
}

#[tokio::test]
async fn provider_headers_reach_the_client_and_hop_by_hop_ones_do_not() {
    // Raw upstream: a hyper server would manage `connection` itself.
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
        X-Request-Id: req_upstream_42\r\nOpenAI-Processing-Ms: 17\r\nOpenAI-Version: 2020-10-01\r\n\
        X-RateLimit-Remaining-Requests: 99\r\nX-RateLimit-Reset-Tokens: 6ms\r\nRetry-After: 1\r\n\
        Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\
        Connection: keep-alive, X-Upstream-Hop\r\nX-Upstream-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
        Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n{}";
    let addr = spawn_raw_upstream(ANSWER, false).await;
    let proxy = spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await;
    let got = post(&proxy.url("/v1/chat/completions"), "{}").await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], b"{}");
    for (name, value) in [
        ("x-request-id", "req_upstream_42"),
        ("openai-processing-ms", "17"),
        ("openai-version", "2020-10-01"),
        ("x-ratelimit-remaining-requests", "99"),
        ("x-ratelimit-reset-tokens", "6ms"),
        ("retry-after", "1"),
        ("content-type", "application/json"),
    ] {
        assert_eq!(got.header(name), Some(value), "{name}");
    }
    let cookies: Vec<&str> = got
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    for name in [
        "x-upstream-hop",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
    ] {
        assert!(
            !got.headers.contains_key(name),
            "{name} crossed to the client"
        );
    }
    assert!(got.header("x-llmproxy-request-id").is_some());
    assert_ne!(got.header("x-llmproxy-request-id"), Some("req_upstream_42"));
}
