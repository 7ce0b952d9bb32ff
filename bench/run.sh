#!/usr/bin/env bash
# The benchmark: the mock upstream alone (direct), nginx and llmproxy, side
# by side on this machine. Installs what it needs, builds, runs bench.py.
#   bench/run.sh            full run (~4 min), writes bench/RESULTS.md and bench/latency.png
#   bench/run.sh --smoke    seconds-long run for CI, writes target/bench/ (no chart)
# nginx and wrk (and gnuplot for a full run's chart) come from Debian's
# packages; when missing they are installed with apt-get, which needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v taskset >/dev/null || missing+=(util-linux)
if [ "${1:-}" != "--smoke" ]; then
  command -v gnuplot >/dev/null || missing+=(gnuplot-nox)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Two builds: an example pulls in dev-dependency features (tokio test-util),
# which must not leak into the binary under test.
cargo build --release --locked --bin llmproxy
cargo build --release --locked --example bench_probe
exec python3 bench/bench.py "$@"
