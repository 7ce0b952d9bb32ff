#!/usr/bin/env bash
# Instructions per request on the proxy path, counted by callgrind: a figure
# that repeats run to run whatever else the machine is doing (bench/HISTORY.md
# compares commits with it).
#   bench/callgrind.sh [single|routed|nginx|keys|anthropic|gemini|messages] [requests]   (default: single 2000)
#   nginx: the same requests through nginx (one process, proxy_pass with
#   keepalive, buffered access log), for the user-space side of the comparison
#   keys: single with virtual keys, limits and usage on (SQLite store; a key
#   with RPM, TPM, concurrency limits and a budget; a price for the model);
#   the writer thread's work is counted too
#   anthropic: single, but the upstream is `provider: anthropic` (the mock's
#   /v1/messages): every request and answer translated
#   gemini: the same with `provider: gemini` (the mock's /v1beta/models/…)
#   messages: Anthropic's Messages API (POST /v1/messages) to the OpenAI
#   mock: the Messages front door translated to Chat and back
#   STREAM=1 bench/callgrind.sh ...   streamed requests (20 chunks) instead
#   BIN=/path/to/llmproxy bench/callgrind.sh ...    (another build, e.g. a baseline)
# Builds the release binary, starts the mock upstream and llmproxy under
# callgrind (one worker), warms up, zeroes the counters, sends the requests
# one after another on one keep-alive connection, and prints Ir / request.
# LOG_LEVEL=info includes the access log (default warn: logging off).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-single}
requests=${2:-2000}
command -v valgrind >/dev/null || { echo "callgrind: valgrind is not installed" >&2; exit 1; }
# BIN=path measures that binary instead of building this checkout's.
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  cargo build --release --locked --bin llmproxy >&2
  bin=${CARGO_TARGET_DIR:-target}/release/llmproxy
fi
tmp=$(mktemp -d)
cleanup() { kill "$mock" "$proxy" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(free_port)
proxy_port=$(free_port)
$bin mock-upstream --port "$mock_port" --chunks 20 --delay-ms 0 2>/dev/null &
mock=$!
if [ "$mode" = routed ]; then
  cat > "$tmp/config.yaml" <<YAML
upstreams:
  mock:
    base_url: http://127.0.0.1:$mock_port/v1
models:
  gpt-4o-mini:
    deployments:
      - upstream: mock
log:
  level: ${LOG_LEVEL:-warn}
YAML
else
  printf 'upstream:\n  base_url: http://127.0.0.1:%s/v1\nlog:\n  level: %s\n' "$mock_port" "${LOG_LEVEL:-warn}" > "$tmp/config.yaml"
fi
if [ "$mode" = anthropic ]; then
  printf 'upstream:\n  base_url: http://127.0.0.1:%s/v1\n  provider: anthropic\nlog:\n  level: %s\n' "$mock_port" "${LOG_LEVEL:-warn}" > "$tmp/config.yaml"
fi
if [ "$mode" = gemini ]; then
  printf 'upstream:\n  base_url: http://127.0.0.1:%s/v1beta\n  provider: gemini\nlog:\n  level: %s\n' "$mock_port" "${LOG_LEVEL:-warn}" > "$tmp/config.yaml"
fi
if [ "$mode" = keys ]; then
  cat >> "$tmp/config.yaml" <<YAML
admin:
  token: callgrind-admin-token-0123
store:
  url: sqlite://$tmp/usage.db
keys:
  required: true
prices:
  gpt-4o-mini: {input: 0.15, output: 0.6}
YAML
fi
if [ "$mode" = nginx ]; then
  command -v nginx >/dev/null || { echo "callgrind: nginx is not installed" >&2; exit 1; }
  mkdir -p "$tmp/nginx"
  cat > "$tmp/nginx.conf" <<NGINX
daemon off;
master_process off;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log $tmp/nginx-access.log combined buffer=64k flush=1s;
  client_body_temp_path $tmp/nginx;
  proxy_temp_path $tmp/nginx;
  fastcgi_temp_path $tmp/nginx;
  uwsgi_temp_path $tmp/nginx;
  scgi_temp_path $tmp/nginx;
  upstream mock { server 127.0.0.1:$mock_port; keepalive 64; }
  server {
    listen 127.0.0.1:$proxy_port;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
NGINX
  valgrind --tool=callgrind --callgrind-out-file="$tmp/out.%p" \
    nginx -c "$tmp/nginx.conf" -p "$tmp" 2>"$tmp/valgrind.log" &
else
  valgrind --tool=callgrind --callgrind-out-file="$tmp/out.%p" \
    $bin --config "$tmp/config.yaml" --listen "127.0.0.1:$proxy_port" --workers 1 2>"$tmp/valgrind.log" &
fi
proxy=$!
python3 - "$proxy_port" "$requests" "$proxy" "$tmp" "$mode" "${STREAM:-0}" <<'PY'
import http.client, json, subprocess, sys, time, glob
port, n, pid, tmp, mode, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1"
model = "gemini-2.5-flash" if mode == "gemini" else "gpt-4o-mini"
body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
path = "/v1/messages" if mode == "messages" else "/v1/chat/completions"
for _ in range(600):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        conn.getresponse().read()
        break
    except OSError:
        time.sleep(0.1)
headers = {"content-type": "application/json"}
if mode == "keys":
    spec = {"name": "callgrind", "rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6,
            "budget_usd": 10**9, "budget_period": "30d"}
    conn.request("POST", "/admin/keys", json.dumps(spec).encode(),
                 {"authorization": "Bearer callgrind-admin-token-0123", "content-type": "application/json"})
    r = conn.getresponse()
    headers["authorization"] = "Bearer " + json.loads(r.read())["key"]
def run(count):
    for _ in range(count):
        conn.request("POST", path, body, headers)
        r = conn.getresponse(); r.read()
        assert r.status == 200, r.status
run(200)
subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
run(n)
if mode == "keys":
    # Counted after the writer's next flush, so every record's write is in.
    time.sleep(1.5)
subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
time.sleep(0.5)
total = 0
for path in glob.glob(f"{tmp}/out.*"):
    for line in open(path):
        if line.startswith("summary:") or line.startswith("totals:"):
            total = max(total, int(line.split()[1]))
if mode == "keys":
    # The records must all be there (the writer flushes every second).
    import sqlite3
    with sqlite3.connect(f"{tmp}/usage.db") as db:
        stored = db.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]
    assert stored >= n + 200, f"{stored} usage records for {n + 200} requests"
print(f"instructions per request: {total // n:,} ({n} sequential {'streamed' if stream else 'non-streamed'} requests, one connection)")
PY
# CALLGRIND_KEEP=DIR keeps the profile for callgrind_annotate.
if [ -n "${CALLGRIND_KEEP:-}" ]; then mkdir -p "$CALLGRIND_KEEP"; cp "$tmp"/out.* "$CALLGRIND_KEEP"/; fi
