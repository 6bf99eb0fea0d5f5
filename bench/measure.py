"""Helpers for bench/run.sh: certificates, readiness, RSS/CPU sampling and the report.

    measure.py cert DIR                      trustme CA + leaf for 127.0.0.1 / localhost
    measure.py wait URL SECONDS              until URL answers 200 (TLS not verified)
    measure.py sample KIND PID OUT [APP_PID] sample RSS/CPU until SIGTERM, write JSON to OUT
    measure.py report DIR OUT.md             results table + Bastion/nginx ratios

KIND says which processes are "the proxy" (summed) and which are "the app":

* ``nginx``: PID is the master; proxy = master + every descendant (the workers);
  app = the tree of APP_PID (the standalone upstream).
* ``bastion``: PID is Bastion's main process; proxy = main + its keeper child
  (``python -m bastion.module.keeper``) + its worker processes (``python -m bastion.proxy.control.worker``,
  with ``workers`` > 1); app = every other child tree (the apps it launched).
* ``app``: no proxy; app = the tree of PID.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

INTERVAL = 0.1


# --- certificates -----------------------------------------------------------------------
def cmd_cert(directory: str) -> None:
    import trustme

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(out / "key.pem"))
    (out / "cert.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    os.chmod(out / "key.pem", 0o600)


# --- readiness --------------------------------------------------------------------------
def wait_ok(url: str, seconds: float = 60.0) -> None:
    """Wait until ``url`` answers 200 (certificates not checked); RuntimeError if never."""
    deadline = time.monotonic() + seconds
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
                last = response.status
        except Exception as exc:  # noqa: BLE001 - anything means "not yet"
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds:g}s (last: {last})")


def cmd_wait(url: str, seconds: str) -> None:
    try:
        wait_ok(url, float(seconds))
    except RuntimeError as exc:
        sys.exit(f"measure.py: {exc}")


# --- sampling ---------------------------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _split(kind: str, pid: int, app_pid: int | None) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(proxy processes, app processes) right now."""
    if kind == "app":
        return [], _tree(pid)
    if kind == "nginx":
        return _tree(pid), _tree(app_pid) if app_pid else []
    try:
        main = psutil.Process(pid)
        children = main.children()
    except psutil.Error:
        return [], []
    proxy, app = [main], []
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "module.keeper" in cmdline or "bastion.proxy.control.worker" in cmdline:
            proxy.append(child)
        else:
            app.extend(_tree(child.pid))
    return proxy, app


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
    out: dict[int, float] = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cmd_sample(kind: str, pid: str, out: str, app_pid: str | None = None) -> None:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    apid = int(app_pid) if app_pid else None
    proxy, app = _split(kind, int(pid), apid)
    cpu0_proxy, cpu0_app = _cpu(proxy), _cpu(app)
    first_proxy, first_app = _rss(proxy), _rss(app)
    peak_proxy, peak_app = first_proxy, first_app
    names: list[str] = []
    samples = 0
    while not stop:
        proxy, app = _split(kind, int(pid), apid)
        peak_proxy = max(peak_proxy, _rss(proxy))
        peak_app = max(peak_app, _rss(app))
        cpu1_proxy, cpu1_app = _cpu(proxy), _cpu(app)
        names = []
        for p in proxy:
            try:
                names.append(f"{p.pid}:{p.name()}")
            except psutil.Error:
                pass
        samples += 1
        time.sleep(INTERVAL)
    cpu_proxy = sum(v - cpu0_proxy.get(k, 0.0) for k, v in cpu1_proxy.items()) if samples else 0.0
    cpu_app = sum(v - cpu0_app.get(k, 0.0) for k, v in cpu1_app.items()) if samples else 0.0
    Path(out).write_text(json.dumps({
        "kind": kind,
        "samples": samples,
        "proxy_processes": names,
        "proxy_rss_start": first_proxy,
        "proxy_rss_peak": peak_proxy,
        "app_rss_peak": peak_app,
        "proxy_cpu_s": round(cpu_proxy, 3),
        "app_cpu_s": round(cpu_app, 3),
    }))


# --- report -----------------------------------------------------------------------------
TARGETS = [
    ("direct-http", "app directly (baseline)", "HTTP"),
    ("nginx-http", "nginx → app", "HTTP"),
    ("bastion-http", "Bastion → app", "HTTP"),
    ("nginx-https", "nginx → app", "HTTPS"),
    ("bastion-https", "Bastion → app", "HTTPS"),
]


