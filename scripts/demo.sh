#!/usr/bin/env bash
# Starts the built-in mock upstream on :9000 and llmproxy on :8080 with
# examples/demo.yaml: a working gateway with no API key and no network.
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
./target/release/llmproxy mock-upstream --port 9000 &
mock=$!
trap 'kill $mock 2>/dev/null || true' EXIT
exec_status=0
./target/release/llmproxy --config examples/demo.yaml || exec_status=$?
exit $exec_status
