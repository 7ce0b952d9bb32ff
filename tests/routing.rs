//! Model routing over the wire: several upstreams behind one endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(
            chat(&proxy, "m").await.json()["served_by"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
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
