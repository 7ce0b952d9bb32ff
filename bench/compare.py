#!/usr/bin/env python3
"""Scenario (a) for two llmproxy binaries, interleaved: requests/s and the
proxy's CPU time per request, the figure that ranks proxies on a machine
whose load generator shares the other core.

    bench/compare.py BEFORE_BINARY AFTER_BINARY [--runs 3] [--seconds 8] [--routed]

The proxy runs on core 0 with one worker; the mock upstream and wrk share
core 1. CPU per request is user+sys of the proxy process over the measured
window (from /proc/PID/stat) divided by the requests wrk completed.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wrk(port, seconds):
    env = dict(os.environ, BENCH_DIR=str(ROOT / "bench"))
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", "--timeout", "10s",
         "-s", str(ROOT / "bench/wrk_chat.lua"), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, env=env, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            report = json.loads(line[len("WRK_JSON "):])
            report["duration_s"] = report["duration_us"] / 1e6
            return report
    raise RuntimeError(out.stdout + out.stderr)


def measure(binary, mock_port, routed, seconds, tmp):
    port = free_port()
    config = Path(tmp) / "config.yaml"
    if routed:
        config.write_text(f"upstreams:\n  mock:\n    base_url: http://127.0.0.1:{mock_port}/v1\n"
                          f"models:\n  gpt-4o-mini:\n    deployments:\n      - upstream: mock\n"
                          f"log:\n  level: info\n")
    else:
        config.write_text(f"upstream:\n  base_url: http://127.0.0.1:{mock_port}/v1\nlog:\n  level: info\n")
    proxy = subprocess.Popen(["taskset", "-c", "0", binary, "--config", str(config),
                              "--listen", f"127.0.0.1:{port}", "--workers", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wrk(port, 2)  # warm-up
        before = cpu_seconds(proxy.pid)
        report = wrk(port, seconds)
        used = cpu_seconds(proxy.pid) - before
        requests = report["requests"]
        return {"rps": requests / report["duration_s"], "cpu_us": used / requests * 1e6,
                "cpu_share": used / report["duration_s"]}
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--routed", action="store_true")
    args = parser.parse_args()
    mock_port = free_port()
    mock = subprocess.Popen(["taskset", "-c", "1", args.after, "mock-upstream", "--port", str(mock_port),
                             "--delay-ms", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {"before": [], "after": []}
    try:
        wait_port(mock_port)
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.runs):
                for name in ("before", "after"):
                    binary = getattr(args, name)
                    results[name].append(measure(binary, mock_port, args.routed, args.seconds, tmp))
    finally:
        mock.terminate()
    path = "routed" if args.routed else "single-upstream"
    print(f"scenario (a), {path} path, 64 connections, {args.runs} interleaved runs of {args.seconds} s")
    print("| binary | requests/s | proxy CPU µs/request | proxy core busy |")
    print("|---|---|---|---|")
    for name in ("before", "after"):
        rows = results[name]
        rps = ", ".join(f"{r['rps']:,.0f}" for r in rows)
        cpu = ", ".join(f"{r['cpu_us']:.1f}" for r in rows)
        share = ", ".join(f"{r['cpu_share'] * 100:.0f} %" for r in rows)
        print(f"| {name} | {rps} | {cpu} | {share} |")


if __name__ == "__main__":
    sys.exit(main())
