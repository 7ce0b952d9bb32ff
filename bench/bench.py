#!/usr/bin/env python3
"""llmproxy's benchmark: direct (mock upstream alone), nginx and llmproxy,
measured side by side in one run on this machine. Started by bench/run.sh.
llmproxy runs twice: speaking HTTP/1.1 to the upstream, as nginx does (the
column the targets are judged on), and HTTP/2 (`http2: true`, which nginx's
proxy module cannot do). A third llmproxy column runs with virtual keys,
limits and usage accounting on (SQLite): every request carries a key with
RPM, TPM, concurrency limits and a budget, is priced and recorded; its
records are counted against the requests answered.

Core 0 runs the proxy under test; core 1 runs the load generator and the
upstream. (a) and (b) use a static upstream — nginx returning the mock's
own non-streamed answer, byte for byte — because the mock costs about as
much CPU per request as a proxy: with it, the shared load core saturates
first and (a) cannot load the proxy's core. (c)-(f) use the mock, which
streams. Scenarios (see the Performance issue):
  a  non-streamed chat completion, ~600 B answer, 64 connections: RPS, p50/p99/p99.9
  b  one connection, sequential: latency added per request
  c  streams of 50 chunks 20 ms apart: added time to first byte and per-chunk delay
  d  10,000 concurrent slow streams: errors, peak RSS
  e  1 MiB request bodies: throughput
  f  idle RSS
and, for translation, llmproxy with `provider: anthropic` (every request and
answer translated between OpenAI's and Anthropic's formats) in (a), (b) and
(c) beside the pass-through column.
Prints a table and writes it (with the environment) to RESULTS.md, and a
latency chart to latency.png.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LLMPROXY = ROOT / "target/release/llmproxy"
PROBE = ROOT / "target/release/examples/bench_probe"
PROXY_CORE = "0"
LOAD_CORE = "1"
TARGETS = ["direct", "nginx", "llmproxy", "llmproxy-h2", "llmproxy-keys"]
TRANSLATED = "llmproxy-anthropic"
ADMIN_TOKEN = "bench-admin-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def proc_status(pid, field):
    """A /proc/PID/status field in kB (VmRSS, VmHWM), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU seconds a process has used, 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def core_times(core):
    """(busy, total) jiffies of one CPU core from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return sum(values) - idle, sum(values)
    return 0, 1


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except OSError:
        return []


class Server:
    """One process tree serving a port: its RSS is the sum over the tree."""

    def __init__(self, name, argv, port, core, logfile):
        self.name, self.port = name, port
        self.log = open(logfile, "w")
        self.proc = subprocess.Popen(["taskset", "-c", core, *argv], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(port)

    def pids(self):
        return [self.proc.pid, *children(self.proc.pid)]

    def cpu_seconds(self):
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss_kb(self, field="VmRSS"):
        return sum(proc_status(pid, field) for pid in self.pids())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def nginx_conf(tmp, listen, upstream):
    return f"""
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 200000;
events {{ worker_connections 40000; }}
http {{
  access_log {tmp}/nginx-access.log combined buffer=64k flush=1s;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  upstream mock {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{listen} backlog=8192;
    client_max_body_size 64m;
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
      proxy_set_header Authorization "Bearer sk-bench-upstream";
    }}
  }}
}}
"""


def anthropic_conf(listen, upstream):
    return f"""
listen: 127.0.0.1:{listen}
upstream:
  base_url: http://127.0.0.1:{upstream}/v1
  provider: anthropic
  default_headers:
    x-api-key: sk-bench-upstream
limits:
  max_connections: 40000
log:
  level: info
"""


def llmproxy_conf(listen, upstream, http2=False, store=None):
    accounting = "" if store is None else f"""
admin:
  token: {ADMIN_TOKEN}
store:
  url: sqlite://{store}
keys:
  required: true
prices:
  gpt-4o-mini:
    input: 0.15
    output: 0.6
"""
    return f"""
listen: 127.0.0.1:{listen}
upstream:
  base_url: http://127.0.0.1:{upstream}/v1
  http2: {"true" if http2 else "false"}
  default_headers:
    Authorization: Bearer sk-bench-upstream
limits:
  max_connections: 40000
