//! The official OpenAI SDKs (Python and Node) as real clients, through the
//! proxy to the built-in mock upstream, streamed and not.
//!
//! `scripts/sdk-setup.sh` installs the pinned SDKs; `scripts/test.sh` runs it
//! first. Without them the tests fail under `CI=true` and are skipped (with a
//! message) elsewhere, so a plain `cargo test` still works offline.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a test fails loudly, and its servers and clients spawn freely"
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tokio::net::TcpListener;
use tokio::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the mock upstream (all its dialects; `chunks` words, `delay_ms`
/// apart) and returns its address.
async fn spawn_mock(chunks: usize, delay_ms: u64) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = llmproxy::mock::MockConfig {
        chunks,
        delay: Duration::from_millis(delay_ms),
        ..Default::default()
    };
    tokio::spawn(llmproxy::mock::serve(listener, mock));
    addr
}

/// Starts the mock upstream (fast chunks) and a proxy in front of it.
async fn proxy_to_mock() -> Proxy {
    let addr = spawn_mock(12, 5).await;
    spawn_proxy_with(config_for(&format!("http://{addr}/v1"))).await
}

/// Whether the SDK is installed; in CI a missing SDK is a failure, not a skip.
#[expect(
    clippy::print_stderr,
    reason = "tell the developer why a test was skipped"
)]
fn installed(what: &str, path: &Path) -> bool {
    if path.exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is not installed at {} (run scripts/sdk-setup.sh)",
        path.display()
    );
    eprintln!("skipping: {what} not installed (run scripts/sdk-setup.sh)");
    false
}

async fn run_client(mut command: Command, proxy: &Proxy) {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        command
            .env("OPENAI_BASE_URL", proxy.url("/v1"))
            .env_remove("OPENAI_API_KEY")
            .output(),
    )
    .await
    .expect("SDK client timed out")
    .unwrap();
    assert!(
        output.status.success(),
        "SDK client failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn official_python_sdk_works_through_the_proxy() {
    let python: PathBuf = root().join(".sdk/venv/bin/python");
    if !installed("the Python openai SDK", &python) {
        return;
    }
    let proxy = proxy_to_mock().await;
    let mut command = Command::new(python);
    command.arg(root().join("tests/sdk/openai_python.py"));
    run_client(command, &proxy).await;
}

#[tokio::test]
async fn official_node_sdk_works_through_the_proxy() {
    if !installed(
        "the Node openai SDK",
        &root().join("tests/sdk/node_modules/openai"),
    ) {
        return;
    }
    let proxy = proxy_to_mock().await;
    let mut command = Command::new("node");
    command.arg(root().join("tests/sdk/openai_node.mjs"));
    run_client(command, &proxy).await;
}

/// A gateway requiring keys in front of the mock, and a key allowed 2
/// requests per minute.
async fn gateway_with_key() -> (Proxy, String, std::path::PathBuf) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = llmproxy::mock::MockConfig {
        chunks: 4,
        delay: Duration::from_millis(1),
        ..Default::default()
    };
    tokio::spawn(llmproxy::mock::serve(listener, mock));
    let db = std::env::temp_dir().join(format!(
        "llmproxy-sdk-{}-{}.db",
        std::process::id(),
        addr.port()
    ));
    let yaml = format!(
        "upstream:\n  base_url: http://{addr}/v1\nadmin:\n  token: sdk-admin-token-0123456\n\
         store:\n  url: sqlite://{}\nkeys:\n  required: true\n",
        db.display()
    );
    let proxy = spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await;
    let mut created = None;
    for _ in 0..200 {
        let request = http::Request::post(proxy.url("/admin/keys"))
            .header("authorization", "Bearer sdk-admin-token-0123456")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"name":"sdk","rpm":2}"#,
            )))
            .unwrap();
        if let Ok(response) = client().request(request).await {
            use http_body_util::BodyExt;
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            created = json["key"].as_str().map(str::to_owned);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (proxy, created.expect("a key"), db)
}

#[tokio::test]
async fn official_python_sdk_maps_virtual_key_errors_to_its_exceptions() {
    let python: PathBuf = root().join(".sdk/venv/bin/python");
    if !installed("the Python openai SDK", &python) {
        return;
    }
    let (proxy, key, db) = gateway_with_key().await;
    let mut command = Command::new(python);
    command
        .arg(root().join("tests/sdk/keys_python.py"))
        .env("VIRTUAL_KEY", key);
    run_client(command, &proxy).await;
    let _ = std::fs::remove_file(db);
}

#[tokio::test]
async fn official_node_sdk_maps_virtual_key_errors_to_its_exceptions() {
    if !installed(
        "the Node openai SDK",
        &root().join("tests/sdk/node_modules/openai"),
    ) {
        return;
    }
    let (proxy, key, db) = gateway_with_key().await;
    let mut command = Command::new("node");
    command
        .arg(root().join("tests/sdk/keys_node.mjs"))
        .env("VIRTUAL_KEY", key);
    run_client(command, &proxy).await;
    let _ = std::fs::remove_file(db);
}

/// A proxy whose upstream is the mock's Anthropic dialect (`provider: anthropic`).
async fn proxy_to_anthropic_mock() -> Proxy {
    proxy_to_dialect("anthropic").await
}

