//! Model routing over the wire: several upstreams behind one endpoint.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::time::Duration;

use common::*;

/// Upstreams that answer with their own name, so the test sees who served.
async fn named(name: &'static str) -> Upstream {
    spawn_upstream(move |_| Reply::json(200, &format!(r#"{{"served_by":"{name}"}}"#))).await
}

fn routed(yaml_models: &str, upstreams: &[(&str, &Upstream)]) -> llmproxy::config::FileConfig {
    let mut yaml = String::from("upstreams:\n");
    for (name, upstream) in upstreams {
        yaml.push_str(&format!(
            "  {name}:\n    base_url: {}\n    default_headers:\n      Authorization: Bearer key-{name}\n",
            upstream.base_url()
        ));
    }
    yaml.push_str("models:\n");
    yaml.push_str(yaml_models);
    llmproxy::config::parse(&yaml, "test").unwrap()
}

/// Which upstream served each of `n` requests for model `m`, in order.
async fn served_by(proxy: &Proxy, n: usize) -> Vec<String> {
    let mut order = Vec::with_capacity(n);
    for _ in 0..n {
        let got = chat(proxy, "m").await;
        order.push(got.json()["served_by"].as_str().unwrap().to_owned());
    }
    order
}

async fn chat(proxy: &Proxy, model: &str) -> Got {
    post(
        &proxy.url("/v1/chat/completions"),
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#),
    )
    .await
}

#[tokio::test]
async fn requests_go_to_the_upstream_serving_their_model_with_its_own_key() {
    let (a, b) = (named("a").await, named("b").await);
    let models = "  gpt-4o:\n    deployments:\n      - upstream: a\n  llama:\n    deployments:\n      - upstream: b\n        model: meta-llama/Llama-3.1-8B\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;

    let got = chat(&proxy, "gpt-4o").await;
    assert_eq!(got.json()["served_by"], "a");
    assert_eq!(got.header("x-llmproxy-upstream"), Some("a"));
    assert_eq!(got.header("x-llmproxy-attempts"), Some("1"));
    assert_eq!(a.requests()[0].headers["authorization"], "Bearer key-a");

    let got = chat(&proxy, "llama").await;
    assert_eq!(got.json()["served_by"], "b");
    let seen = &b.requests()[0];
    assert_eq!(seen.headers["authorization"], "Bearer key-b");
    // Only the model value changed; every other byte is as the client sent it.
    assert_eq!(
        std::str::from_utf8(&seen.body).unwrap(),
        r#"{"model":"meta-llama/Llama-3.1-8B","messages":[{"role":"user","content":"hi"}]}"#
    );
    assert_eq!(seen.headers["content-length"], seen.body.len().to_string());
}

#[tokio::test]
async fn wildcard_routes_pass_the_requested_name_through() {
    let (a, b) = (named("a").await, named("b").await);
    let models = "  gpt-4o-mini:\n    deployments:\n      - upstream: b\n  gpt-*:\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;
    assert_eq!(chat(&proxy, "gpt-4.1-nano").await.json()["served_by"], "a");
    assert_eq!(chat(&proxy, "gpt-4o-mini").await.json()["served_by"], "b");
    assert!(
        std::str::from_utf8(&a.requests()[0].body)
            .unwrap()
            .contains(r#""model":"gpt-4.1-nano""#)
    );
}

#[tokio::test]
async fn unknown_models_and_bad_bodies_are_named_errors_and_never_forwarded() {
    let a = named("a").await;
    let models = "  gpt-4o:\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a)])).await;

    for (body, status, code, message) in [
        (
            r#"{"model":"gpt-5-ultra"}"#,
            404,
            "model_not_found",
            "gpt-5-ultra",
        ),
        (
            r#"{"model": "gpt-4o", "#,
            400,
            "bad_request",
            "not valid JSON",
        ),
        (
            r#"{"model": ["gpt-4o"]}"#,
            400,
            "bad_request",
            "`model` must be a string",
        ),
    ] {
        let got = post(&proxy.url("/v1/chat/completions"), body).await;
        assert_eq!(got.status, status, "{body}");
        let json = got.json();
        assert_eq!(json["error"]["code"], code, "{body}");
        let text = json["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{body}: {text}");
    }
    assert!(a.requests().is_empty());
}

#[tokio::test]
async fn the_model_list_is_the_configured_public_names() {
    let a = named("a").await;
    let models = "  gpt-4o:\n    deployments:\n      - upstream: a\n  claude-sonnet:\n    deployments:\n      - upstream: a\n        model: anthropic/claude-sonnet\n  gpt-*:\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a)])).await;
    let got = get(&proxy.url("/v1/models")).await;
    assert_eq!(got.status, 200);
    let json = got.json();
    let ids: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o", "claude-sonnet"]);
    assert_eq!(json["object"], "list");
    assert!(a.requests().is_empty(), "answered by the gateway itself");
}

#[tokio::test]
async fn requests_without_a_model_go_to_the_first_upstream() {
    let (a, b) = (named("a").await, named("b").await);
    let models = "  gpt-4o:\n    deployments:\n      - upstream: b\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;
    assert_eq!(get(&proxy.url("/v1/files")).await.json()["served_by"], "a");
    // A body that is not JSON (a multipart upload, say) is not read at all.
    let upload = send(
        http::Request::post(proxy.url("/v1/files"))
            .header("content-type", "multipart/form-data; boundary=x")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"--x--",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(upload.json()["served_by"], "a");
    assert_eq!(&a.requests()[1].body[..], b"--x--");
}

#[tokio::test]
async fn weights_split_the_traffic() {
    let (a, b) = (named("a").await, named("b").await);
    let models = "  m:\n    deployments:\n      - upstream: a\n        weight: 3\n      - upstream: b\n        weight: 1\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;
    for _ in 0..200 {
        chat(&proxy, "m").await;
    }
    let to_a = a.requests().len();
    assert_eq!(to_a + b.requests().len(), 200);
    // Expected 150; generous bounds keep this from ever flaking.
    assert!((110..=185).contains(&to_a), "a got {to_a} of 200");
}

#[tokio::test]
async fn least_in_flight_sends_new_requests_past_a_busy_deployment() {
    let slow = spawn_upstream(|_| {
        let mut reply = Reply::sse(vec![(Duration::from_secs(2), event("slow"))]);
        reply.headers.push(("x-who".into(), "slow".into()));
        reply
    })
    .await;
    let fast = named("fast").await;
    let models = "  m:\n    strategy: least_in_flight\n    deployments:\n      - upstream: slow\n      - upstream: fast\n";
    let proxy = spawn_proxy_with(routed(models, &[("slow", &slow), ("fast", &fast)])).await;
    // Occupy whichever deployment the first request lands on until it is the slow one.
    let mut held = Vec::new();
    while slow.requests().is_empty() {
        let url = proxy.url("/v1/chat/completions");
        held.push(tokio::spawn(
            async move { post(&url, r#"{"model":"m"}"#).await },
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy_before = slow.requests().len();
    for _ in 0..10 {
        assert_eq!(chat(&proxy, "m").await.json()["served_by"], "fast");
    }
    assert_eq!(slow.requests().len(), busy_before);
}

#[tokio::test]
async fn latency_strategy_prefers_the_fast_deployment() {
    let slow = spawn_upstream(|_| {
        let mut reply = Reply::json(200, r#"{"served_by":"slow"}"#);
        reply.head_delay = Duration::from_millis(150);
        reply
    })
    .await;
    let fast = named("fast").await;
    let models = "  m:\n    strategy: latency\n    deployments:\n      - upstream: slow\n      - upstream: fast\n";
    let proxy = spawn_proxy_with(routed(models, &[("slow", &slow), ("fast", &fast)])).await;
    for _ in 0..30 {
        chat(&proxy, "m").await;
    }
    // Unmeasured deployments are tried first, so the slow one gets a request
    // or two; after that both are measured and the fast one always wins.
    assert!(
        slow.requests().len() <= 3,
        "slow got {}",
        slow.requests().len()
    );
}

#[tokio::test]
async fn round_robin_alternates() {
    let (a, b) = (named("a").await, named("b").await);
    let models = "  m:\n    strategy: round_robin\n    deployments:\n      - upstream: a\n      - upstream: b\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;
    assert_eq!(served_by(&proxy, 6).await, ["a", "b", "a", "b", "a", "b"]);
}

#[tokio::test]
async fn the_single_upstream_shape_adds_no_routing_headers() {
    let a = named("a").await;
    let proxy = spawn_proxy(&a).await;
    let got = chat(&proxy, "anything").await;
    assert_eq!(got.json()["served_by"], "a");
    assert!(got.header("x-llmproxy-upstream").is_none());
    assert!(got.header("x-llmproxy-attempts").is_none());
    // And the body reaches the upstream untouched: nothing was parsed.
    assert!(
        std::str::from_utf8(&a.requests()[0].body)
            .unwrap()
            .contains(r#""model":"anything""#)
    );
}

/// An upstream that answers `status` (with `headers`) the first `fail` times, then 200.
async fn flaky(
    name: &'static str,
    status: u16,
    fail: usize,
    headers: &'static [(&'static str, &'static str)],
) -> Upstream {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    spawn_upstream(move |_| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < fail {
            let mut reply = Reply::json(
                status,
                &format!(r#"{{"error":{{"message":"{name} says {status}"}}}}"#),
            );
            for (k, v) in headers {
                reply = reply.header(k, v);
            }
            reply
        } else {
            Reply::json(200, &format!(r#"{{"served_by":"{name}"}}"#))
        }
    })
    .await
}

/// Model `m` on upstream `a`, which refuses connections, and on `b`.
async fn dead_a_then_b(b: &Upstream, strategy_and_retry: &str) -> llmproxy::config::FileConfig {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "upstreams:\n  a:\n    base_url: http://{dead}/v1\n  b:\n    base_url: {}\nmodels:\n{}",
        b.base_url(),
        pair(strategy_and_retry)
    );
    llmproxy::config::parse(&yaml, "test").unwrap()
}

fn pair(strategy_and_retry: &str) -> String {
    format!(
        "  m:\n{strategy_and_retry}    deployments:\n      - upstream: a\n      - upstream: b\n"
    )
}

#[tokio::test]
async fn retryable_answers_are_retried_on_the_other_deployment() {
    for status in [429u16, 500, 502, 503, 504] {
        let a = flaky("a", status, usize::MAX, &[]).await;
        let b = named("b").await;
        // Round robin starts at a, so the first attempt always fails.
        let models = pair("    strategy: round_robin\n    retry:\n      backoff: 1ms\n");
        let proxy = spawn_proxy_with(routed(&models, &[("a", &a), ("b", &b)])).await;
        let got = chat(&proxy, "m").await;
        assert_eq!(got.status, 200, "status {status}");
        assert_eq!(got.json()["served_by"], "b");
        assert_eq!(got.header("x-llmproxy-attempts"), Some("2"));
        assert_eq!(got.header("x-llmproxy-upstream"), Some("b"));
        assert_eq!(a.requests().len(), 1);
        // The retry carries the same body.
        assert_eq!(a.requests()[0].body, b.requests()[0].body);
    }
}

#[tokio::test]
async fn an_unreachable_deployment_is_retried_elsewhere() {
    let b = named("b").await;
    let proxy = spawn_proxy_with(
        dead_a_then_b(
            &b,
            "    strategy: round_robin\n    retry:\n      backoff: 1ms\n",
        )
        .await,
    )
    .await;
    let got = chat(&proxy, "m").await;
    assert_eq!(got.json()["served_by"], "b");
    assert_eq!(got.header("x-llmproxy-attempts"), Some("2"));
}

#[tokio::test]
async fn client_errors_are_never_retried() {
    for status in [400u16, 401, 403, 404, 413, 422] {
        let a = flaky("a", status, usize::MAX, &[]).await;
        let b = named("b").await;
        let models = pair("    strategy: round_robin\n    retry:\n      backoff: 1ms\n");
        let proxy = spawn_proxy_with(routed(&models, &[("a", &a), ("b", &b)])).await;
        let got = chat(&proxy, "m").await;
        assert_eq!(got.status, status);
        assert_eq!(got.json()["error"]["message"], format!("a says {status}"));
        assert_eq!(got.header("x-llmproxy-attempts"), Some("1"));
        assert!(b.requests().is_empty(), "{status} was retried");
    }
}

#[tokio::test]
async fn when_attempts_run_out_the_last_answer_reaches_the_client_as_it_was() {
    let a = flaky("a", 503, usize::MAX, &[("retry-after", "0")]).await;
    let b = flaky("b", 503, usize::MAX, &[]).await;
    let models =
        pair("    strategy: round_robin\n    retry:\n      attempts: 3\n      backoff: 1ms\n");
    let proxy = spawn_proxy_with(routed(&models, &[("a", &a), ("b", &b)])).await;
    let got = chat(&proxy, "m").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-llmproxy-attempts"), Some("3"));
    assert_eq!(a.requests().len() + b.requests().len(), 3);
}

#[tokio::test]
async fn retry_after_is_honoured_up_to_its_cap() {
    // One deployment: the retry has to wait for it.
    let a = flaky("a", 429, 1, &[("retry-after-ms", "600")]).await;
    let models = "  m:\n    retry:\n      backoff: 1ms\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a)])).await;
    let start = std::time::Instant::now();
    let got = chat(&proxy, "m").await;
    assert_eq!(got.status, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(550),
        "{:?}",
        start.elapsed()
    );

    // Over the cap: not worth waiting, the 429 goes back at once.
    let a = flaky("a", 429, 1, &[("retry-after", "30")]).await;
    let models =
        "  m:\n    retry:\n      retry_after_cap: 1s\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a)])).await;
    let start = std::time::Instant::now();
    let got = chat(&proxy, "m").await;
    assert_eq!(got.status, 429);
    assert_eq!(got.header("retry-after"), Some("30"));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_client_that_leaves_during_backoff_stops_the_attempt_chain() {
    let a = flaky("a", 503, usize::MAX, &[("retry-after", "2")]).await;
    let models = "  m:\n    retry:\n      attempts: 5\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a)])).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let body = r#"{"model":"m"}"#;
    stream
        .write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.requests().len(), 1);
    drop(stream);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        a.requests().len(),
        1,
        "a retry was sent after the client left"
    );
}

#[tokio::test]
async fn a_stream_that_fails_after_its_first_bytes_is_never_retried() {
    let a = spawn_dying_upstream().await;
    let b = named("b").await;
    let models = pair("    strategy: round_robin\n    retry:\n      backoff: 1ms\n");
    let proxy = spawn_proxy_with(routed(&models, &[("a", &a), ("b", &b)])).await;
    let url = proxy.url("/v1/chat/completions");
    let (status, aborted) = post_expecting_abort(&url, r#"{"model":"m","stream":true}"#).await;
    assert_eq!(status, 200);
    assert!(aborted, "the failure must show");
    assert!(
        b.requests().is_empty(),
        "a started stream was retried elsewhere"
    );
}

#[tokio::test]
async fn exhausted_models_fall_back_in_order_with_the_fallbacks_name() {
    let a = flaky("a", 503, usize::MAX, &[]).await;
    let b = flaky("b", 500, usize::MAX, &[]).await;
    let c = named("c").await;
    let models = "  big:\n    retry:\n      attempts: 2\n      backoff: 1ms\n    fallbacks: [medium, small]\n    deployments:\n      - upstream: a\n  medium:\n    retry:\n      attempts: 1\n    deployments:\n      - upstream: b\n  small:\n    deployments:\n      - upstream: c\n        model: small-2024\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b), ("c", &c)])).await;
    let got = chat(&proxy, "big").await;
    assert_eq!(got.json()["served_by"], "c");
    assert_eq!(got.header("x-llmproxy-attempts"), Some("4"));
    assert_eq!((a.requests().len(), b.requests().len()), (2, 1));
    let body = |u: &Upstream| String::from_utf8(u.requests()[0].body.to_vec()).unwrap();
    assert!(body(&b).contains(r#""model":"medium""#), "{}", body(&b));
    assert!(body(&c).contains(r#""model":"small-2024""#), "{}", body(&c));
}

#[tokio::test]
async fn context_length_errors_go_to_the_bigger_model() {
    let small = spawn_upstream(|_| {
        Reply::json(400, r#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#)
    })
    .await;
    let big = named("big").await;
    let models = "  small:\n    context_window_fallbacks: [big]\n    deployments:\n      - upstream: s\n  big:\n    deployments:\n      - upstream: b\n";
    let proxy = spawn_proxy_with(routed(models, &[("s", &small), ("b", &big)])).await;
    let got = chat(&proxy, "small").await;
    assert_eq!(got.json()["served_by"], "big");
    assert_eq!(got.header("x-llmproxy-attempts"), Some("2"));
    assert!(
        String::from_utf8(big.requests()[0].body.to_vec())
            .unwrap()
            .contains(r#""model":"big""#)
    );

    // Any other 400 is the client's problem and goes back as it was.
    let other = spawn_upstream(|_| {
        Reply::json(
            400,
            r#"{"error":{"message":"bad temperature","code":"invalid_value"}}"#,
        )
    })
    .await;
    let models = "  small:\n    context_window_fallbacks: [big]\n    deployments:\n      - upstream: s\n  big:\n    deployments:\n      - upstream: b\n";
    let big2 = named("big").await;
    let proxy = spawn_proxy_with(routed(models, &[("s", &other), ("b", &big2)])).await;
    let got = chat(&proxy, "small").await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["message"], "bad temperature");
    assert!(big2.requests().is_empty());
}

#[tokio::test]
async fn a_failing_deployment_cools_down_then_a_probe_brings_it_back() {
    // a fails its first three requests, then recovers; b always works.
    let a = flaky("a", 503, 3, &[]).await;
    let b = named("b").await;
    let models = "  m:\n    retry:\n      backoff: 1ms\n    circuit_breaker:\n      failures: 2\n      window: 10s\n      cooldown: 400ms\n    deployments:\n      - upstream: a\n        weight: 1000\n      - upstream: b\n        weight: 1\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;
    // Two failures on a (each retried on b) open its breaker.
    for _ in 0..2 {
        assert_eq!(chat(&proxy, "m").await.json()["served_by"], "b");
    }
    assert_eq!(a.requests().len(), 2);
    // Cooling down: a gets nothing, b answers at the first attempt.
    for _ in 0..5 {
        let got = chat(&proxy, "m").await;
        assert_eq!(got.json()["served_by"], "b");
        assert_eq!(got.header("x-llmproxy-attempts"), Some("1"));
    }
    assert_eq!(a.requests().len(), 2);
    // Cooldown over: one probe; it fails (a's third failure), so a cools again.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(chat(&proxy, "m").await.json()["served_by"], "b");
    assert_eq!(a.requests().len(), 3);
    assert_eq!(chat(&proxy, "m").await.json()["served_by"], "b");
    assert_eq!(a.requests().len(), 3);
    // Next probe succeeds and closes the breaker: a is back in rotation.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(chat(&proxy, "m").await.json()["served_by"], "a");
    assert_eq!(chat(&proxy, "m").await.json()["served_by"], "a");
}

#[tokio::test]
async fn with_every_deployment_cooling_the_answer_is_503_with_retry_after() {
    let a = flaky("a", 500, usize::MAX, &[]).await;
    let models = "  m:\n    retry:\n      attempts: 1\n    circuit_breaker:\n      failures: 1\n      cooldown: 5s\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a)])).await;
    assert_eq!(
        chat(&proxy, "m").await.status,
        500,
        "the upstream's own answer first"
    );
    let got = chat(&proxy, "m").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"]["code"], "model_unavailable");
    let after: u64 = got.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&after), "{after}");
    assert_eq!(a.requests().len(), 1);
}

#[tokio::test]
async fn a_cooling_model_falls_back() {
    let a = flaky("a", 500, usize::MAX, &[]).await;
    let b = named("b").await;
    let models = "  m:\n    retry:\n      attempts: 1\n    fallbacks: [spare]\n    circuit_breaker:\n      failures: 1\n      cooldown: 5s\n    deployments:\n      - upstream: a\n  spare:\n    deployments:\n      - upstream: b\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;
    assert_eq!(chat(&proxy, "m").await.json()["served_by"], "b");
    assert_eq!(chat(&proxy, "m").await.json()["served_by"], "b");
    assert_eq!(a.requests().len(), 1);
}

#[tokio::test]
async fn the_admin_status_shows_each_deployment_behind_a_token() {
    let a = flaky("a", 500, usize::MAX, &[]).await;
    let b = named("b").await;
    let models = "  m:\n    retry:\n      backoff: 1ms\n    circuit_breaker:\n      failures: 1\n      cooldown: 60s\n    deployments:\n      - upstream: a\n        weight: 1000\n      - upstream: b\n        model: m-b\n";
    let mut file = routed(models, &[("a", &a), ("b", &b)]);
    file.admin.token = Some("${ADMIN_TOKEN}".into());
    let env = |name: &str| (name == "ADMIN_TOKEN").then(|| "admin-secret-0123456789".to_owned());
    let proxy = spawn_proxy_env(file, &env).await;
    assert_eq!(chat(&proxy, "m").await.json()["served_by"], "b");

    let status = |token: Option<&'static str>| {
        let url = proxy.url("/admin/status");
        async move {
            let mut request = http::Request::get(url);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            send(request.body(http_body_util::Full::default()).unwrap()).await
        }
    };
    assert_eq!(status(None).await.status, 401);
    let wrong = status(Some("admin-secret-0123456788")).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"]["code"], "unauthorized");

    let got = status(Some("admin-secret-0123456789")).await;
    assert_eq!(got.status, 200);
    let json = got.json();
    assert_eq!(json["upstreams"], serde_json::json!(["a", "b"]));
    let deployments = &json["models"][0]["deployments"];
    assert_eq!(json["models"][0]["model"], "m");
    assert_eq!(deployments[0]["upstream"], "a");
    assert_eq!(deployments[0]["state"], "cooldown");
    assert!(deployments[0]["cooldown_remaining_ms"].as_u64().unwrap() > 50_000);
    assert_eq!(deployments[1]["upstream"], "b");
    assert_eq!(deployments[1]["model"], "m-b");
    assert_eq!(deployments[1]["state"], "healthy");
    assert_eq!(deployments[1]["in_flight"], 0);
    assert!(deployments[1]["ewma_ms"].as_f64().is_some());
}

#[tokio::test]
async fn the_admin_endpoint_does_not_exist_without_a_token() {
    let a = named("a").await;
    let proxy = spawn_proxy(&a).await;
    let got = get(&proxy.url("/admin/status")).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.json()["error"]["code"], "not_found");
}

#[tokio::test]
async fn a_models_own_timeouts_override_its_upstreams() {
    let slow = spawn_upstream(|_| {
        let mut reply = Reply::json(200, r#"{"served_by":"slow"}"#);
        reply.head_delay = Duration::from_millis(600);
        reply
    })
    .await;
    let models = "  quick:\n    retry:\n      attempts: 1\n    timeouts:\n      response_headers: 150ms\n    deployments:\n      - upstream: s\n  patient:\n    deployments:\n      - upstream: s\n";
    let proxy = spawn_proxy_with(routed(models, &[("s", &slow)])).await;
    let start = std::time::Instant::now();
    let got = chat(&proxy, "quick").await;
    assert_eq!(got.status, 504);
    assert_eq!(got.json()["error"]["code"], "upstream_timeout");
    assert!(
        start.elapsed() < Duration::from_millis(550),
        "{:?}",
        start.elapsed()
    );
    // The same upstream, through a model without the override, waits.
    assert_eq!(chat(&proxy, "patient").await.json()["served_by"], "slow");
}

#[tokio::test]
async fn a_total_timeout_ends_a_stream_that_runs_too_long() {
    let upstream = spawn_upstream(|_| {
        Reply::sse(
            (0..40)
                .map(|i| (Duration::from_millis(50), event(&i.to_string())))
                .collect(),
        )
    })
    .await;
    let mut file = config_for(&upstream.base_url());
    file.upstream.timeouts.total = Some(Duration::from_millis(400));
    let proxy = spawn_proxy_with(file).await;
    let start = std::time::Instant::now();
    let response = client()
        .request(
            http::Request::post(proxy.url("/v1/chat/completions"))
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    use http_body_util::BodyExt;
    assert!(
        response.into_body().collect().await.is_err(),
        "a cut stream must not end cleanly"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[tokio::test]
async fn concurrency_caps_overflow_to_other_deployments_then_answer_503() {
    let slow =
        spawn_upstream(|_| Reply::sse(vec![(Duration::from_millis(800), event("slow"))])).await;
    let spare = named("spare").await;
    let mut yaml = format!(
        "upstreams:\n  s:\n    base_url: {}\n    max_concurrent: 1\n  spare:\n    base_url: {}\nmodels:\n",
        slow.base_url(),
        spare.base_url()
    );
    yaml.push_str(
        "  capped:\n    retry:\n      attempts: 1\n    deployments:\n      - upstream: s\n",
    );
    yaml.push_str("  overflow:\n    deployments:\n      - upstream: s\n        weight: 1000\n      - upstream: spare\n        max_concurrent: 5\n");
    let proxy = spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await;
    let url = proxy.url("/v1/chat/completions");
    let held = tokio::spawn(async move { post(&url, r#"{"model":"capped"}"#).await });
    while slow.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The upstream's one slot is taken, whichever model asks.
    let got = chat(&proxy, "capped").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"]["code"], "model_at_capacity");
    assert_eq!(got.header("retry-after"), Some("1"));
    assert_eq!(chat(&proxy, "overflow").await.json()["served_by"], "spare");
    assert_eq!(slow.requests().len(), 1);
    held.await.unwrap();
    // Once the stream is over the slot is free again.
    assert_eq!(chat(&proxy, "capped").await.status, 200);
}

// Routing knobs (issue 9) ---------------------------------------------------------

#[tokio::test]
async fn retried_statuses_are_configurable() {
    // 418 retried because listed; 503 not retried because the list replaces the default.
    for (status, retried) in [(418u16, true), (503, false)] {
        let a = flaky("a", status, usize::MAX, &[]).await;
        let b = named("b").await;
        let models = pair(
            "    strategy: round_robin\n    retry:\n      backoff: 1ms\n      on_status: [418, 429]\n",
        );
        let proxy = spawn_proxy_with(routed(&models, &[("a", &a), ("b", &b)])).await;
        let got = chat(&proxy, "m").await;
        if retried {
            assert_eq!(got.json()["served_by"], "b", "{status}");
            assert_eq!(got.header("x-llmproxy-attempts"), Some("2"));
        } else {
            assert_eq!(got.status, status, "{status}");
            assert_eq!(got.header("x-llmproxy-attempts"), Some("1"));
            assert!(b.requests().is_empty());
        }
    }
}

#[tokio::test]
async fn connect_errors_and_timeouts_can_be_left_unretried() {
    let b = named("b").await;
    let proxy = spawn_proxy_with(
        dead_a_then_b(
            &b,
            "    strategy: round_robin\n    retry:\n      backoff: 1ms\n      on_connect_error: false\n",
        )
        .await,
    )
    .await;
    let got = chat(&proxy, "m").await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("x-llmproxy-attempts"), Some("1"));
    assert!(b.requests().is_empty());

    let slow = spawn_upstream(|_| {
        let mut reply = Reply::json(200, r#"{"served_by":"slow"}"#);
        reply.head_delay = Duration::from_secs(2);
        reply
    })
    .await;
    let models = pair(
        "    strategy: round_robin\n    timeouts:\n      response_headers: 200ms\n    retry:\n      backoff: 1ms\n      on_timeout: false\n",
    );
    let proxy = spawn_proxy_with(routed(&models, &[("a", &slow), ("b", &b)])).await;
    let got = chat(&proxy, "m").await;
    assert_eq!(got.status, 504);
    assert_eq!(got.header("x-llmproxy-attempts"), Some("1"));
    assert!(b.requests().is_empty());
}

#[tokio::test]
async fn a_model_without_a_circuit_breaker_keeps_every_deployment_in_rotation() {
    let a = flaky("a", 503, usize::MAX, &[]).await;
    let models = "  m:\n    retry:\n      attempts: 1\n    circuit_breaker:\n      enabled: false\n      failures: 1\n    deployments:\n      - upstream: a\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a)])).await;
    for _ in 0..5 {
        // The upstream's own 503 every time, never `model_unavailable`.
        let got = chat(&proxy, "m").await;
        assert_eq!(got.status, 503);
        assert!(
            got.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("a says 503")
        );
    }
    assert_eq!(a.requests().len(), 5);
}

#[tokio::test]
async fn decimal_weights_keep_their_proportions() {
    let (a, b) = (named("a").await, named("b").await);
    let models = "  m:\n    strategy: round_robin\n    deployments:\n      - upstream: a\n        weight: 0.5\n      - upstream: b\n        weight: 1.5\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b)])).await;
    assert_eq!(
        served_by(&proxy, 8).await,
        ["a", "b", "b", "b", "a", "b", "b", "b"]
    );
}

#[tokio::test]
async fn a_session_header_keeps_a_session_on_one_deployment() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let models = "  m:\n    strategy: round_robin\n    session_header: x-session-id\n    deployments:\n      - upstream: a\n      - upstream: b\n      - upstream: c\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b), ("c", &c)])).await;
    let ask = |session: Option<String>| {
        let mut request = http::Request::post(proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json");
        if let Some(session) = session {
            request = request.header("x-session-id", session);
        }
        send(
            request
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"model":"m","messages":[]}"#,
                )))
                .unwrap(),
        )
    };
    let first = ask(Some("session-1".into())).await.json()["served_by"].clone();
    for _ in 0..10 {
        assert_eq!(
            ask(Some("session-1".into())).await.json()["served_by"],
            first
        );
    }
    // Without the header, the strategy: round robin reaches all three.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(ask(None).await.json()["served_by"].to_string());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[tokio::test]
async fn with_session_user_the_bodys_user_keeps_a_session_on_one_deployment() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let models = "  m:\n    strategy: round_robin\n    session_header: x-session-id\n    session_user: true\n    deployments:\n      - upstream: a\n      - upstream: b\n      - upstream: c\n";
    let proxy = spawn_proxy_with(routed(models, &[("a", &a), ("b", &b), ("c", &c)])).await;
    let ask = |body: String| {
        send(
            http::Request::post(proxy.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
    };
    for user in ["alice", "bob", "carol"] {
        let body = format!(r#"{{"model":"m","user":"{user}","messages":[]}}"#);
        let home = ask(body.clone()).await.json()["served_by"].clone();
        for _ in 0..6 {
            assert_eq!(ask(body.clone()).await.json()["served_by"], home, "{user}");
        }
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(
            ask(r#"{"model":"m","messages":[]}"#.into()).await.json()["served_by"].to_string(),
        );
    }
    assert_eq!(seen.len(), 3, "no user: the strategy, {seen:?}");
}
