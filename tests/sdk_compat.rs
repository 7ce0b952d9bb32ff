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

/// Starts the mock upstream (fast chunks) and a proxy in front of it.
async fn proxy_to_mock() -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = llmproxy::mock::MockConfig {
        chunks: 12,
        delay: Duration::from_millis(5),
        ..Default::default()
    };
    tokio::spawn(llmproxy::mock::serve(listener, mock));
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