/// A proxy whose upstream is one of the mock's dialects.
async fn proxy_to_dialect(provider: &str) -> Proxy {
    let addr = spawn_mock(6, 1).await;
    let version = if provider == "gemini" { "v1beta" } else { "v1" };
    let yaml = format!(
        "upstream:\n  base_url: http://{addr}/{version}\n  provider: {provider}\n  default_headers:\n    x-api-key: sk-mock\n"
    );
    spawn_proxy_with(llmproxy::config::parse(&yaml, "test").unwrap()).await
}

#[tokio::test]
async fn official_python_sdk_reaches_an_anthropic_upstream() {
    let python: PathBuf = root().join(".sdk/venv/bin/python");
    if !installed("the Python openai SDK", &python) {
        return;
    }
    let proxy = proxy_to_anthropic_mock().await;
    let mut command = Command::new(python);
    command.arg(root().join("tests/sdk/translated_python.py"));
    run_client(command, &proxy).await;
}

#[tokio::test]
async fn official_node_sdk_reaches_an_anthropic_upstream() {
    if !installed(
        "the Node openai SDK",
        &root().join("tests/sdk/node_modules/openai"),
    ) {
        return;
    }
    let proxy = proxy_to_anthropic_mock().await;
    let mut command = Command::new("node");
    command.arg(root().join("tests/sdk/translated_node.mjs"));
    run_client(command, &proxy).await;
}

async fn run_anthropic_client(upstream: &str, proxy: &Proxy) {
    let python: PathBuf = root().join(".sdk/venv/bin/python");
    let mut command = Command::new(python);
    command
        .arg(root().join("tests/sdk/anthropic_python.py"))
        .env("UPSTREAM", upstream)
        .env("ANTHROPIC_BASE_URL", proxy.url(""))
        .env_remove("ANTHROPIC_API_KEY");
    run_client(command, proxy).await;
}

fn anthropic_sdk_installed() -> bool {
    installed_anywhere()
        || installed(
            "the Python anthropic SDK",
            &root().join(".sdk/venv/lib/python3.11/site-packages/anthropic"),
        )
}

/// The venv's Python version may differ from 3.11: look for the package.
fn installed_anywhere() -> bool {
    std::fs::read_dir(root().join(".sdk/venv/lib"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|dir| dir.path().join("site-packages/anthropic").exists())
}

#[tokio::test]
async fn official_anthropic_sdk_reaches_an_openai_upstream_through_messages() {
    if !anthropic_sdk_installed() {
        return;
    }
    let proxy = proxy_to_mock().await;
    run_anthropic_client("openai", &proxy).await;
}

#[tokio::test]
async fn official_anthropic_sdk_passes_through_to_an_anthropic_upstream() {
    if !anthropic_sdk_installed() {
        return;
    }
    let proxy = proxy_to_anthropic_mock().await;
    run_anthropic_client("anthropic", &proxy).await;
}

#[tokio::test]
async fn official_sdks_reach_a_gemini_upstream() {
    let python: PathBuf = root().join(".sdk/venv/bin/python");
    if installed("the Python openai SDK", &python) {
        let proxy = proxy_to_dialect("gemini").await;
        let mut command = Command::new(python);
        command
            .arg(root().join("tests/sdk/translated_python.py"))
            .env("PROMPT_TOKENS", "8");
        run_client(command, &proxy).await;
    }
    if installed(
        "the Node openai SDK",
        &root().join("tests/sdk/node_modules/openai"),
    ) {
        let proxy = proxy_to_dialect("gemini").await;
        let mut command = Command::new("node");
        command
            .arg(root().join("tests/sdk/translated_node.mjs"))
            .env("PROMPT_TOKENS", "8");
        run_client(command, &proxy).await;
    }
}

/// The README's provider examples, as written there, against
/// `examples/providers.yaml` (its mock address swapped for this test's).
#[tokio::test]
async fn the_readme_provider_examples_run_as_written() {
    let python: PathBuf = root().join(".sdk/venv/bin/python");
    if !installed("the Python openai SDK", &python) || !anthropic_sdk_installed() {
        return;
    }
    let addr = spawn_mock(6, 1).await;
    let yaml = std::fs::read_to_string(root().join("examples/providers.yaml"))
        .unwrap()
        .replace("127.0.0.1:9000", &addr.to_string());
    let proxy = spawn_proxy_with(llmproxy::config::parse(&yaml, "providers.yaml").unwrap()).await;
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for marker in [r#"model="claude-sonnet""#, r#"model="gpt-4o", max_tokens"#] {
        let block = readme
            .split("```python\n")
            .skip(1)
            .filter_map(|rest| rest.split_once("```").map(|(code, _)| code))
            .find(|code| code.contains(marker))
            .unwrap_or_else(|| panic!("the README has no python example with {marker}"));
        let code = block.replace("http://127.0.0.1:8080", proxy.url("").trim_end_matches('/'));
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(&python)
                .arg("-c")
                .arg(&code)
                .env_remove("OPENAI_API_KEY")
                .env_remove("ANTHROPIC_API_KEY")
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("Hello from the llmproxy mock"),
            "{marker}:\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
