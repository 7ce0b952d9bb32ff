//! The real binary: check-config, quick start, logs, signals and shutdown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use common::bin::{BIN, Bin};

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("llmproxy-test-{}-{name}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

async fn check_config(path: impl AsRef<std::ffi::OsStr>) -> std::process::Output {
    Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn check_config_accepts_the_demo_and_names_the_bad_field() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.yaml");
    let ok = check_config(demo).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok"));

    let bad = temp_config(
        "bad",
        "upstream:\n  base_url: http://x/v1\n  timeouts:\n    conect: 1s\n",
    );
    let out = check_config(&bad).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&bad.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(
        stderr.contains("upstream.timeouts.conect"),
        "names the field: {stderr}"
    );

    let missing = temp_config(
        "missing-var",
        "upstream:\n  base_url: http://x/v1\n  default_headers:\n    Authorization: Bearer ${LLMPROXY_SURELY_UNSET_VAR}\n",
    );
    let out = check_config(&missing).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LLMPROXY_SURELY_UNSET_VAR is not set"));

    let absent = check_config("/nonexistent/llmproxy.yaml").await;
    assert_eq!(absent.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&absent.stderr).contains("/nonexistent/llmproxy.yaml"));
}

#[tokio::test]
async fn quick_start_flags_serve_and_keys_never_reach_the_logs() {
    let upstream = spawn_upstream(|_| Reply::json(200, r#"{"ok":true}"#)).await;
    let upstream_url = upstream.base_url();
    let bin = Bin::start(
        &[
            "--upstream",
            &upstream_url,
            "--header",
            "Authorization: Bearer ${LLMPROXY_TEST_KEY}",
        ],
        &[
            ("LLMPROXY_TEST_KEY", "sk-upstream-secret-1"),
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    let request = "POST /v1/chat/completions?api-key=sk-query-secret-3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client-secret-2\r\n\
         X-Api-Key: sk-client-secret-2\r\nApi-Key: sk-client-secret-2\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let (answer, _) = raw_exchange(bin.addr, request.as_bytes(), Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        upstream.requests()[0].headers["authorization"],
        "Bearer sk-upstream-secret-1"
    );

    // A failing request too: its error message must not carry keys either.
    drop(upstream);
    let (failed, _) = raw_exchange(bin.addr, request.as_bytes(), Duration::from_secs(5)).await;
    let failed = String::from_utf8_lossy(&failed).to_string();
    assert!(failed.starts_with("HTTP/1.1 502"), "{failed}");

    bin.terminate();
    let mut bin = bin;
    assert!(bin.wait_exit(Duration::from_secs(10)).await.success());
    let logs = bin.logs();
    assert!(
        logs.contains("llmproxy::access"),
        "access log written: {logs}"
    );
    for secret in [
        "sk-upstream-secret-1",
        "sk-client-secret-2",
        "sk-query-secret-3",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret} leaked into the logs:\n{logs}"
        );
        assert!(
            !answer.contains(secret) && !failed.contains(secret),
            "{secret} leaked into a response"
        );
    }
}

#[tokio::test]
async fn json_access_log_has_one_line_per_request_with_every_field() {
    let upstream =
        spawn_upstream(|_| Reply::json(200, r#"{"ok":true}"#).header("x-request-id", "req_up"))
            .await;
    let mut bin = Bin::start(
        &["--upstream", &upstream.base_url(), "--log-format", "json"],
        &[],
    )
    .await;
    let got = post(&bin.url("/v1/chat/completions"), "{}").await;
    let id = got.header("x-llmproxy-request-id").unwrap().to_owned();
    bin.terminate();
    bin.wait_exit(Duration::from_secs(10)).await;
    let logs = bin.logs();
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "llmproxy::access")
        .collect();
    assert_eq!(access.len(), 1, "{logs}");
    let line = &access[0];
    assert_eq!(line["request_id"], id.as_str());
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/v1/chat/completions");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream_status"], 200);
    assert_eq!(line["bytes_in"], 2);
    assert_eq!(line["bytes_out"], 11);
    assert_eq!(line["outcome"], "complete");
    for field in ["latency_us", "ttfb_us", "upstream_us"] {
        assert!(line[field].as_u64().is_some(), "{field}: {line}");
    }
    assert!(line["upstream_us"].as_u64() <= line["latency_us"].as_u64());
}