def _load(directory: Path, name: str) -> dict[str, Any] | None:
    wrk_file, rss_file = directory / f"{name}.wrk", directory / f"{name}.rss.json"
    if not wrk_file.exists():
        return None
    data: dict[str, Any] = {}
    for line in wrk_file.read_text().splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON "):])
    if not data:
        return None
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    if rss_file.exists():
        data.update(json.loads(rss_file.read_text()))
    return data


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f}"


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def cmd_report(directory: str, out: str) -> None:
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
    rows = {name: _load(d, name) for name, _, _ in TARGETS}
    lines = [
        "# Bastion vs nginx: reverse proxy benchmark",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), Linux {platform.release()}",
        f"- load: `{meta.get('wrk', 'wrk')}` from 127.0.0.1, after a {meta.get('warmup', '?')} warm-up per target",
        "- upstream: `bench/app.py` (aiohttp low-level server, uvloop), one process; "
        "nginx and the baseline use one instance, Bastion launches its own",
        f"- nginx: {_version(['nginx', '-v'])}; worker_processes 1, access_log off, "
        "upstream keepalive 64, keepalive_requests 100000",
        f"- Bastion: {meta.get('bastion', '?')}, workers 1, access_log off; Python {platform.python_version()}",
        f"- wrk: {_version(['wrk', '-v'])}",
        "- TLS: the same trustme ECDSA P-256 certificate for both; wrk negotiates TLS 1.3, "
        "connections kept alive (handshakes are not what is measured)",
        "- proxy RSS/CPU (psutil, every 0.1 s): nginx = master + worker; Bastion = main process + keeper, "
        "app excluded",
        "",
        "| target | proto | req/s | p50 ms | p99 ms | errors / non-2xx | proxy RSS idle → peak MiB | proxy CPU s | app CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label, proto in TARGETS:
        r = rows[name]
        if r is None:
            lines.append(f"| {label} | {proto} | (not run) | | | | | | |")
            continue
        rss = "–" if name.startswith("direct") else f"{_mib(r.get('proxy_rss_start', 0))} → {_mib(r.get('proxy_rss_peak', 0))}"
        cpu = "–" if name.startswith("direct") else f"{r.get('proxy_cpu_s', 0):.1f}"
        lines.append(
            f"| {label} | {proto} | {r['rps']:,.0f} | {_ms(r['p50_us'])} | {_ms(r['p99_us'])} | "
            f"{r['errors']} / {r['non2xx']} | {rss} | {cpu} | {r.get('app_cpu_s', 0):.1f} |"
        )
    lines += ["", "## Ratios Bastion / nginx", "",
              "Above 1 is better for req/s, worse for latency, memory and CPU per request.", "",
              "| proto | req/s | p50 latency | p99 latency | peak proxy RSS | proxy CPU per request |",
              "|---|---:|---:|---:|---:|---:|"]
    for proto in ("http", "https"):
        b, n = rows.get(f"bastion-{proto}"), rows.get(f"nginx-{proto}")
        if not b or not n:
            lines.append(f"| {proto.upper()} | (missing) | | | | |")
            continue

        def ratio(x: float, y: float) -> str:
            return f"{x / y:.2f}×" if y else "n/a"

        cpu_b = b.get("proxy_cpu_s", 0) / max(b["requests"], 1)
        cpu_n = n.get("proxy_cpu_s", 0) / max(n["requests"], 1)
        lines.append(
            f"| {proto.upper()} | {ratio(b['rps'], n['rps'])} | {ratio(b['p50_us'], n['p50_us'])} | "
            f"{ratio(b['p99_us'], n['p99_us'])} | "
            f"{ratio(b.get('proxy_rss_peak', 0), n.get('proxy_rss_peak', 0))} | {ratio(cpu_b, cpu_n)} |"
        )
    direct = rows.get("direct-http")
    if direct:
        lines += ["", "Share of the baseline's req/s kept behind each proxy: " + ", ".join(
            f"{name} {rows[name]['rps'] / direct['rps']:.0%}"  # type: ignore[index]
            for name, _, _ in TARGETS[1:] if rows.get(name)) + "."]
    lines += [
        "",
        "Caveats: one machine runs wrk, the proxy and the app, so they compete for the same "
        "cores. The single Python app bounds the baseline and nginx rows; Bastion's single "
        "process is CPU-bound before the app is. Proxy CPU seconds divided by requests is the "
        "proxies' own cost per request. Anything else busy on the machine shows up directly; "
        "numbers vary run to run by several percent.",
    ]
    text = "\n".join(lines) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(text)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    {"cert": cmd_cert, "wait": cmd_wait, "sample": cmd_sample, "report": cmd_report}[command](*args)


if __name__ == "__main__":
    main()