log:
  level: info
{accounting}"""


def count_records(store):
    """Usage records in a (stopped) llmproxy's SQLite store."""
    import sqlite3
    with sqlite3.connect(store) as db:
        return db.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
        self.mock_port = free_port()
        self.mock = None
        # The static upstream: HTTP/1.1 and cleartext HTTP/2 listeners.
        self.static_port, self.static_h2_port = free_port(), free_port()
        self.static = None
        self.results = {t: {} for t in [*TARGETS, TRANSLATED]}
        self.key = None

    # -- processes ---------------------------------------------------------

    def start_mock(self):
        self.mock = Server(
            "mock",
            [str(LLMPROXY), "mock-upstream", "--port", str(self.mock_port), "--delay-ms", "0"],
            self.mock_port, LOAD_CORE, self.tmp / "mock.log",
        )

    def start_static(self, answer, message):
        """nginx on the load core answering every request with `answer`
        (`message`, the Anthropic answer, on /v1/messages)."""
        text, message = answer.decode(), message.decode()
        if any(c in t for c in "'$\\" for t in (text, message)):
            raise RuntimeError("the mock's answer cannot be written into an nginx `return`")
        tmp = self.tmp / "static"
        tmp.mkdir(exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{self.static_port};
    listen 127.0.0.1:{self.static_h2_port} http2;
    location / {{ default_type application/json; return 200 '{text}'; }}
    location /v1/messages {{ default_type application/json; return 200 '{message}'; }}
  }}
}}
""")
        self.static = Server("static", ["nginx", "-c", str(conf), "-p", str(tmp)], self.static_port, LOAD_CORE,
                             tmp / "nginx.out")

    def start(self, target, static=False):
        upstream = self.static_port if static else self.mock_port
        if target == TRANSLATED:
            port = free_port()
            conf = self.tmp / "llmproxy-anthropic.yaml"
            conf.write_text(anthropic_conf(port, upstream))
            return Server("llmproxy", [str(LLMPROXY), "--config", str(conf)], port, PROXY_CORE,
                          self.tmp / "llmproxy-anthropic.log"), port
        if target == "direct":
            return None, upstream
        port = free_port()
        if target == "nginx":
            conf = self.tmp / "nginx.conf"
            conf.write_text(nginx_conf(self.tmp, port, upstream))
            return Server("nginx", ["nginx", "-c", str(conf), "-p", str(self.tmp)], port, PROXY_CORE, self.tmp / "nginx.out"), port
        http2 = target == "llmproxy-h2"
        if http2 and static:
            upstream = self.static_h2_port
        conf = self.tmp / "llmproxy.yaml"
        store = self.store() if target == "llmproxy-keys" else None
        conf.write_text(llmproxy_conf(port, upstream, http2=http2, store=store))
        server = Server("llmproxy", [str(LLMPROXY), "--config", str(conf)], port, PROXY_CORE, self.tmp / "llmproxy.log")
        if store is not None:
            self.key = self.create_key(port)
        return server, port

    def store(self):
        """A fresh SQLite store for one llmproxy-keys process."""
        self.store_path = self.tmp / f"usage-{time.monotonic_ns()}.db"
        return self.store_path

    def create_key(self, port):
        """A key with every limit and a budget, none of which the run reaches."""
        spec = {"name": "bench", "rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "max_concurrent": 1_000_000,
                "budget_usd": 1_000_000_000, "budget_period": "30d"}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/keys", data=json.dumps(spec).encode(),
                                     headers={"authorization": f"Bearer {ADMIN_TOKEN}",
                                              "content-type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=10).read())["key"]

    def stop_counting(self, target, server, answered):
        """Stops the server; for llmproxy-keys, checks every answered request was recorded."""
        if not server:
            return
        server.stop()
        if target == "llmproxy-keys":
            records = count_records(self.store_path)
            return {"records": records, "answered": answered}

    # -- load ----------------------------------------------------------------

    def wrk(self, port, script, connections, seconds, env=None):
        argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                "-s", str(BENCH / script), f"http://127.0.0.1:{port}"]
        run_env = {**os.environ, "BENCH_DIR": str(BENCH), **(env or {})}
        if self.key:
            run_env["BENCH_KEY"] = self.key
        out = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=seconds + 60)
        for line in out.stdout.splitlines():
            if line.startswith("WRK_JSON "):
                data = json.loads(line[len("WRK_JSON "):])
                data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
                return data
        raise RuntimeError(f"wrk printed no report:\n{out.stdout}\n{out.stderr}")

    def probe(self, port, **kw):
        argv = ["taskset", "-c", LOAD_CORE, str(PROBE), "--addr", f"127.0.0.1:{port}"]
        if self.key:
            argv += ["--key", self.key]
        for key, value in kw.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"probe failed: {out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # -- scenarios -----------------------------------------------------------

    def run(self):
        a = self.args
        self.start_mock()
        answer = self.answer()
        self.start_static(answer, self.answer("/v1/messages"))
        for target in TARGETS:
            self.key = None
            r, warm = self.results[target], None
            server, port = self.start(target, static=True)
            try:
                # f: idle RSS, right after start and one request.
                headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
                models = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers=headers)
                urllib.request.urlopen(models, timeout=5).read()
                r["idle_rss_kb"] = server.rss_kb() if server else self.static.rss_kb()
                serving = server or self.static
                print(f"[{target}] (a) 64 connections, non-streamed", flush=True)
                warm = self.wrk(port, "wrk_chat.lua", 64, a.warmup)
                r["a"] = self.measured(serving, lambda: self.wrk(port, "wrk_chat.lua", 64, a.seconds))
                print(f"[{target}] (b) one connection, sequential", flush=True)
                r["b"] = self.measured(serving, lambda: self.wrk(port, "wrk_chat.lua", 1, a.seconds))
            finally:
                answered = sum(x["requests"] for x in (warm, r.get("a", {}), r.get("b", {})) if x) + 1
                counted = self.stop_counting(target, server, answered)
                if counted and "a" in r:
                    # wrk does not count the requests it cuts off at the
                    # end of a run (up to one per connection), which
                    # llmproxy still records, as a client that left.
                    counted["rate_per_s"] = r["a"]["requests"] / (r["a"]["duration_us"] / 1e6)
                    r["records"] = counted
                    print(f"[{target}] usage records: {counted}", flush=True)
            self.key = None
            server, port = self.start(target)
            try:
                print(f"[{target}] (c) streams, 50 chunks 20 ms apart", flush=True)
                r["c"] = self.probe(port, streams=a.streams, concurrency=50, chunks=50, delay_ms=20)
                print(f"[{target}] (e) 1 MiB bodies", flush=True)
                r["e"] = self.wrk(port, "wrk_upload.lua", 16, a.seconds)
            finally:
                self.stop_counting(target, server, 0)
            # d: a fresh process, so its peak RSS is this scenario's.
            self.key = None
            server, port = self.start(target)
            try:
                print(f"[{target}] (d) {a.held} concurrent slow streams", flush=True)
                r["d"] = self.probe(port, streams=a.held, concurrency=a.held, chunks=a.held_chunks,
                                    delay_ms=a.held_delay_ms, ramp_per_sec=a.ramp, timeout_secs=300)
                r["d"]["peak_rss_kb"] = server.rss_kb("VmHWM") if server else self.mock.rss_kb("VmHWM")
            finally:
                self.stop_counting(target, server, 0)
        self.key = None
        self.run_translated()
        self.static.stop()
        self.mock.stop()
        return len(answer)

    def run_translated(self):
        """(a), (b) and (c) through llmproxy with `provider: anthropic`."""
        a, r = self.args, self.results[TRANSLATED]
        server, port = self.start(TRANSLATED, static=True)
        try:
            print(f"[{TRANSLATED}] (a) 64 connections, non-streamed, translated", flush=True)
            self.wrk(port, "wrk_chat.lua", 64, a.warmup)
            r["a"] = self.measured(server, lambda: self.wrk(port, "wrk_chat.lua", 64, a.seconds))
            print(f"[{TRANSLATED}] (b) one connection, sequential, translated", flush=True)
            r["b"] = self.measured(server, lambda: self.wrk(port, "wrk_chat.lua", 1, a.seconds))
        finally:
            server.stop()
        # (c): a difference of a tenth of a millisecond is below this VM's
        # run-to-run noise, so both proxies serve at once and the probe
        # alternates between them, round by round; medians are compared.
        plain, plain_port = self.start("llmproxy")
        server, port = self.start(TRANSLATED)
        rounds = {"llmproxy": [], TRANSLATED: []}
        try:
            for i in range(a.rounds):
                print(f"[{TRANSLATED}] (c) round {i + 1}/{a.rounds}: pass-through, then translated", flush=True)
                for name, at in (("llmproxy", plain_port), (TRANSLATED, port)):
                    rounds[name].append(self.probe(at, streams=a.round_streams, concurrency=50, chunks=50,
                                                   delay_ms=20))
        finally:
            plain.stop()
            server.stop()
        r["c_rounds"] = rounds

    def measured(self, server, run):
        """Runs a wrk scenario and adds the server's CPU per request and how
        busy each core was over the window (which one saturated)."""
        cpu0, proxy0, load0 = server.cpu_seconds(), core_times(PROXY_CORE), core_times(LOAD_CORE)
        report = run()
        cpu1, proxy1, load1 = server.cpu_seconds(), core_times(PROXY_CORE), core_times(LOAD_CORE)
        requests = max(report.get("requests", 0), 1)
        report["cpu_us"] = (cpu1 - cpu0) / requests * 1e6
        report["proxy_core_busy"] = (proxy1[0] - proxy0[0]) / max(proxy1[1] - proxy0[1], 1)
        report["load_core_busy"] = (load1[0] - load0[0]) / max(load1[1] - load0[1], 1)
        return report

    def answer(self, path="/v1/chat/completions"):
        """The mock's non-streamed answer to scenario (a)'s request (in
        Anthropic's format on /v1/messages)."""
        body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 4096, "messages": []}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.mock_port}{path}", data=body,
                                     headers={"content-type": "application/json", "x-mock-chunks": "45"})
        return urllib.request.urlopen(req, timeout=5).read()