/// An upstream streaming `chunks` events 100 ms apart.
async fn slow_stream_upstream(chunks: usize) -> Upstream {
    spawn_upstream(move |_| {
        Reply::sse(
            (0..chunks)
                .map(|i| (Duration::from_millis(100), event(&i.to_string())))
                .collect(),
        )
    })
    .await
}

/// Starts a streamed request on a raw connection and waits for its first bytes.
async fn open_stream(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut first = vec![0u8; 512];
    let _ = stream.read(&mut first).await.unwrap();
    stream
}

#[tokio::test]
async fn sigterm_stops_accepting_lets_streams_finish_and_exits_zero() {
    let upstream = slow_stream_upstream(10).await;
    let mut bin = Bin::start(&["--upstream", &upstream.base_url()], &[]).await;
    let mut stream = open_stream(bin.addr).await;
    bin.terminate();

    // New connections are refused soon after the signal...
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(bin.addr).await.is_err(),
        "still accepting after SIGTERM"
    );
    // ...while the in-flight stream runs to its clean end.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("data: 9") && text.ends_with("0\r\n\r\n"),
        "{text}"
    );
    assert!(bin.wait_exit(Duration::from_secs(5)).await.success());
}

#[tokio::test]
async fn shutdown_deadline_cuts_streams_that_run_too_long() {
    let upstream = slow_stream_upstream(100).await;
    let config = temp_config(
        "deadline",
        &format!(
            "upstream:\n  base_url: {}\nshutdown_timeout: 500ms\n",
            upstream.base_url()
        ),
    );
    let mut bin = Bin::start(&["--config", config.to_str().unwrap()], &[]).await;
    let mut stream = open_stream(bin.addr).await;
    let start = Instant::now();
    bin.terminate();
    assert!(bin.wait_exit(Duration::from_secs(5)).await.success());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await;
    assert!(
        !String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"),
        "a cut stream must not look complete"
    );
}

#[tokio::test]
async fn missing_config_and_bad_flags_fail_with_a_clear_message() {
    let out = Command::new(BIN).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    let out = Command::new(BIN)
        .args(["--upstream", "ftp://x"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.base_url"));
}

#[tokio::test]
async fn every_example_config_passes_check_config() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut command = Command::new(BIN);
        command.arg("check-config").arg(&path);
        // Give every ${VAR} the example names a value.
        for var in text
            .split("${")
            .skip(1)
            .filter_map(|rest| rest.split_once('}'))
        {
            command.env(var.0, "sk-example");
        }
        let out = command.output().await.unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} examples checked");
}

