//! Virtual keys, limits, budgets and usage accounting, over the wire, on
//! both stores: a temporary SQLite file and a database of its own on the
//! real PostgreSQL (127.0.0.1:5432, or `LLMPROXY_TEST_POSTGRES`), dropped
//! afterwards.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly and spawns freely"
)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-tests-0123";

/// A store for one test, removed when it ends.
struct Backend {
    url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    File(std::path::PathBuf),
    Database { admin_url: String, name: String },
}

fn unique() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

impl Backend {
    fn sqlite() -> Self {
        let path = std::env::temp_dir().join(format!("llmproxy-test-{}.db", unique()));
        Self {
            url: format!("sqlite://{}", path.display()),
            cleanup: Cleanup::File(path),
        }
    }

    async fn postgres() -> Self {
        let admin_url = std::env::var("LLMPROXY_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("llmproxy_test_{}", unique());
        let pool = sqlx::PgPool::connect(&admin_url)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (scripts/services.sh starts it)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let base = admin_url.rsplit_once('/').unwrap().0;
        Self {
            url: format!("{base}/{name}"),
            cleanup: Cleanup::Database { admin_url, name },
        }
    }

    /// Runs one statement on the test's database.
    async fn execute(&self, sql: &str) {
        if self.url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        } else {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }

    async fn both() -> Vec<Self> {
        vec![Self::sqlite(), Self::postgres().await]
    }

    async fn remove(self) {
        match self.cleanup {
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Cleanup::Database { admin_url, name } => {
                let pool = sqlx::PgPool::connect(&admin_url).await.unwrap();
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            }
        }
    }
}

/// The YAML for a gateway with keys required on `store`, in front of `base_url`.
fn gateway_yaml(base_url: &str, store: &str, extra: &str) -> String {
    format!(
        "upstream:\n  base_url: {base_url}\n  default_headers:\n    Authorization: Bearer sk-upstream-secret\n\
         admin:\n  token: {ADMIN}\nstore:\n  url: {store}\n  flush_interval: 100ms\n\
         keys:\n  required: true\n  refresh: 200ms\n\
         prices:\n  gpt-*:\n    input: 1000\n    output: 2000\n{extra}"
    )
}

async fn gateway(base_url: &str, store: &str, extra: &str) -> Proxy {
    let proxy = spawn_proxy_with(
        llmproxy::config::parse(&gateway_yaml(base_url, store, extra), "test").unwrap(),
    )
    .await;
    // The store opens before the listener serves; wait until it answers.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(proxy.addr).await.is_ok() {
            let got = admin(&proxy, "GET", "/admin/status", None).await;
            if got.status == 200 {
                return proxy;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the gateway did not start");
}

async fn admin(proxy: &Proxy, method: &str, path: &str, body: Option<Value>) -> Got {
    send(
        Request::builder()
            .method(method)
            .uri(proxy.url(path))
            .header("authorization", format!("Bearer {ADMIN}"))
            .header("content-type", "application/json")
            .body(Full::new(
                body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
            ))
            .unwrap(),
    )
    .await
}

/// Creates a key; returns (secret, id).
async fn create_key(proxy: &Proxy, spec: Value) -> (String, String) {
    let got = admin(proxy, "POST", "/admin/keys", Some(spec)).await;
    assert_eq!(got.status, 201, "{}", String::from_utf8_lossy(&got.body));
    let json = got.json();
    (
        json["key"].as_str().unwrap().to_owned(),
        json["info"]["id"].as_str().unwrap().to_owned(),
    )
}

async fn chat(proxy: &Proxy, key: Option<&str>, header: &str, body: Value) -> Got {
    let mut request =
        Request::post(proxy.url("/v1/chat/completions")).header("content-type", "application/json");
    if let Some(key) = key {
        request = match header {
            "authorization" => request.header("authorization", format!("Bearer {key}")),
            other => request.header(other, key),
        };
    }
    send(
        request
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

/// The usage records, once `n` are there (within 2 s).
async fn records(proxy: &Proxy, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    for _ in 0..100 {
        let got = admin(proxy, "GET", "/admin/usage/records?limit=1000", None).await;
        last = got.json()["data"].as_array().unwrap().clone();
        if last.len() >= n {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("expected {n} usage records, found {}: {last:?}", last.len());
}

fn openai_error(got: &Got) -> (u16, String, String) {
    let json = got.json();
    (
        got.status.as_u16(),
        json["error"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// An upstream answering like OpenAI: usage in JSON answers; in streams
/// only with `stream_options.include_usage`, and then with `"usage":null`
/// on every other chunk.
async fn openai_like() -> Upstream {
    spawn_upstream(|request| {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let usage = json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13});
        if body["stream"] == true {
            Reply::sse(
                stream_events(body["stream_options"]["include_usage"] == true, &usage)
                    .into_iter()
                    .map(|e| (Duration::ZERO, e))
                    .collect(),
            )
        } else {
            Reply::json(
                200,
                &json!({"id": "c1", "object": "chat.completion", "model": "gpt-4o-2024",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                    "usage": usage})
                .to_string(),
            )
        }
    })
    .await
}

fn stream_events(include_usage: bool, usage: &Value) -> Vec<Bytes> {
    let null = if include_usage { ",\"usage\":null" } else { "" };
    let mut events: Vec<Bytes> = ["Hel", "lo", "!"]
        .iter()
        .map(|word| {
            Bytes::from(format!(
                "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]{null}}}\n\n"
            ))
        })
        .collect();
    if include_usage {
        events.push(Bytes::from(format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024\",\"choices\":[],\"usage\":{usage}}}\n\n"
        )));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

#[tokio::test]
async fn only_valid_keys_pass_and_no_key_reaches_the_upstream() {
    for backend in Backend::both().await {
        let upstream = openai_like().await;
        let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
        let (key, id) = create_key(
            &proxy,
            json!({"name": "alice", "models": ["gpt-4o", "gpt-4.1-*"]}),
        )
        .await;
        assert!(key.starts_with("sk-llmp-") && key.len() > 50);

        let hello = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        let missing = chat(&proxy, None, "", hello.clone()).await;
        assert_eq!(
            openai_error(&missing),
            (
                401,
                "invalid_request_error".into(),
                "invalid_api_key".into()
            )
        );
        let wrong = chat(
            &proxy,
            Some("sk-llmp-000000"),
            "authorization",
            hello.clone(),
        )
        .await;
        assert_eq!(wrong.status, 401);
        assert!(!String::from_utf8_lossy(&wrong.body).contains("sk-llmp-000000"));
        for header in ["authorization", "x-api-key", "api-key"] {
            let ok = chat(&proxy, Some(&key), header, hello.clone()).await;
            assert_eq!(ok.status, 200, "key in {header}");
        }
        let forbidden = chat(
            &proxy,
            Some(&key),
            "authorization",
            json!({"model": "gpt-3.5"}),
        )
        .await;
        assert_eq!(
            openai_error(&forbidden),
            (
                403,
                "invalid_request_error".into(),
                "model_not_allowed".into()
            )
        );
        assert!(String::from_utf8_lossy(&forbidden.body).contains("gpt-3.5"));
        let wildcard = chat(
            &proxy,
            Some(&key),
            "authorization",
            json!({"model": "gpt-4.1-mini"}),
        )
        .await;
        assert_eq!(wildcard.status, 200);

        // The upstream saw only its own credential, never the virtual key.
        let seen = upstream.requests();
        assert_eq!(seen.len(), 4);
        for request in &seen {
            assert_eq!(
                request.headers["authorization"],
                "Bearer sk-upstream-secret"
            );
            assert!(!request.headers.contains_key("x-api-key"));
            assert!(!request.headers.contains_key("api-key"));
            for value in request.headers.values() {
                assert!(!value.to_str().unwrap_or_default().contains("sk-llmp-"));
            }
        }

        // Revoked: refused.
        let revoked = admin(&proxy, "POST", &format!("/admin/keys/{id}/revoke"), None).await;
        assert_eq!(revoked.status, 200);
        assert_eq!(revoked.json()["revoked"], true);
        let after = chat(&proxy, Some(&key), "authorization", hello.clone()).await;
        assert_eq!(after.status, 401);
        assert!(String::from_utf8_lossy(&after.body).contains("revoked"));

        // Expired: refused.
        let (old, _) = create_key(
            &proxy,
            json!({"name": "old", "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
        let expired = chat(&proxy, Some(&old), "authorization", hello.clone()).await;
        assert_eq!(expired.status, 401);
        assert!(String::from_utf8_lossy(&expired.body).contains("expired"));

        // Listing never shows a key or its hash.
        let listed = admin(&proxy, "GET", "/admin/keys", None).await;
        let text = String::from_utf8_lossy(&listed.body).to_string();
        assert!(
            !text.contains(&key[8..]) && !text.contains("hash"),
            "{text}"
        );
        assert_eq!(listed.json()["data"].as_array().unwrap().len(), 2);
        backend.remove().await;
    }
}

#[tokio::test]
async fn a_revocation_on_one_instance_applies_on_another_within_a_second() {
    for backend in Backend::both().await {
        let upstream = openai_like().await;
        let one = gateway(&upstream.base_url(), &backend.url, "").await;
        let two = gateway(&upstream.base_url(), &backend.url, "").await;
        let (key, id) = create_key(&one, json!({"name": "shared"})).await;
        let hello = json!({"model": "gpt-4o"});
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            chat(&two, Some(&key), "authorization", hello.clone())
                .await
                .status,
            200
        );
        admin(&one, "POST", &format!("/admin/keys/{id}/revoke"), None).await;
        let start = std::time::Instant::now();
        loop {
            let got = chat(&two, Some(&key), "authorization", hello.clone()).await;
            if got.status == 401 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "still accepted after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        backend.remove().await;
    }
}

#[tokio::test]
async fn limits_answer_429_with_openai_rate_limit_headers() {
    let backend = Backend::sqlite();
    let upstream = openai_like().await;
    let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
    let (key, _) = create_key(&proxy, json!({"name": "rpm", "rpm": 3})).await;
    let hello = json!({"model": "gpt-4o"});
    for _ in 0..3 {
        assert_eq!(
            chat(&proxy, Some(&key), "authorization", hello.clone())
                .await
                .status,
            200
        );
    }
    let limited = chat(&proxy, Some(&key), "authorization", hello.clone()).await;
    assert_eq!(
        openai_error(&limited),
        (429, "requests".into(), "rate_limit_exceeded".into())
    );
    assert_eq!(limited.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(limited.header("x-ratelimit-reset-requests").is_some());
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(
        upstream.requests().len(),
        3,
        "a refused request is never sent"
    );

    // Tokens: admitted on the estimate, settled to the real usage (13).
    let (key, _) = create_key(&proxy, json!({"name": "tpm", "tpm": 1000})).await;
    let big = json!({"model": "gpt-4o", "max_tokens": 900});
    assert_eq!(
        chat(&proxy, Some(&key), "authorization", big.clone())
            .await
            .status,
        200
    );
    // Without reconciliation this second one (another 900) would not fit.
    let second = chat(&proxy, Some(&key), "authorization", big.clone()).await;
    assert_eq!(
        second.status,
        200,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    let huge = json!({"model": "gpt-4o", "max_tokens": 990});
    let refused = chat(&proxy, Some(&key), "authorization", huge).await;
    assert_eq!(
        openai_error(&refused),
        (429, "tokens".into(), "rate_limit_exceeded".into())
    );
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));
    backend.remove().await;
}

#[tokio::test]
async fn concurrency_slots_are_exact_and_freed_when_the_answer_ends() {
    let backend = Backend::sqlite();
    let upstream = spawn_upstream(|_| {
        Reply::sse(vec![
            (Duration::ZERO, event("{\"choices\":[]}")),
            (
                Duration::from_millis(400),
                Bytes::from_static(b"data: [DONE]\n\n"),
            ),
        ])
    })
    .await;
    let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
    let (key, _) = create_key(&proxy, json!({"name": "one", "max_concurrent": 1})).await;
    let streaming =
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}});
    let url = proxy.url("/v1/chat/completions");
    let open = client()
        .request(
            Request::post(&url)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(streaming.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let second = chat(&proxy, Some(&key), "authorization", streaming.clone()).await;
    assert_eq!(openai_error(&second).2, "rate_limit_exceeded");
    assert!(String::from_utf8_lossy(&second.body).contains("1 concurrent"));
    open.into_body().collect().await.unwrap();
    let third = chat(&proxy, Some(&key), "authorization", streaming).await;
    assert_eq!(third.status, 200);
    backend.remove().await;
}

#[tokio::test]
async fn a_spent_budget_answers_insufficient_quota_until_it_resets() {
    let backend = Backend::sqlite();
    let upstream = openai_like().await;
    let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
    // One request: 10 × 1000 + 3 × 2000 USD per million = 0.016 USD.
    let (key, id) = create_key(
        &proxy,
        json!({"name": "b", "budget_usd": 0.02, "budget_period": "1d"}),
    )
    .await;
    let hello = json!({"model": "gpt-4o"});
    let first = chat(&proxy, Some(&key), "authorization", hello.clone()).await;
    assert_eq!(first.header("x-llmproxy-cost-usd"), Some("0.016000000"));
    assert_eq!(
        chat(&proxy, Some(&key), "authorization", hello.clone())
            .await
            .status,
        200
    );
    let spent = chat(&proxy, Some(&key), "authorization", hello.clone()).await;
    assert_eq!(
        openai_error(&spent),
        (429, "insufficient_quota".into(), "budget_exceeded".into())
    );
    assert!(String::from_utf8_lossy(&spent.body).contains("resets at"));
    let shown = admin(&proxy, "GET", &format!("/admin/keys/{id}"), None)
        .await
        .json();
    assert_eq!(shown["spent_usd"], 0.032);
    // Raising the budget lets the key through again.
    let raised = admin(
        &proxy,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"budget_usd": 1.0})),
    )
    .await;
    assert_eq!(raised.status, 200);
    assert_eq!(
        chat(&proxy, Some(&key), "authorization", hello)
            .await
            .status,
        200
    );
    backend.remove().await;
}

async fn stream_bytes(proxy: &Proxy, key: &str, body: Value) -> Vec<u8> {
    let response = client()
        .request(
            Request::post(proxy.url("/v1/chat/completions"))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

#[tokio::test]
async fn usage_is_recorded_exactly_and_streams_stay_byte_exact() {
    for backend in Backend::both().await {
        let upstream = openai_like().await;
        let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
        let (key, id) = create_key(&proxy, json!({"name": "u"})).await;
        let usage = json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13});

        let plain = chat(
            &proxy,
            Some(&key),
            "authorization",
            json!({"model": "gpt-4o"}),
        )
        .await;
        assert_eq!(plain.header("x-llmproxy-prompt-tokens"), Some("10"));
        assert_eq!(plain.header("x-llmproxy-completion-tokens"), Some("3"));

        // Not asked for: llmproxy asks upstream and the client sees the
        // stream it would have seen.
        let without = stream_bytes(&proxy, &key, json!({"model": "gpt-4o", "stream": true})).await;
        let expected: Vec<u8> = stream_events(false, &usage).concat();
        assert_eq!(
            String::from_utf8_lossy(&without),
            String::from_utf8_lossy(&expected)
        );
        let asked: Value = serde_json::from_slice(&upstream.requests()[1].body).unwrap();
        assert_eq!(asked["stream_options"]["include_usage"], true);

        // Asked for: passed through untouched.
        let with = stream_bytes(
            &proxy,
            &key,
            json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
        assert_eq!(with, stream_events(true, &usage).concat());

        // An upstream error: recorded with no tokens.
        let records_now = records(&proxy, 3).await;
        for record in &records_now {
            assert_eq!(record["prompt_tokens"], 10);
            assert_eq!(record["completion_tokens"], 3);
            assert_eq!(record["source"], "reported");
            assert_eq!(record["key_id"], id.as_str());
            assert_eq!(record["model_requested"], "gpt-4o");
            assert_eq!(record["model_served"], "gpt-4o-2024");
            assert_eq!(record["cost_nano_usd"], 16_000_000);
        }
        let totals = admin(&proxy, "GET", "/admin/usage?group_by=model", None)
            .await
            .json();
        assert_eq!(totals["data"][0]["model"], "gpt-4o");
        assert_eq!(totals["data"][0]["requests"], 3);
        assert_eq!(totals["data"][0]["cost_usd"], 0.048);
        backend.remove().await;
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_recorded_at_once_as_estimated() {
    for backend in Backend::both().await {
        let upstream = spawn_upstream(|_| {
            Reply::sse(vec![
                (
                    Duration::ZERO,
                    event("{\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}"),
                ),
                (
                    Duration::ZERO,
                    event("{\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":null}"),
                ),
                (
                    Duration::from_secs(30),
                    Bytes::from_static(b"data: [DONE]\n\n"),
                ),
            ])
        })
        .await;
        let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
        let (key, _) = create_key(&proxy, json!({"name": "gone"})).await;
        let response = client()
            .request(
                Request::post(proxy.url("/v1/chat/completions"))
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(
                        json!({"model": "gpt-4o", "stream": true}).to_string(),
                    )))
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let left = std::time::Instant::now();
        drop(body);
        let found = records(&proxy, 1).await;
        assert!(
            left.elapsed() < Duration::from_secs(1),
            "recorded after {:?}",
            left.elapsed()
        );
        assert_eq!(found[0]["source"], "estimated");
        assert_eq!(found[0]["completion_tokens"], 2);
        assert!(found[0]["prompt_tokens"].as_u64().unwrap() > 0);
        backend.remove().await;
    }
}

#[tokio::test]
async fn a_thousand_concurrent_requests_are_each_recorded_once_and_survive_restart() {
    for backend in Backend::both().await {
        let upstream = openai_like().await;
        let mut proxy = gateway(&upstream.base_url(), &backend.url, "").await;
        let (key, _) = create_key(&proxy, json!({"name": "load"})).await;
        let mut tasks = Vec::new();
        for i in 0..1000 {
            let url = proxy.url("/v1/chat/completions");
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let stream = i % 2 == 0;
                let got = send(
                    Request::post(url)
                        .header("authorization", format!("Bearer {key}"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(
                            json!({"model": "gpt-4o", "stream": stream}).to_string(),
                        )))
                        .unwrap(),
                )
                .await;
                assert_eq!(got.status, 200);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Graceful shutdown right away: the last batch is written before exit.
        proxy.shutdown();
        (&mut proxy.task).await.unwrap().unwrap();

        let again = gateway(&upstream.base_url(), &backend.url, "").await;
        let totals = admin(&again, "GET", "/admin/usage", None).await.json();
        assert_eq!(totals["data"][0]["requests"], 1000, "{totals}");
        assert_eq!(totals["data"][0]["prompt_tokens"], 10_000);
        let records = records(&again, 1000).await;
        let ids: std::collections::HashSet<&str> = records
            .iter()
            .map(|r| r["request_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 1000);
        // The key survived the restart too.
        let hello = json!({"model": "gpt-4o"});
        assert_eq!(
            chat(&again, Some(&key), "authorization", hello)
                .await
                .status,
            200
        );
        backend.remove().await;
    }
}

#[tokio::test]
async fn admin_calls_need_the_token_and_name_bad_fields() {
    let backend = Backend::sqlite();
    let upstream = openai_like().await;
    let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
    let anonymous = send(
        Request::get(proxy.url("/admin/keys"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    let bad = admin(
        &proxy,
        "POST",
        "/admin/keys",
        Some(json!({"name": "x", "rpn": 5})),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("rpn"));
    let bad = admin(
        &proxy,
        "POST",
        "/admin/keys",
        Some(json!({"name": "x", "budget_period": "soon"})),
    )
    .await;
    assert!(String::from_utf8_lossy(&bad.body).contains("budget_period"));
    let missing = admin(&proxy, "GET", "/admin/keys/key_nope", None).await;
    assert_eq!(openai_error(&missing).2, "key_not_found");
    let day = admin(&proxy, "GET", "/admin/usage?from=yesterday", None).await;
    assert_eq!(day.status, 400);
    backend.remove().await;
}

/// A Redis key prefix of one test's own on the real Redis (127.0.0.1:6379,
/// or `LLMPROXY_TEST_REDIS`); its keys are deleted afterwards.
struct RedisPrefix {
    url: String,
    prefix: String,
}

impl RedisPrefix {
    fn new() -> Self {
        Self {
            url: std::env::var("LLMPROXY_TEST_REDIS")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            prefix: format!("llmproxy_test_{}", unique()),
        }
    }

    async fn remove(self) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut connection)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }
}

/// A TCP relay to Redis that the test can cut and restore, to play a Redis
/// that goes away and comes back.
struct Relay {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn to(target: &str) -> Self {
        let target = target.trim_start_matches("redis://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let (flag, notify) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let target = target.clone();
                let notify = notify.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = notify.notified() => {}
                    }
                });
            }
        });
        Self { addr, up, cut }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.notify_waiters();
        }
    }
}

fn redis_yaml(url: &str, prefix: &str, on_unavailable: &str) -> String {
    format!("redis:\n  url: {url}\n  prefix: {prefix}\n  on_unavailable: {on_unavailable}\n")
}

/// Polls `/admin/status` until its `redis.limits` says `want` (within 5 s).
async fn redis_status(proxy: &Proxy, want: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = admin(proxy, "GET", "/admin/status", None).await.json()["redis"].clone();
        if last["limits"] == want {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis status never became {want}: {last}");
}

#[tokio::test]
async fn two_instances_share_one_limit_through_redis() {
    let backend = Backend::sqlite();
    let redis = RedisPrefix::new();
    let upstream = openai_like().await;
    let extra = redis_yaml(&redis.url, &redis.prefix, "closed");
    let one = gateway(&upstream.base_url(), &backend.url, &extra).await;
    let two = gateway(&upstream.base_url(), &backend.url, &extra).await;
    let status = redis_status(&one, "shared").await;
    assert_eq!(status["prefix"], redis.prefix.as_str());
    assert_eq!(status["healthy"], true);
    const LIMIT: usize = 40;
    let (key, id) = create_key(&one, json!({"name": "shared-rpm", "rpm": LIMIT})).await;
    tokio::time::sleep(Duration::from_millis(400)).await; // instance two reads the key
    let hello = json!({"model": "gpt-4o"});
    let mut admitted = [0usize; 2];
    let mut refused = 0;
    // Three times the limit, alternating between the instances, eight at a time.
    for round in 0..(3 * LIMIT / 8) {
        let mut batch = Vec::new();
        for i in 0..8 {
            let which = (round + i) % 2;
            let url = [&one, &two][which].url("/v1/chat/completions");
            let request = Request::post(url)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(hello.to_string())))
                .unwrap();
            batch.push(tokio::spawn(async move { (which, send(request).await) }));
        }
        for task in batch {
            let (which, got) = task.await.unwrap();
            match got.status.as_u16() {
                200 => admitted[which] += 1,
                429 => {
                    assert_eq!(openai_error(&got).2, "rate_limit_exceeded");
                    assert_eq!(got.header("x-ratelimit-limit-requests"), Some("40"));
                    assert!(got.header("retry-after").is_some());
                    refused += 1;
                }
                other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&got.body)),
            }
        }
    }
    let total = admitted[0] + admitted[1];
    // The documented bound: 2 instances × max(limit / 10, 1) = 8 either way,
    // plus what the bucket refills while the test runs (40 a minute).
    assert!(
        (LIMIT - 8..=LIMIT + 8 + 2).contains(&total),
        "admitted {admitted:?} = {total} of {LIMIT}, refused {refused}"
    );
    assert!(
        admitted[0] > 0 && admitted[1] > 0,
        "both instances admitted: {admitted:?}"
    );
    // Alone, each instance would have admitted the whole limit.
    assert!(total < 2 * LIMIT - 8);
    assert_eq!(
        upstream.requests().len(),
        total,
        "a refused request is never sent"
    );
    let _ = id;
    redis.remove().await;
    backend.remove().await;
}

#[tokio::test]
async fn when_redis_goes_away_limits_do_what_on_unavailable_says() {
    let backend = Backend::sqlite();
    let redis = RedisPrefix::new();
    let relay = Relay::to(&redis.url).await;
    let upstream = openai_like().await;
    let local = gateway(
        &upstream.base_url(),
        &backend.url,
        &redis_yaml(&relay.url(), &redis.prefix, "local"),
    )
    .await;
    let closed = gateway(
        &upstream.base_url(),
        &backend.url,
        &redis_yaml(&relay.url(), &redis.prefix, "closed"),
    )
    .await;
    redis_status(&local, "shared").await;
    redis_status(&closed, "shared").await;
    let (limited, _) = create_key(&local, json!({"name": "limited", "rpm": 1000})).await;
    let (free, _) = create_key(&local, json!({"name": "free"})).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let hello = json!({"model": "gpt-4o"});
    for proxy in [&local, &closed] {
        assert_eq!(
            chat(proxy, Some(&limited), "authorization", hello.clone())
                .await
                .status,
            200
        );
    }

    relay.set(false);
    let down = redis_status(&local, "local").await;
    assert_eq!(down["healthy"], false);
    assert_eq!(down["on_unavailable"], "local");
    assert_eq!(
        redis_status(&closed, "refusing").await["on_unavailable"],
        "closed"
    );
    // Leases taken before Redis went away last a second at most.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        chat(&local, Some(&limited), "authorization", hello.clone())
            .await
            .status,
        200
    );
    let refused = chat(&closed, Some(&limited), "authorization", hello.clone()).await;
    assert_eq!(
        openai_error(&refused),
        (503, "proxy_error".into(), "limits_unavailable".into())
    );
    assert!(String::from_utf8_lossy(&refused.body).contains("Redis"));
    // A key without limits never needs Redis.
    assert_eq!(
        chat(&closed, Some(&free), "authorization", hello.clone())
            .await
            .status,
        200
    );

    relay.set(true);
    redis_status(&closed, "shared").await;
    assert_eq!(
        chat(&closed, Some(&limited), "authorization", hello)
            .await
            .status,
        200
    );
    redis.remove().await;
    backend.remove().await;
}

#[tokio::test]
async fn streams_carry_their_cost_only_when_the_client_or_key_opts_in() {
    let backend = Backend::sqlite();
    let upstream = openai_like().await;
    let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
    let (plain, _) = create_key(&proxy, json!({"name": "plain"})).await;
    let (costed, id) = create_key(&proxy, json!({"name": "costed", "stream_cost": true})).await;
    let shown = admin(&proxy, "GET", &format!("/admin/keys/{id}"), None)
        .await
        .json();
    assert_eq!(shown["stream_cost"], true);
    let usage = json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13});
    let with_cost = String::from_utf8(stream_events(true, &usage).concat())
        .unwrap()
        .replace(
            "\"total_tokens\":13}",
            "\"total_tokens\":13,\"cost_usd\":0.016000000}",
        );
    let streaming = json!({"model": "gpt-4o", "stream": true});

    // Off by default: byte-exact.
    let off = stream_bytes(&proxy, &plain, streaming.clone()).await;
    assert_eq!(off, stream_events(false, &usage).concat());
    // The key opted in: the usage chunk comes, with the cost in it.
    let by_key = stream_bytes(&proxy, &costed, streaming.clone()).await;
    assert_eq!(String::from_utf8(by_key).unwrap(), with_cost);
    // The request opts in; the header never reaches the upstream.
    let response = client()
        .request(
            Request::post(proxy.url("/v1/chat/completions"))
                .header("authorization", format!("Bearer {plain}"))
                .header("content-type", "application/json")
                .header("x-llmproxy-stream-cost", "true")
                .body(Full::new(Bytes::from(streaming.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let by_request = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8(by_request.to_vec()).unwrap(), with_cost);
    for request in upstream.requests() {
        assert!(!request.headers.contains_key("x-llmproxy-stream-cost"));
    }
    backend.remove().await;
}

#[tokio::test]
async fn a_budget_resets_when_its_period_ends() {
    for backend in Backend::both().await {
        let upstream = openai_like().await;
        let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
        // One request costs 0.016 USD: the second spends the budget.
        let (key, id) = create_key(
            &proxy,
            json!({"name": "daily", "budget_usd": 0.03, "budget_period": "1m"}),
        )
        .await;
        let hello = json!({"model": "gpt-4o"});
        for _ in 0..2 {
            assert_eq!(
                chat(&proxy, Some(&key), "authorization", hello.clone())
                    .await
                    .status,
                200
            );
        }
        let spent = chat(&proxy, Some(&key), "authorization", hello.clone()).await;
        assert_eq!(openai_error(&spent).2, "budget_exceeded");
        // Move the key's creation back so its minute ends 1.5 s from now
        // (the period counts from the creation time).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        backend
            .execute(&format!(
                "UPDATE virtual_keys SET created_at = {}, updated_at = {now} WHERE id = '{id}'",
                now - 58_500
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await; // refreshed
        let still = chat(&proxy, Some(&key), "authorization", hello.clone()).await;
        assert_eq!(
            openai_error(&still).2,
            "budget_exceeded",
            "the period has not ended yet"
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let reset = chat(&proxy, Some(&key), "authorization", hello.clone()).await;
        assert_eq!(
            reset.status,
            200,
            "{}",
            String::from_utf8_lossy(&reset.body)
        );
        let shown = admin(&proxy, "GET", &format!("/admin/keys/{id}"), None)
            .await
            .json();
        assert_eq!(
            shown["spent_usd"], 0.016,
            "only the new period's request: {shown}"
        );
        backend.remove().await;
    }
}

#[tokio::test]
async fn an_upstream_error_reaches_the_client_as_it_was_and_is_recorded_without_tokens() {
    for backend in Backend::both().await {
        let upstream = spawn_upstream(|_| {
            Reply::json(
                429,
                r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
            )
            .header("retry-after", "7")
            .header("x-ratelimit-remaining-requests", "0")
        })
        .await;
        let proxy = gateway(&upstream.base_url(), &backend.url, "").await;
        let (key, id) = create_key(&proxy, json!({"name": "e", "tpm": 100000})).await;
        let got = chat(
            &proxy,
            Some(&key),
            "authorization",
            json!({"model": "gpt-4o"}),
        )
        .await;
        assert_eq!(got.status, 429);
        assert_eq!(got.header("retry-after"), Some("7"));
        assert_eq!(got.header("x-ratelimit-remaining-requests"), Some("0"));
        assert!(String::from_utf8_lossy(&got.body).contains("slow down"));
        assert_eq!(got.header("x-llmproxy-cost-usd"), Some("0.000000000"));
        let found = records(&proxy, 1).await;
        assert_eq!(found[0]["status"], 429);
        assert_eq!(found[0]["key_id"], id.as_str());
        assert_eq!(found[0]["prompt_tokens"], 0);
        assert_eq!(found[0]["completion_tokens"], 0);
        assert_eq!(found[0]["cost_nano_usd"], 0);
        backend.remove().await;
    }
}

#[tokio::test]
async fn sigterm_during_load_loses_no_usage_record() {
    use common::bin::Bin;
    for backend in Backend::both().await {
        let upstream = spawn_upstream(|_| {
            let mut reply = Reply::json(
                200,
                r#"{"id":"c","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3}}"#,
            );
            reply.head_delay = Duration::from_millis(150);
            reply
        })
        .await;
        let path = std::env::temp_dir().join(format!("llmproxy-test-{}.yaml", unique()));
        std::fs::write(&path, gateway_yaml(&upstream.base_url(), &backend.url, "")).unwrap();
        let config = path.to_str().unwrap().to_owned();
        let mut bin = Bin::start(&["-c", &config], &[]).await;
        let proxy_url = bin.url("");
        let created = send(
            Request::post(format!("{proxy_url}/admin/keys"))
                .header("authorization", format!("Bearer {ADMIN}"))
                .body(Full::new(Bytes::from(json!({"name": "load"}).to_string())))
                .unwrap(),
        )
        .await;
        assert_eq!(created.status, 201);
        let key = created.json()["key"].as_str().unwrap().to_owned();
        let answered = std::sync::Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..400 {
            let (url, key, answered) = (
                format!("{proxy_url}/v1/chat/completions"),
                key.clone(),
                answered.clone(),
            );
            tasks.push(tokio::spawn(async move {
                // Arrivals spread over 400 ms: some before the signal, some after.
                tokio::time::sleep(Duration::from_millis(i)).await;
                let request = Request::post(url)
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(
                        json!({"model": "gpt-4o"}).to_string(),
                    )))
                    .unwrap();
                if let Ok(response) = client().request(request).await
                    && response.status() == 200
                    && response.into_body().collect().await.is_ok()
                {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        bin.terminate();
        for task in tasks {
            task.await.unwrap();
        }
        assert!(
            bin.wait_exit(Duration::from_secs(20)).await.success(),
            "{}",
            bin.logs()
        );
        let answered = answered.load(Ordering::SeqCst);
        assert!(answered >= 100, "only {answered} answered before the drain");
        // Every answered request is in the store, once.
        let store = llmproxy::store::Store::open(&backend.url).await.unwrap();
        let recent = store.recent(10_000, None).await.unwrap();
        store.close().await;
        assert_eq!(recent.len(), answered, "records vs answered requests");
        let _ = std::fs::remove_file(&path);
        backend.remove().await;
    }
}

#[tokio::test]
async fn redis_that_cannot_be_reached_at_start_is_said_in_the_log() {
    use common::bin::Bin;
    let backend = Backend::sqlite();
    let upstream = openai_like().await;
    let extra = redis_yaml("redis://127.0.0.1:1", "llmproxy_test_down", "closed");
    let path = std::env::temp_dir().join(format!("llmproxy-test-{}.yaml", unique()));
    std::fs::write(
        &path,
        gateway_yaml(&upstream.base_url(), &backend.url, &extra),
    )
    .unwrap();
    let mut bin = Bin::start(&["-c", path.to_str().unwrap()], &[]).await;
    let status = send(
        Request::get(bin.url("/admin/status"))
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(Full::default())
            .unwrap(),
    )
    .await
    .json();
    assert_eq!(status["redis"]["limits"], "refusing", "{status}");
    bin.terminate();
    bin.wait_exit(Duration::from_secs(10)).await;
    let logs = bin.logs();
    assert!(
        logs.contains("Redis unreachable") && logs.contains("refused (503)"),
        "{logs}"
    );
    assert!(!logs.contains("127.0.0.1:1 "), "no URL in the log: {logs}");
    let _ = std::fs::remove_file(&path);
    backend.remove().await;
}

#[tokio::test]
async fn the_store_writes_each_record_once_however_often_it_is_sent() {
    use llmproxy::store::{Store, UsageRecord};
    for backend in Backend::both().await {
        let store = Store::open(&backend.url).await.unwrap();
        let at = 1_796_000_000_000; // 2026-11-30 00:53 UTC
        let record = |id: &str, attempt: u32| UsageRecord {
            request_id: id.to_owned(),
            attempt,
            at,
            key_id: "key_a".into(),
            model_requested: "gpt-4o".into(),
            model_served: "gpt-4o-2024".into(),
            upstream: "openai".into(),
            status: 200,
            prompt_tokens: 10,
            completion_tokens: 3,
            cached_tokens: 0,
            cost_nano_usd: 16_000_000,
            latency_ms: 5,
            ttft_ms: None,
            source: "reported",
        };
        // 1,200 records: more than one statement's worth.
        let mut first: Vec<UsageRecord> = (0..1200).map(|i| record(&format!("r{i}"), 1)).collect();
        first.push(record("r7", 1)); // a repeat within the batch
        first.push(record("r7", 2)); // another attempt of the same request: billed
        assert_eq!(store.insert_usage(&first).await.unwrap(), 1201);
        // The same batch again (a writer that retried): nothing new.
        assert_eq!(store.insert_usage(&first).await.unwrap(), 0);
        let mixed = vec![record("r1", 1), record("new", 1)];
        assert_eq!(store.insert_usage(&mixed).await.unwrap(), 1);
        let totals = store
            .totals(None, "2026-11-30", "2026-11-30", None)
            .await
            .unwrap();
        assert_eq!(totals[0].requests, 1202);
        assert_eq!(totals[0].prompt_tokens, 12_020);
        assert_eq!(totals[0].cost_nano_usd, 1202 * 16_000_000);
        assert_eq!(store.recent(5000, None).await.unwrap().len(), 1202);
        store.close().await;
        backend.remove().await;
    }
}

#[tokio::test]
async fn a_model_limit_holds_over_all_keys() {
    let backend = Backend::sqlite();
    let upstream = openai_like().await;
    let extra = "  model_limits:\n    gpt-4o:\n      rpm: 3\n    gpt-4.1-*:\n      tpm: 1000\n";
    // `keys:` is the section the YAML ends its key settings with above.
    let yaml = gateway_yaml(&upstream.base_url(), &backend.url, "")
        .replace("  refresh: 200ms\n", &format!("  refresh: 200ms\n{extra}"));
    let proxy = spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await;
    for _ in 0..200 {
        if admin(&proxy, "GET", "/admin/status", None).await.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (alice, _) = create_key(&proxy, json!({"name": "alice"})).await;
    let (bob, _) = create_key(&proxy, json!({"name": "bob", "rpm": 100})).await;
    let hello = json!({"model": "gpt-4o"});
    for key in [&alice, &bob, &alice] {
        assert_eq!(
            chat(&proxy, Some(key), "authorization", hello.clone())
                .await
                .status,
            200
        );
    }
    let refused = chat(&proxy, Some(&bob), "authorization", hello.clone()).await;
    assert_eq!(
        openai_error(&refused),
        (429, "requests".into(), "rate_limit_exceeded".into())
    );
    let text = String::from_utf8_lossy(&refused.body).into_owned();
    assert!(
        text.contains("model gpt-4o") && text.contains("3 requests per minute"),
        "{text}"
    );
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("3"));
    // Another model is not held back.
    let other = chat(
        &proxy,
        Some(&bob),
        "authorization",
        json!({"model": "gpt-4.1-mini"}),
    )
    .await;
    assert_eq!(other.status, 200);
    // A pattern's TPM: estimated, then settled to the real usage (13 tokens).
    let big = json!({"model": "gpt-4.1-nano", "max_tokens": 900});
    assert_eq!(
        chat(&proxy, Some(&alice), "authorization", big.clone())
            .await
            .status,
        200
    );
    assert_eq!(
        chat(&proxy, Some(&bob), "authorization", big.clone())
            .await
            .status,
        200
    );
    let huge = json!({"model": "gpt-4.1-large", "max_tokens": 995});
    let refused = chat(&proxy, Some(&alice), "authorization", huge).await;
    assert_eq!(openai_error(&refused).1, "tokens");
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));
    backend.remove().await;
}
