#!/usr/bin/env bash
# The project's one test command (README, CI): formatting, lints, and every
# test, including the official OpenAI SDKs as real clients.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing the pinned OpenAI SDKs"
./scripts/sdk-setup.sh

echo "== services the tests use (PostgreSQL, Redis)"
./scripts/services.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

echo "== cargo test"
cargo test --locked --all-targets

# The smoke needs nginx and wrk (Debian packages). bench/run.sh installs
# missing ones with apt-get, which needs root; without root and without
# them, the smoke is skipped (it proves the harness, not the proxy).
if { command -v nginx && command -v wrk; } >/dev/null || [ "$(id -u)" = 0 ]; then
  echo "== benchmark smoke (the harness must produce its table; speed is not asserted)"
  ./bench/run.sh --smoke
  test -s target/bench/RESULTS.md
  grep -q '| (a) requests/s' target/bench/RESULTS.md
else
  echo "== benchmark smoke skipped: nginx and wrk are not installed (as root, bench/run.sh installs them)"
fi
