#!/usr/bin/env bash
# Starts the built-in mock upstream on 127.0.0.1:9000 and llmproxy on
# 127.0.0.1:8080 with examples/demo.yaml: a working gateway with no API key
# and no network. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

# Whether something already listens on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Checked before anything starts: a proxy in front of whatever else owns
# 9000 would answer, slowly and wrongly, instead of failing here.
for entry in 9000:"the mock upstream" 8080:llmproxy; do
  port=${entry%%:*} role=${entry#*:}
  if port_busy "$port"; then
    echo "demo: 127.0.0.1:$port (for $role) is already in use; stop what listens there (see: ss -ltnp 'sport = :$port') and run the demo again" >&2
    exit 1
  fi
done

cargo build --release --locked --bin llmproxy
./target/release/llmproxy mock-upstream --port 9000 &
mock=$!
trap 'kill $mock 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  port_busy 9000 && break
  if ! kill -0 "$mock" 2>/dev/null; then
    echo "demo: the mock upstream did not start (its error is above)" >&2
    exit 1
  fi
  sleep 0.05
done
status=0
./target/release/llmproxy --config examples/demo.yaml || status=$?
exit $status