# -- report ------------------------------------------------------------------

def versions():
    def first_line(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "llmproxy": first_line([str(LLMPROXY), "--version"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "rustc": first_line(["rustc", "--version"]),
    }


def ms(us):
    return f"{us / 1000:.3f}"


def ratio(value, reference, higher_is_better):
    if not reference:
        return "–"
    return f"{value / reference:.2f}×"


def table(results, answer, args):
    d, n, p, h, k = (results[t] for t in TARGETS)
    rows = []
    # A smoke run lasts a second per scenario: it proves the harness, and
    # its numbers say nothing about the targets, so it judges none of them.
    judge = (lambda met: "not judged (smoke)") if args.smoke else (lambda met: "met" if met else "**missed**")

    def row(label, fmt, key, higher_is_better, target=None, keys_target=None):
        vals = [key(r) for r in (d, n, p, h, k)]
        verdict = "" if target is None else judge(target(vals[2], vals[1]))
        verdict_h2 = "" if target is None else judge(target(vals[3], vals[1]))
        verdict_keys = "" if keys_target is None else judge(keys_target(vals[4], vals[2], vals[1]))
        rows.append([label, *(fmt(v) for v in vals), ratio(vals[2], vals[1], higher_is_better),
                     ratio(vals[3], vals[1], higher_is_better), ratio(vals[4], vals[2], higher_is_better),
                     ratio(vals[1], vals[0], higher_is_better), ratio(vals[2], vals[0], higher_is_better),
                     verdict, verdict_h2, verdict_keys])

    def added(label, key, target):
        nginx, mine, mine_h2, mine_keys = (key(r) - key(d) for r in (n, p, h, k))
        rows.append([label, "0", ms(nginx), ms(mine), ms(mine_h2), ms(mine_keys), "", "", "", "", "",
                     judge(target(mine, nginx)), judge(target(mine_h2, nginx)), ""])

    row("(a) server CPU µs/request", lambda v: f"{v:.1f}", lambda r: r["a"]["cpu_us"], False,
        lambda mine, ng: mine <= ng, lambda keys, plain, ng: keys <= 1.15 * plain)
    row("(a) requests/s, 64 conns", lambda v: f"{v:,.0f}", lambda r: r["a"]["rps"], True,
        lambda mine, ng: mine >= ng, lambda keys, plain, ng: keys >= ng)
    row("(a) p50 ms", ms, lambda r: r["a"]["p50_us"], False)
    row("(a) p99 ms", ms, lambda r: r["a"]["p99_us"], False, lambda mine, ng: mine <= ng)
    row("(a) p99.9 ms", ms, lambda r: r["a"]["p999_us"], False)
    row("(a) errors", str, lambda r: r["a"]["errors"] + r["a"]["status_errors"], False)
    row("(b) server CPU µs/request", lambda v: f"{v:.1f}", lambda r: r["b"]["cpu_us"], False,
        None, lambda keys, plain, ng: keys <= 1.15 * plain)
    row("(b) latency ms, 1 conn (mean)", ms, lambda r: r["b"]["mean_us"], False)
    row("(b) latency ms, 1 conn (p50)", ms, lambda r: r["b"]["p50_us"], False)
    added("(b) added latency ms (mean − direct)", lambda r: r["b"]["mean_us"], lambda mine, ng: mine <= ng)
    row("(c) TTFB p50 ms", ms, lambda r: r["c"]["ttfb_us"]["p50"], False)
    row("(c) TTFB p99 ms", ms, lambda r: r["c"]["ttfb_us"]["p99"], False)
    added("(c) added TTFB p99 ms", lambda r: r["c"]["ttfb_us"]["p99"],
          lambda mine, ng: mine <= 1000 and mine <= ng)
    row("(c) chunk delay p50 ms", ms, lambda r: r["c"]["chunk_delay_us"]["p50"], False)
    row("(c) chunk delay p99 ms", ms, lambda r: r["c"]["chunk_delay_us"]["p99"], False)
    row("(c) chunk delay max ms", ms, lambda r: r["c"]["chunk_delay_us"]["max"], False)
    added("(c) added chunk delay p99 ms", lambda r: r["c"]["chunk_delay_us"]["p99"],
          lambda mine, ng: mine <= 1000)
    row("(c) stream errors", str, lambda r: r["c"]["errors"], False)
    row(f"(d) {args.held:,} streams: completed", lambda v: f"{v:,}", lambda r: r["d"]["ok"], True)
    row(f"(d) {args.held:,} streams: errors", str, lambda r: r["d"]["errors"], False,
        lambda mine, ng: mine == 0, lambda keys, plain, ng: keys == 0)
    row("(d) peak open at once", lambda v: f"{v:,}", lambda r: r["d"]["peak_open"], True)
    row("(d) peak RSS MB", lambda v: f"{v / 1024:.1f}", lambda r: r["d"]["peak_rss_kb"], False,
        lambda mine, ng: mine <= 250 * 1024)
    row("(e) 1 MiB uploads MiB/s", lambda v: f"{v:,.0f}", lambda r: r["e"]["rps"], True, lambda mine, ng: True)
    row("(f) idle RSS MB", lambda v: f"{v / 1024:.1f}", lambda r: r["idle_rss_kb"], False,
        lambda mine, ng: mine <= 20 * 1024)

    # Which core was saturated in (a): requests/s only ranks proxies when the
    # proxy's core is the busy one, not the load generator's.
    busy = lambda r: f"proxy core {r['a']['proxy_core_busy'] * 100:.0f} %, load core {r['a']['load_core_busy'] * 100:.0f} %"
    rows.append(["(a) core busy (proxy / load)", busy(d), busy(n), busy(p), busy(h), busy(k),
                 "", "", "", "", "", "", "", ""])
    # Every request llmproxy-keys answered in (a) and (b) is in its store.
    rec = k.get("records", {"records": 0, "answered": 0, "rate_per_s": 0})
    lost = rec["records"] < rec["answered"]
    rows.append(["(a)+(b) usage records written / requests answered", "", "", "", "",
                 f"{rec['records']:,} / {rec['answered']:,}", "", "", "", "", "", "", "",
                 judge(not lost)])
    rows.append(["(a) records per second, sustained", "", "", "", "", f"{rec['rate_per_s']:,.0f}",
                 "", "", "", "", "", "", "", judge(rec["rate_per_s"] >= 10_000 and not lost)])
    head = ["metric", "direct", "nginx", "llmproxy", "llmproxy h2↑", "llmproxy keys", "llmproxy/nginx",
            "llmproxy h2↑/nginx", "keys/llmproxy", "nginx/direct", "llmproxy/direct", "target", "target (h2↑)",
            "target (keys)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def translated_table(results, args):
    """Translation's cost: pass-through llmproxy beside `provider: anthropic`."""
    p, t = results["llmproxy"], results[TRANSLATED]
    judge = (lambda met: "not judged (smoke)") if args.smoke else (lambda met: "met" if met else "**missed**")
    rows = []

    def row(label, fmt, key, verdict=None):
        mine, translated = key(p), key(t)
        ratio_text = f"{translated / mine:.2f}×" if mine else "–"
        rows.append([label, fmt(mine), fmt(translated), ratio_text, verdict(mine, translated) if verdict else ""])

    row("(a) server CPU µs/request", lambda v: f"{v:.1f}", lambda r: r["a"]["cpu_us"],
        lambda mine, tr: judge(tr <= 2 * mine) + " (≤ 2×)")
    row("(a) requests/s, 64 conns", lambda v: f"{v:,.0f}", lambda r: r["a"]["rps"])
    row("(a) p99 ms", ms, lambda r: r["a"]["p99_us"])
    row("(a) errors", str, lambda r: r["a"]["errors"] + r["a"]["status_errors"])
    row("(b) server CPU µs/request", lambda v: f"{v:.1f}", lambda r: r["b"]["cpu_us"])
    row("(b) latency ms, 1 conn (mean)", ms, lambda r: r["b"]["mean_us"])
    rounds = t["c_rounds"]
    n = len(rounds["llmproxy"])

    def crow(label, fmt, value, verdict=None):
        mine, translated = value(rounds["llmproxy"]), value(rounds[TRANSLATED])
        ratio_text = f"{translated / mine:.2f}×" if isinstance(mine, (int, float)) and mine else "–"
        rows.append([label, fmt(mine), fmt(translated), ratio_text, verdict(mine, translated) if verdict else ""])

    median = lambda values: sorted(values)[len(values) // 2]
    for q in ("p50", "p99"):
        crow(f"(c) chunk delay {q} ms, median of {n} interleaved rounds", ms,
             lambda rs, q=q: median([x["chunk_delay_us"][q] for x in rs]),
             lambda mine, tr: judge(tr - mine <= 100) + " (+ ≤ 0.1 ms)")
        crow(f"(c) chunk delay {q} ms, each round", lambda v: v, lambda rs, q=q: " / ".join(
            ms(x["chunk_delay_us"][q]) for x in rs))
    crow("(c) chunk delay max ms", ms, lambda rs: max(x["chunk_delay_us"]["max"] for x in rs))
    crow("(c) chunks timed", str, lambda rs: sum(x["chunk_delay_us"]["count"] for x in rs))
    crow("(c) stream errors", str, lambda rs: sum(x["errors"] for x in rs))
    head = ["metric", "llmproxy (pass-through)", "llmproxy provider: anthropic", "translated/pass-through", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def chart(results, path, tmp):
    data = tmp / "latency.dat"
    with open(data, "w") as f:
        for t in TARGETS:
            a = results[t]["a"]
            f.write(f"{t} {a['p50_us'] / 1000} {a['p90_us'] / 1000} {a['p99_us'] / 1000} {a['p999_us'] / 1000}\n")
    script = f"""
set terminal pngcairo size 900,500 font ",11"
set output "{path}"
set title "Non-streamed chat completion, 64 connections: latency percentiles (lower is better)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set ylabel "milliseconds"
set key top left
set grid ytics
set yrange [0:*]
plot "{data}" using 2:xtic(1) title "p50", "" using 3 title "p90", "" using 4 title "p99", "" using 5 title "p99.9"
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run (CI): proves the harness, not the speed")
    parser.add_argument("--out", help="directory for RESULTS.md and latency.png")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.warmup, args.streams = 1, 1, 20
        args.rounds, args.round_streams = 1, 20
        args.held, args.held_chunks, args.held_delay_ms, args.ramp = 200, 3, 200, 2000
    else:
        args.seconds, args.warmup, args.streams = 10, 3, 500
        args.rounds, args.round_streams = 5, 300
        args.held, args.held_chunks, args.held_delay_ms, args.ramp = 10_000, 15, 1000, 2500
    out = Path(args.out) if args.out else (ROOT / "target/bench" if args.smoke else BENCH)
    out.mkdir(parents=True, exist_ok=True)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200_000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    bench = Bench(args)
    try:
        answer = bench.run()
    finally:
        if bench.mock:
            bench.mock.stop()
        if bench.static:
            bench.static.stop()
    info = versions()
    body = table(bench.results, answer, args)
    translated = translated_table(bench.results, args)
    print("\n" + body + "\n\n" + translated + "\n")
    # The chart is for full runs; a smoke run (CI) needs no gnuplot.
    charted = not args.smoke and shutil.which("gnuplot") is not None
    if charted:
        chart(bench.results, out / "latency.png", bench.tmp)
    mode = "smoke run (1 s per scenario: proves the harness, not the speed)" if args.smoke else "full run"
    results = f"""# llmproxy benchmark results

`bench/run.sh` — {mode}. Regenerate with `bench/run.sh`.

| | |
|---|---|
| date | {info['date']} |
| CPU | {info['cpu']} |
| kernel | {info['kernel']} |
| pinning | proxy under test on core {PROXY_CORE}; wrk, the stream probe and the mock upstream on core {LOAD_CORE} |
| llmproxy | {info['llmproxy']} ({info['rustc']}) |
| nginx | {info['nginx']}, 1 worker, `proxy_buffering off`, keepalive 1024 to the upstream, buffered access log |
| load | {info['wrk']}, 1 thread; `target/release/examples/bench_probe` for streams |
| upstream | (a), (b): nginx on core {LOAD_CORE} returning the mock's non-streamed answer ({answer} bytes) to every request; (c)–(f): `llmproxy mock-upstream` |

"direct" is the upstream without a proxy: the floor. (a) and (b) run
against a static upstream (nginx returning the mock's own answer, byte for
byte) because the mock costs about as much CPU per request as a proxy and
shares the load core: with it, the load core saturates first and the
proxy's CPU per request is measured on a half-idle core. "llmproxy" speaks
HTTP/1.1 to the upstream, as nginx does: the like-for-like column. "llmproxy
h2↑" is the same binary with `http2: true` on the upstream (HTTP/2 with prior
knowledge: many streams share a connection), which nginx's proxy module
cannot do; each column has its own verdict. "llmproxy keys" is the
HTTP/1.1 column with virtual keys, limits and usage on (SQLite store, one
key with RPM, TPM, concurrency limits and a 30-day budget, a price for the
model): its targets are CPU per request ≤ 1.15× "llmproxy" and requests/s ≥
nginx's, and every request it answered in (a) and (b) recorded (counted in
its store after a graceful stop). Ratios divide
the first-named column by the second (for times and memory, lower is
better; for rates, higher). "added" rows subtract direct's figure.

(a)'s target is judged on **server CPU µs per request** (user + system time
of the server's processes over the measured window, from `/proc`, divided by
the requests completed; for "direct", the upstream's own): on two cores the load
generator and the mock share the other core, and when that core saturates
first, requests/s cannot rank the proxies. The "core busy" row says which
core saturated in each run.

{body}

{"![latency percentiles](latency.png)" if charted else "(no chart in this run)"}

## Translation: `provider: anthropic` beside pass-through

The same scenarios through llmproxy with `provider: anthropic`: each
request is translated from Chat Completions into Anthropic's Messages API
and each answer back. (a) and (b): the static upstream answers
`/v1/messages` with the mock's own Anthropic answer; (c): the mock streams
Anthropic's events, its words stamped with their send time, so a chunk's
delay includes its translation; a tenth of a millisecond is below this VM's
run-to-run noise, so a pass-through and a translating llmproxy serve at
once (both on core 0) and the probe alternates between them, round by
round, and the rounds' medians are compared. Targets: CPU per request ≤ 2×
pass-through, and translation adding ≤ 0.1 ms to a chunk (the translated
median minus the pass-through one, at p50 and p99).

{translated}
"""
    # The hand-kept record of what changed the numbers travels with every run.
    history = BENCH / "HISTORY.md"
    if history.exists():
        results += "\n" + history.read_text()
    (out / "RESULTS.md").write_text(results)
    (out / "results.json").write_text(json.dumps({"env": info, "results": bench.results}, indent=1))
    print(f"wrote {out / 'RESULTS.md'}" + (f" and {out / 'latency.png'}" if charted else ""))


if __name__ == "__main__":
    main()