#[tokio::test]
async fn routed_requests_log_their_upstream_and_attempts() {
    let failing = spawn_upstream(|_| Reply::json(503, r#"{"error":{"message":"busy"}}"#)).await;
    let working = spawn_upstream(|_| Reply::json(200, r#"{"ok":true}"#)).await;
    let config = temp_config(
        "routed",
        &format!(
            "upstreams:\n  first:\n    base_url: {}\n  second:\n    base_url: {}\nmodels:\n  m:\n    strategy: round_robin\n    retry:\n      backoff: 1ms\n    deployments:\n      - upstream: first\n      - upstream: second\n",
            failing.base_url(),
            working.base_url()
        ),
    );
    let mut bin = Bin::start(
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
        &[("RUST_LOG", "info,llmproxy::routing=debug")],
    )
    .await;
    let got = post(&bin.url("/v1/chat/completions"), r#"{"model":"m"}"#).await;
    assert_eq!(got.status, 200);
    bin.terminate();
    bin.wait_exit(Duration::from_secs(10)).await;
    let logs = bin.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let line = lines
        .iter()
        .find(|v| v["target"] == "llmproxy::access")
        .unwrap_or_else(|| panic!("no access line in {logs}"));
    assert_eq!(line["upstream"], "second");
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["attempt_path"], "first:503,second:200");
    assert_eq!(line["model"], "m");
    assert_eq!(line["status"], 200);
    // One debug line per attempt: deployment, outcome, duration.
    let attempts: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v["message"] == "attempt").collect();
    assert_eq!(attempts.len(), 2, "{logs}");
    assert_eq!(attempts[0]["upstream"], "first");
    assert_eq!(attempts[0]["outcome"], "503");
    assert!(attempts[1]["duration_us"].as_u64().is_some());
}

#[tokio::test]
async fn body_failures_are_logged_by_their_cause() {
    let dying = spawn_dying_upstream().await;
    let silent = spawn_upstream(|_| {
        let mut reply = Reply::sse(vec![(Duration::ZERO, event("first"))]);
        reply.end = End::Hang;
        reply
    })
    .await;
    let long = slow_stream_upstream(50).await;
    let config = temp_config(
        "body-kinds",
        &format!(
            "upstreams:\n  dying:\n    base_url: {}\n  silent:\n    base_url: {}\n    timeouts:\n      idle: 300ms\n  long:\n    base_url: {}\n    timeouts:\n      total: 300ms\nmodels:\n  dying:\n    deployments:\n      - upstream: dying\n  silent:\n    deployments:\n      - upstream: silent\n  long:\n    deployments:\n      - upstream: long\n",
            dying.base_url(),
            silent.base_url(),
            long.base_url()
        ),
    );
    let mut bin = Bin::start(
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
        &[],
    )
    .await;
    // The silent one last, so its upstream connection is checked right after the abort.
    for model in ["dying", "long", "silent"] {
        let (status, failed) = post_expecting_abort(
            &bin.url("/v1/chat/completions"),
            Box::leak(format!(r#"{{"model":"{model}"}}"#).into_boxed_str()),
        )
        .await;
        assert_eq!(status, 200);
        assert!(failed, "{model}: the body must fail");
    }
    // The silent upstream's connection is closed by the idle timeout, not
    // left to the client: by the time the client has seen the abort it is
    // closed (give the upstream's own task a moment to notice the EOF).
    let closed_after = silent
        .wait_closed(1, Duration::from_secs(5))
        .await
        .expect("the silent upstream's connection stayed open");
    assert!(
        closed_after < Duration::from_millis(250),
        "the upstream connection outlived the client's abort by {closed_after:?}"
    );
    bin.terminate();
    bin.wait_exit(Duration::from_secs(10)).await;
    let logs = bin.logs();
    let kinds: Vec<(String, String)> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "llmproxy::access")
        .map(|v| {
            (
                v["model"].as_str().unwrap_or_default().to_owned(),
                v["error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (model, kind) in [
        ("dying", "upstream_reset"),
        ("silent", "upstream_idle_timeout"),
        ("long", "upstream_total_timeout"),
    ] {
        assert!(
            kinds.contains(&(model.to_owned(), kind.to_owned())),
            "{model} → {kind} not in {kinds:?}"
        );
    }
}

#[tokio::test]
async fn check_config_says_what_it_checked() {
    assert_check(
        "summary",
        "upstreams:\n  a:\n    base_url: http://a/v1\n  b:\n    base_url: http://b/v1\nmodels:\n  m:\n    deployments:\n      - upstream: a\n  n:\n    deployments:\n      - upstream: b\n  o:\n    deployments:\n      - upstream: b\n",
        0,
        &[": ok: 2 upstreams, 3 models, listen 127.0.0.1:8080"],
    )
    .await;
}

/// Runs `check-config` on `text` and checks its exit code and that what it
/// printed contains each of `expected`; returns what it printed.
async fn assert_check(name: &str, text: &str, code: i32, expected: &[&str]) -> String {
    let (got, printed) = check_config_text(name, text).await;
    assert_eq!(got, Some(code), "{printed}");
    for part in expected {
        assert!(printed.contains(part), "`{part}` not in: {printed}");
    }
    printed
}

/// `check-config` on `text`: the exit code and what it printed.
async fn check_config_text(name: &str, text: &str) -> (Option<i32>, String) {
    let path = temp_config(name, text);
    let out = check_config(&path).await;
    let _ = std::fs::remove_file(&path);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn config_errors_never_print_a_secret() {
    const SECRET: &str = "sk-live-0123456789abcdefSECRET";
    let files = [
        "upstream:\n  base_url: \"https://h/v1?key=${LLMPROXY_TEST_SECRET}\"\n",
        "upstream:\n  base_url: ${LLMPROXY_TEST_SECRET}\n",
        "upstream:\n  base_url: https://h/v1\n  default_headers: \"Authorization Bearer sk-live-0123456789abcdefSECRET\"\n",
        "upstream:\n  base_url: https://h/v1\n  default_headers:\n    - \"Authorization: Bearer sk-live-0123456789abcdefSECRET\"\n",
        "upstream:\n  base_url: https://h/v1\n  default_headers:\n    Authorization: [\"Bearer sk-live-0123456789abcdefSECRET\"]\n",
        "upstream:\n  base_url: https://h/v1\n  default_headers:\n    Authorization: \"Bearer ${LLMPROXY_TEST_SECRET}\\n\"\n",
        "upstream:\n  base_url: \"https://h/v1?key=sk-live-0123456789abcdefSECRET\"\n",
        "upstream:\n  base_url: https://h/v1\nadmin:\n  token: ${LLMPROXY_TEST_SHORT}\n",
    ];
    for (i, text) in files.iter().enumerate() {
        let path = temp_config(&format!("secret-{i}"), text);
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .env("LLMPROXY_TEST_SECRET", SECRET)
            .env("LLMPROXY_TEST_SHORT", "sk-short")
            .output()
            .await
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{text}: {printed}");
        assert!(!printed.contains("0123456789abcdef"), "{text}: {printed}");
        assert!(!printed.contains("sk-short"), "{text}: {printed}");
    }
    // The quick-start flags, at start-up.
    for args in [
        vec![
            "--upstream",
            "http://h/v1?key=sk-live-0123456789abcdefSECRET",
        ],
        vec![
            "--upstream",
            "http://h/v1",
            "-H",
            "sk-live-0123456789abcdefSECRET",
        ],
        vec![
            "--upstream",
            "http://h/v1",
            "-H",
            "Bearer sk-live-0123456789abcdefSECRET",
        ],
        vec!["--upstream", "sk-live-0123456789abcdefSECRET"],
    ] {
        let out = Command::new(BIN).args(&args).output().await.unwrap();
        let printed = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {printed}");
        assert!(!printed.contains("0123456789abcdef"), "{args:?}: {printed}");
    }
}

#[tokio::test]
async fn durations_that_would_overflow_are_refused_at_load() {
    for (yaml, field) in [
        (
            "upstream:\n  base_url: http://x/v1\n  timeouts:\n    idle: 500000000000y\n",
            "upstream.timeouts.idle",
        ),
        (
            "upstream:\n  base_url: http://x/v1\n  timeouts:\n    total: 18446744073709551615s\n",
            "upstream.timeouts.total",
        ),
        (
            "upstream:\n  base_url: http://x/v1\nlimits:\n  header_read_timeout: 18446744073709551615s\n",
            "limits.header_read_timeout",
        ),
        (
            "upstreams:\n  a:\n    base_url: http://x/v1\nmodels:\n  m:\n    retry:\n      deadline: 100000000d\n    deployments:\n      - upstream: a\n",
            "models.m.retry.deadline",
        ),
    ] {
        assert_check("duration", yaml, 2, &[field, "maximum"]).await;
    }
}

#[tokio::test]
async fn framing_headers_are_refused_as_defaults() {
    for name in ["Content-Length", "Transfer-Encoding", "Host", "Expect"] {
        assert_check(
            "framing",
            &format!("upstream:\n  base_url: http://x/v1\n  default_headers:\n    {name}: \"2\"\n"),
            2,
            &[&format!("upstream.default_headers.{name}")],
        )
        .await;
    }
}

#[tokio::test]
async fn check_config_stays_fast_on_pathological_and_huge_files() {
    let nested = format!(
        "upstream:\n  base_url: http://x/v1\nlog: {}\n",
        "[".repeat(200_000)
    );
    let started = Instant::now();
    let (code, printed) = check_config_text("nested", &nested).await;
    assert_eq!(code, Some(2));
    assert!(printed.contains("nested deeper than"), "{printed}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let mut many = String::from("upstreams:\n  a:\n    base_url: http://a/v1\nmodels:\n");
    for i in 0..50_000 {
        many.push_str(&format!(
            "  m{i}:\n    fallbacks: [m0]\n    deployments:\n      - upstream: a\n"
        ));
    }
    many = many.replacen("  m0:\n    fallbacks: [m0]\n", "  m0:\n", 1);
    let started = Instant::now();
    let (code, printed) = check_config_text("many", &many).await;
    assert_eq!(code, Some(0), "{}", &printed[..printed.len().min(300)]);
    // Generous for a debug build on a shared core; the trial saw 8.6 s in release.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

// A newcomer's first hour (issue 8) ----------------------------------------------

/// Runs the binary with `args` to completion: exit code and stderr.
async fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().await.unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn log_levels_that_would_silence_the_log_are_refused() {
    for level in ["loud", "warning", "info,,", "", "llmproxy=loud"] {
        let text = format!("upstream:\n  base_url: http://x/v1\nlog:\n  level: \"{level}\"\n");
        assert_check("level", &text, 2, &["log.level"]).await;
    }
    for level in ["info", "INFO", "warn", "llmproxy=debug,info"] {
        let text = format!("upstream:\n  base_url: http://x/v1\nlog:\n  level: \"{level}\"\n");
        assert_check("level-ok", &text, 0, &[]).await;
    }
    let (code, printed) = run_bin(
        &["--upstream", "http://127.0.0.1:9/v1"],
        &[("RUST_LOG", "loud")],
    )
    .await;
    assert_eq!(code, Some(2), "{printed}");
    assert!(printed.contains("RUST_LOG"), "{printed}");

    // A filter that does turn the access log off is allowed, and said.
    let config = temp_config(
        "warn-level",
        "upstream:\n  base_url: http://127.0.0.1:9/v1\nlog:\n  level: warn\n",
    );
    let mut child = Command::new(BIN)
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(line.contains("turns the access log off"), "{line}");
}

#[tokio::test]
async fn bind_errors_name_the_role_and_the_address() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let (code, printed) = run_bin(
        &[
            "--upstream",
            "http://127.0.0.1:9/v1",
            "--listen",
            &addr.to_string(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed.contains(&format!("llmproxy cannot listen on {addr}")),
        "{printed}"
    );
    let port = addr.port().to_string();
    for dialect in ["all", "openai", "anthropic", "gemini"] {
        let (code, printed) = run_bin(
            &["mock-upstream", "--dialect", dialect, "--port", &port],
            &[],
        )
        .await;
        assert_eq!(code, Some(1), "{printed}");
        assert!(
            printed.contains(&format!("the mock upstream cannot listen on {addr}")),
            "{printed}"
        );
    }
    let (code, printed) = run_bin(&["mock-upstream", "--dialect", "klingon"], &[]).await;
    assert_eq!(code, Some(2), "{printed}");
    assert!(printed.contains("openai, anthropic, gemini"), "{printed}");
}

#[tokio::test]
async fn the_demo_stops_when_its_port_is_taken() {
    // Holds 9000 unless something else already does: either way it is taken.
    let _held = std::net::TcpListener::bind("127.0.0.1:9000");
    let started = Instant::now();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("127.0.0.1:9000 (for the mock upstream) is already in use"),
        "{stderr}"
    );
    // It stopped before building or starting anything.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let upstream = slow_stream_upstream(100).await;
    let mut bin = Bin::start(&["--upstream", &upstream.base_url()], &[]).await;
    let _stream = open_stream(bin.addr).await;
    bin.signal("-INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        bin.logs()
            .contains("draining 1 connection(s) for up to 30s; press Ctrl-C"),
        "{}",
        bin.logs()
    );
    let started = Instant::now();
    bin.signal("-INT");
    let status = bin.wait_exit(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(130));
    assert!(
        bin.logs().contains("second SIGINT received"),
        "{}",
        bin.logs()
    );
}

#[tokio::test]
async fn the_shipped_defaults_start_without_a_warning() {
    let mut bin = Bin::start(&["--upstream", "http://127.0.0.1:9/v1"], &[]).await;
    bin.terminate();
    bin.wait_exit(Duration::from_secs(5)).await;
    let logs = bin.logs();
    assert!(!logs.contains("WARN"), "{logs}");
    // A limit the user chose and the machine cannot carry is still said.
    let config = temp_config(
        "huge-limits",
        "upstream:\n  base_url: http://127.0.0.1:9/v1\nlimits:\n  max_connections: 100000000\n",
    );
    let mut bin = Bin::start(&["--config", config.to_str().unwrap()], &[]).await;
    bin.terminate();
    bin.wait_exit(Duration::from_secs(5)).await;
    assert!(bin.logs().contains("lowered"), "{}", bin.logs());
}

#[tokio::test]
async fn missing_variables_are_reported_together_and_no_env_checks_structure() {
    let text = "upstreams:\n  a:\n    base_url: ${LLMPROXY_T_URL}\n    default_headers:\n      Authorization: Bearer ${LLMPROXY_T_KEY_A}\n  b:\n    base_url: https://b.example/v1\n    default_headers:\n      api-key: ${LLMPROXY_T_KEY_B}\nmodels:\n  m:\n    deployments:\n      - upstream: a\n      - upstream: b\nadmin:\n  token: ${LLMPROXY_T_ADMIN}\n";
    let (code, printed) = check_config_text("vars", text).await;
    assert_eq!(code, Some(2), "{printed}");
    for name in [
        "LLMPROXY_T_URL",
        "LLMPROXY_T_KEY_A",
        "LLMPROXY_T_KEY_B",
        "LLMPROXY_T_ADMIN",
    ] {
        assert!(printed.contains(name), "{name}: {printed}");
    }
    assert!(
        printed.contains("4 environment variables are not set"),
        "{printed}"
    );

    let path = temp_config("vars-no-env", text);
    let (code, printed) = run_bin(&["check-config", "--no-env", path.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(0), "{printed}");
    assert!(printed.contains("structure only"), "{printed}");
    // Structure is still checked.
    let broken = temp_config(
        "vars-no-env-bad",
        &text.replace("upstream: b", "upstream: c"),
    );
    let (code, printed) =
        run_bin(&["check-config", "--no-env", broken.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.contains("models.m.deployments[1].upstream"),
        "{printed}"
    );
}

#[tokio::test]
async fn likely_mistakes_are_warned_about() {
    assert_check(
        "no-version",
        "upstream:\n  base_url: http://127.0.0.1:9200\n",
        0,
        &["warning: upstream.base_url: has no version segment"],
    )
    .await;
    // A header flag in double quotes whose variable the shell expanded to nothing.
    let mut bin = Bin::start(
        &[
            "--upstream",
            "http://127.0.0.1:9/v1",
            "-H",
            "Authorization: Bearer ",
        ],
        &[],
    )
    .await;
    bin.terminate();
    bin.wait_exit(Duration::from_secs(5)).await;
    assert!(
        bin.logs()
            .contains("upstream.default_headers.Authorization: the value is empty"),
        "{}",
        bin.logs()
    );
    // A bare number where a duration belongs shows the accepted forms.
    assert_check(
        "bare-duration",
        "upstream:\n  base_url: http://x/v1\n  timeouts:\n    connect: 10\n",
        2,
        &["500ms, 10s, 5m"],
    )
    .await;
    // Every URL error carries the same hint.
    for url in [
        "api.openai.com/v1",
        "api.openai.com",
        "ftp://x/v1",
        "http://",
    ] {
        let text = format!("upstream:\n  base_url: \"{url}\"\n");
        assert_check("bad-url", &text, 2, &["e.g. https://api.openai.com/v1"]).await;
    }
}

#[tokio::test]
async fn the_real_cause_of_a_failure_is_in_the_answer_and_the_log() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let config = temp_config(
        "cause",
        &format!(
            "upstreams:\n  a:\n    base_url: http://{dead_addr}/v1\nmodels:\n  m:\n    retry:\n      backoff: 1ms\n    circuit_breaker:\n      failures: 1\n    deployments:\n      - upstream: a\nlog:\n  format: json\n"
        ),
    );
    let mut bin = Bin::start(&["--config", config.to_str().unwrap()], &[]).await;
    let got = post(&bin.url("/v1/chat/completions"), r#"{"model":"m"}"#).await;
    // Not "cooling down": the breaker opened because of this very failure.
    assert_eq!(got.status, 502, "{}", String::from_utf8_lossy(&got.body));
    let message = got.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(&format!("upstream a ({dead_addr})")) && message.contains("refused"),
        "{message}"
    );
    assert_eq!(got.header("x-llmproxy-attempts"), Some("1"));
    bin.terminate();
    bin.wait_exit(Duration::from_secs(5)).await;
    let logs = bin.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("llmproxy::access"))
        .expect("no access line");
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["model"], "m", "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    assert!(
        line["error_detail"]
            .as_str()
            .unwrap()
            .contains(&dead_addr.to_string()),
        "{line}"
    );
}

#[test]
fn the_project_has_a_license() {
    let root = env!("CARGO_MANIFEST_DIR");
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"MIT OR Apache-2.0\""));
    for file in ["LICENSE-MIT", "LICENSE-APACHE"] {
        assert!(
            std::fs::metadata(format!("{root}/{file}")).is_ok(),
            "{file}"
        );
    }
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    assert!(
        readme.contains("cargo install --locked --path ."),
        "README has no install step"
    );
}

#[tokio::test]
async fn the_configuration_reference_in_the_readme_is_valid() {
    const MARK: &str =
        "<!-- checked by tests/cli.rs: the_configuration_reference_in_the_readme_is_valid -->";
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split(MARK)
        .skip(1)
        .map(|after| {
            let start = after
                .find("```yaml\n")
                .expect("a yaml block after the mark")
                + 8;
            let end = start + after[start..].find("```").unwrap();
            &after[start..end]
        })
        .collect();
    assert_eq!(blocks.len(), 2, "the reference has two checked blocks");
    // Every key of the file format appears in the reference.
    let all = blocks.concat();
    for key in [
        "listen:",
        "upstream:",
        "upstreams:",
        "models:",
        "base_url:",
        "default_headers:",
        "connect:",
        "response_headers:",
        "idle:",
        "total:",
        "max_concurrent:",
        "max_body_size:",
        "max_connections:",
        "max_in_flight:",
        "max_streams_per_connection:",
        "max_buffered_bytes:",
        "header_read_timeout:",
        "body_read_timeout:",
        "admin:",
        "token:",
        "shutdown_timeout:",
        "format:",
        "level:",
        "strategy:",
        "deployments:",
        "model:",
        "weight:",
        "attempts:",
        "backoff:",
        "max_backoff:",
        "retry_after_cap:",
        "deadline:",
        "on_status:",
        "on_connect_error:",
        "on_timeout:",
        "circuit_breaker:",
        "enabled:",
        "failures:",
        "window:",
        "cooldown:",
        "fallbacks:",
        "context_window_fallbacks:",
        "provider:",
        "session_header:",
    ] {
        assert!(all.contains(key), "the README reference lacks `{key}`");
    }
    for (i, block) in blocks.iter().enumerate() {
        let path = temp_config(&format!("readme-{i}"), block);
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .env("OPENAI_API_KEY", "sk-readme")
            .env("LLMPROXY_ADMIN_TOKEN", "a-long-enough-admin-token")
            .output()
            .await
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "README block {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
