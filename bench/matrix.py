"""The benchmark matrix behind bench/run.sh: load cells, stream, start-up, crash, profile, report.

    matrix.py run SETUP.json OUT_DIR      every measurement; writes OUT_DIR/matrix.json
    matrix.py report OUT_DIR DOC.md PNG    the table (ratios to nginx), targets, chart

run.sh starts the processes (the app, nginx, two Bastions) and writes SETUP.json; this
file only drives load generators (wrk, h2load, curl) and py-spy against them, each under
a timeout, and stops every process it starts itself (also on SIGTERM from run.sh's
watchdog or trap). Each load cell runs RUNS times (interleaved: run 1 of every cell,
then run 2, ...) and the report takes the median of every figure.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (the psutil helpers: process split, RSS, CPU)

HERE = Path(__file__).resolve().parent
TARGETS = ("direct", "nginx", "b1", "bauto")
# bh2: Bastion workers=auto with BASTION_H2_ENGINE=h2 (the fallback engine), HTTP/2 cells only
COLUMNS = (*TARGETS, "bh2")
H2_TARGETS = (*TARGETS[1:], "bh2")
LABELS = {"direct": "direct (app)", "nginx": "nginx", "b1": "Bastion workers=1", "bauto": "Bastion workers=auto",
          "bh2": "Bastion auto, h2 engine"}
CELLS: dict[str, dict[str, Any]] = {
    "http": {"label": "HTTP/1.1 keep-alive (wrk -t2 -c32)", "targets": TARGETS},
    "tls": {"label": "TLS keep-alive (wrk -t2 -c32)", "targets": TARGETS[1:]},
    "handshake": {"label": "TLS new connection per request (wrk -c32, Connection: close)", "targets": TARGETS[1:]},
    "h2": {"label": "HTTP/2 over TLS (h2load -c10 -m10)", "targets": H2_TARGETS},
    "c1": {"label": "one connection (wrk -t1 -c1)", "targets": TARGETS},
    "stream": {"label": "1 GiB download (curl, HTTP/1.1)", "targets": TARGETS},
    "h2stream": {"label": "1 GiB download over HTTP/2 (curl --http2, TLS)", "targets": H2_TARGETS},
    # Opt-in (CELLS="static static-big"): the same files served by nginx and by Bastion's
    # static locations (run.sh: /files/ on both), no app involved.
    "static": {"label": "static 1 KiB file, keep-alive (wrk -t2 -c32)", "targets": TARGETS[1:],
               "optin": True},
    "static-big": {"label": "static 1 GiB file (curl, HTTP/1.1)", "targets": TARGETS[1:],
                   "optin": True},
    # Opt-in (CELLS="gzip slow"): bench/app.py's 100 KiB HTML page gzip'd by nginx
    # (gzip on, gzip_comp_level 4) and by Bastion's compression; a gunicorn sync worker
    # (bench/wsgi_app.py, 1 worker) behind Bastion with slow clients, buffering on and off.
    "gzip": {"label": "100 KiB HTML page gzip'd (wrk -t2 -c32, Accept-Encoding: gzip)",
             "targets": TARGETS[1:], "optin": True},
    "slow": {"label": "20 slow uploaders + 20 slow readers, one gunicorn sync worker",
             "targets": ("slow-on", "slow-off"), "optin": True},
}
SLOW_LABELS = {"slow-on": "Bastion workers=1, buffering on (defaults + request: 1m)",
               "slow-off": "Bastion workers=1, buffering: off"}


class Stop(Exception):
    pass


def _on_term(signum: int, frame: object) -> None:
    raise Stop(f"signal {signum}")


# --- sampling ----------------------------------------------------------------------------
class Sampler:
    """Proxy RSS (start, peak) and CPU seconds (proxy, app) over a window, every 0.1 s."""

    def __init__(self, kind: str, pid: int | None, app_pid: int | None = None) -> None:
        self.kind, self.pid, self.app_pid = kind, pid, app_pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Sampler:
        if self.pid:
            proxy, app = measure._split(self.kind, self.pid, self.app_pid)
            self._cpu0 = measure._cpu(proxy), measure._cpu(app)
            self._rss0 = measure._rss(proxy)
            self._peak = self._rss0
            self._last = self._cpu0
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            proxy, app = measure._split(self.kind, self.pid, self.app_pid)  # type: ignore[arg-type]
            self._peak = max(self._peak, measure._rss(proxy))
            cpu = measure._cpu(proxy), measure._cpu(app)
            self._last = ({**self._last[0], **cpu[0]}, {**self._last[1], **cpu[1]})
            self._stop.wait(measure.INTERVAL)

    def __exit__(self, *exc: object) -> None:
        if not self.pid:
            return
        self._stop.set()
        self._thread.join()
        proxy, app = measure._split(self.kind, self.pid, self.app_pid)
        cpu = measure._cpu(proxy), measure._cpu(app)
        last = ({**self._last[0], **cpu[0]}, {**self._last[1], **cpu[1]})
        self.result = {
            "proxy_cpu_s": sum(v - self._cpu0[0].get(k, 0.0) for k, v in last[0].items()),
            "app_cpu_s": sum(v - self._cpu0[1].get(k, 0.0) for k, v in last[1].items()),
            "rss_start": self._rss0,
            "rss_peak": max(self._peak, measure._rss(proxy)),
        }


# --- load generators ---------------------------------------------------------------------
def _run(argv: list[str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def wrk(url: str, seconds: float, threads: int, conns: int, extra: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    out = _run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "-s",
                str(HERE / "report.lua"), *extra, url], seconds + 30)
    data: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON "):])
    if not data:
        raise RuntimeError(f"no BENCH_JSON in wrk output: {out[-300:]}")
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return data


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def h2load(url: str, seconds: float, warmup: float) -> dict[str, Any]:
    out = _run(["h2load", "-t1", "-c10", "-m10", "-D", str(max(1, round(seconds))), "--warm-up-time", str(max(1, round(warmup))), url],
               seconds + warmup + 30)
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    t = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if not (m and req):
        raise RuntimeError(f"cannot parse h2load output: {out[-500:]}")
    if "Application protocol: h2" not in out:
        raise RuntimeError(f"h2load did not negotiate h2: {out[-500:]}")
    data = {"rps": float(m.group(3)), "requests": int(req.group(3)),
            "errors": int(req.group(4)) + int(req.group(5)) + int(req.group(6)), "non2xx": 0}
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if codes:
        data["non2xx"] = sum(int(codes.group(i)) for i in (2, 3, 4))
    if t:
        data["mean_us"] = float(t.group(5)) * _UNITS[t.group(6)]
    return data


def curl_stream(url: str, timeout: float, http2: bool = False) -> dict[str, Any]:
    extra = ["--http2", "-k"] if http2 else []
    out = _run(["curl", "-s", *extra, "-o", "/dev/null", "--max-time", str(timeout), "-w",
                "%{http_code} %{size_download} %{speed_download} %{time_total} %{http_version}", url],
               timeout + 10)
    code, size, speed, total, version = out.split()
    if code != "200":
        raise RuntimeError(f"stream answered {code}")
    if http2 and version != "2":
        raise RuntimeError(f"curl did not speak HTTP/2 (HTTP/{version})")
    return {"bytes": int(size), "mb_s": float(speed) / 1e6, "seconds": float(total), "requests": 1}


def gzip_check(url: str) -> dict[str, Any]:
    """One request with ``Accept-Encoding: gzip``: the answer must be gzip'd."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        body = resp.read()
        coding = resp.headers.get("Content-Encoding")
    if coding != "gzip":
        raise RuntimeError(f"{url} answered Content-Encoding {coding!r}, not gzip")
    return {"page_bytes": len(gzip.decompress(body)), "gzip_bytes": len(body)}


def slow_clients(port: int, host: str, seconds: float, uploaders: int = 20, readers: int = 20,
                 size: int = 512 * 1024, rate: int = 64 * 1024) -> dict[str, Any]:
    """``uploaders`` clients each POST ``size`` bytes at ``rate`` bytes/s, ``readers``
    clients each GET ``size`` bytes read at ``rate``, over and over for ``seconds``;
    meanwhile a fast client GETs ``/fast`` on a new connection, one due every 0.1 s, its
    latency counted from when it was due. The fast client's latencies are the result (it
    starts after 1 s, once the slow ones are on)."""
    stop = time.monotonic() + seconds
    piece = 8192
    done = {"uploads": 0, "downloads": 0, "errors": 0}
    latencies: list[float] = []
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            done[key] += 1

    def paced(started: float, moved: int) -> None:
        delay = started + moved / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def uploader() -> None:
        head = (f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n"
                "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n").encode()
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                    sock.sendall(head)
                    started, sent = time.monotonic(), 0
                    while sent < size and time.monotonic() < stop:
                        sock.sendall(b"u" * min(piece, size - sent))
                        sent += min(piece, size - sent)
                        paced(started, sent)
                    if sent < size:
                        return
                    if not sock.recv(4096).startswith(b"HTTP/1.1 200"):
                        raise OSError("not 200")
                count("uploads")
            except OSError:
                count("errors")
                time.sleep(0.1)

    def reader() -> None:
        request = (f"GET /download?size={size} HTTP/1.1\r\nHost: {host}\r\n"
                   "Connection: close\r\n\r\n").encode()
        while time.monotonic() < stop:
            try:
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                    sock.settimeout(30)
                    sock.connect(("127.0.0.1", port))
                    sock.sendall(request)
                    started, got = time.monotonic(), 0
                    while time.monotonic() < stop:
                        data = sock.recv(piece)
                        if not data:
                            break
                        got += len(data)
                        paced(started, got)
                    if got >= size:
                        count("downloads")
            except OSError:
                count("errors")
                time.sleep(0.1)

    def fast() -> None:
        # One request due every 0.1 s, its latency counted from when it was due, not from
        # when it could be sent: a request stuck for 7 s also delays the 70 due behind it,
        # and they count so (no coordinated omission, as wrk2 measures).
        time.sleep(min(1.0, seconds / 4))
        due = time.monotonic()
        while due < stop:
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
                conn.request("GET", "/fast", headers={"Host": host})
                ok = conn.getresponse().read() == b"fast"
                conn.close()
            except OSError:
                ok = False
            finished = time.monotonic()
            if not ok:
                count("errors")
            with lock:  # every request due before this one ended waited at least till now
                while due <= finished and due < stop:
                    if ok:
                        latencies.append(finished - due)
                    due += 0.1

    threads = [threading.Thread(target=uploader, daemon=True) for _ in range(uploaders)]
    threads += [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
    threads.append(threading.Thread(target=fast, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, stop + 20 - time.monotonic()))
    if not latencies:
        raise RuntimeError("the fast client got no answer")
    latencies.sort()
    return {"fast_p50_ms": statistics.median(latencies) * 1000,
            "fast_p90_ms": latencies[int(0.9 * (len(latencies) - 1))] * 1000,
            "fast_max_ms": latencies[-1] * 1000, "fast_requests": len(latencies),
            "requests": len(latencies), **done}


# --- admin socket and raw HTTP -----------------------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


def admin(path: str, method: str, url: str) -> Any:
    conn = _UnixConnection(path)
    try:
        conn.request(method, url)
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if body.startswith((b"{", b"[")) else body
    finally:
        conn.close()


def get(port: int, host: str, timeout: float = 10.0) -> tuple[int, str]:
    """One GET / on a new connection: (status, X-App-Pid)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("X-App-Pid", "")
    finally:
        conn.close()


def app_processes(sock: str, name: str) -> list[dict[str, Any]]:
    return admin(sock, "GET", "/status")["apps"][name]["processes"]


def wait_until(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_own_start(py: str, samples: int) -> list[float]:
    """ms from spawning bench/app.py until its port accepts a TCP connection."""
    out = []
    for _ in range(samples):
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([py, str(HERE / "app.py"), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("bench/app.py did not start") from None
                    time.sleep(0.001)
            out.append((time.perf_counter() - t0) * 1000)
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        time.sleep(0.2)
    return out


def cold_start(sock: str, port: int, samples: int) -> list[float]:
    """ms of the first request to the on-demand app ``cold`` once it has stopped for idleness.

    (``POST /apps/cold/stop`` would not do: an app stopped by the administrator answers
    503 until ``start``, which starts it at once.) The app has ``idle_timeout: 2s``.
    """
    out = []
    for _ in range(samples):
        wait_until(lambda: not app_processes(sock, "cold"), 20, "cold to stop for idleness")
        time.sleep(0.3)
        t0 = time.perf_counter()
        status, _ = get(port, "cold.bench", timeout=30)
        out.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            raise RuntimeError(f"cold start answered {status}")
    return out


def crash_recovery(sock: str, port: int, samples: int) -> list[float]:
    """ms from SIGKILL of the app ``crash`` until a request is served by a new process."""
    out = []
    for _ in range(samples):
        wait_until(lambda: any(p["state"] == "ready" for p in app_processes(sock, "crash")), 30, "crash ready")
        status, pid = get(port, "crash.bench")
        if status != 200 or not pid:
            raise RuntimeError(f"crash app answered {status} (pid {pid!r})")
        os.kill(int(pid), signal.SIGKILL)
        t0 = time.perf_counter()
        deadline = time.monotonic() + 30
        while True:
            try:
                status, new = get(port, "crash.bench", timeout=5)
            except OSError:
                status, new = 0, ""
            if status == 200 and new and new != pid:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no request served by a new process within 30 s")
            time.sleep(0.002)
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.5)
    return out


# --- profile -----------------------------------------------------------------------------
def profile(setup: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """py-spy on one Bastion (workers=auto) worker process for PROFILE seconds under wrk load."""
    seconds = float(setup["profile_seconds"])
    b = setup["targets"]["bauto"]
    workers = admin(b["admin"], "GET", "/status").get("workers") or []
    pid = workers[0]["pid"] if workers else b["pid"]
    raw = out_dir / "pyspy.txt"
    load = subprocess.Popen(["wrk", "-t2", "-c32", f"-d{seconds + 3:.0f}s", b["http"]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        _run([setup["pyspy"], "record", "-d", str(int(seconds)), "-r", "100", "--nolineno", "-f", "raw",
              "-o", str(raw), "-p", str(pid)], seconds + 60)
    finally:
        load.terminate()
        load.wait(10)
    self_time: dict[str, int] = {}
    by_file: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        self_time[leaf] = self_time.get(leaf, 0) + n
        m = re.search(r"\((.*)\)$", leaf)
        path = m.group(1) if m else leaf
        key = _area(path)
        by_file[key] = by_file.get(key, 0) + n
    groups: dict[str, int] = {}
    for key, n in by_file.items():
        g = ("Bastion (proxy/, module/)" if key.startswith(("proxy/", "module/")) else
             "Python stdlib (asyncio, ssl, …)" if key.startswith("stdlib ") else
             key.split("/", 1)[0])
        groups[g] = groups.get(g, 0) + n
    top = sorted(self_time.items(), key=lambda kv: -kv[1])[:15]
    areas = sorted(by_file.items(), key=lambda kv: -kv[1])[:10]
    return {"pid": pid, "samples": total,
            "top": [(k, v / total) for k, v in top] if total else [],
            "areas": [(k, v / total) for k, v in areas] if total else [],
            "groups": sorted(((k, v / total) for k, v in groups.items()), key=lambda kv: -kv[1]) if total else []}


def _area(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    for part in ("/proxy/", "/module/"):
        if part in path:
            return part.strip("/") + "/" + path.split(part, 1)[1]
    top = path.split("/", 1)[0].removesuffix(".py")
    if "/lib/python" in path or top in sys.stdlib_module_names or path.startswith("<"):
        return "stdlib " + path
    return path


# --- run ---------------------------------------------------------------------------------
def cmd_run(setup_file: str, out: str) -> None:
    signal.signal(signal.SIGTERM, _on_term)
    setup = json.loads(Path(setup_file).read_text())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, seconds, warmup = int(setup["runs"]), float(setup["duration"]), float(setup["warmup"])
    size = int(setup["stream_size"])
    targets = setup["targets"]
    only = set(str(setup.get("cells") or "").split()) or {
        cell for cell, spec in CELLS.items() if not spec.get("optin")}
    results: dict[str, Any] = {"setup": setup, "cells": {}, "started": time.time()}
    results["load_before"] = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def one(cell: str, name: str, warm: bool) -> dict[str, Any]:
        t = targets[name]
        kind = "app" if name == "direct" else ("nginx" if name == "nginx" else "bastion")
        app_pid = targets["direct"]["pid"] if name == "nginx" else None
        if cell == "http":
            if warm:
                wrk(t["http"], warmup, 2, 32)
            with Sampler(kind, t["pid"], app_pid) as s:
                r = wrk(t["http"], seconds, 2, 32)
        elif cell == "tls":
            if warm:
                wrk(t["https"], warmup, 2, 32)
            with Sampler(kind, t["pid"], app_pid) as s:
                r = wrk(t["https"], seconds, 2, 32)
        elif cell == "handshake":
            extra = ["-H", "Connection: close"]
            if warm:
                wrk(t["https"], warmup, 2, 32, extra)
            with Sampler(kind, t["pid"], app_pid) as s:
                r = wrk(t["https"], seconds, 2, 32, extra)
        elif cell == "h2":
            with Sampler(kind, t["pid"], app_pid) as s:
                r = h2load(t["https"], seconds, warmup if warm else 1)
        elif cell == "c1":
            if warm:
                wrk(t["http"], warmup, 1, 1)
            with Sampler(kind, t["pid"], app_pid) as s:
                r = wrk(t["http"], seconds, 1, 1)
        elif cell == "stream":
            url = t["http"].rstrip("/") + f"/big?size={size}"
            with Sampler(kind, t["pid"], app_pid) as s:
                r = curl_stream(url, float(setup["stream_timeout"]))
        elif cell == "h2stream":
            url = t["https"].rstrip("/") + f"/big?size={size}"
            with Sampler(kind, t["pid"], app_pid) as s:
                r = curl_stream(url, float(setup["stream_timeout"]), http2=True)
        elif cell == "static":
            url = t["http"].rstrip("/") + "/files/1k.bin"
            if warm:
                wrk(url, warmup, 2, 32)
            with Sampler(kind, t["pid"], app_pid) as s:
                r = wrk(url, seconds, 2, 32)
        elif cell == "static-big":
            url = t["http"].rstrip("/") + "/files/big.bin"
            with Sampler(kind, t["pid"], app_pid) as s:
                r = curl_stream(url, float(setup["stream_timeout"]))
        elif cell == "gzip":
            url = t["http"].rstrip("/") + "/page"
            extra = ["-H", "Accept-Encoding: gzip"]
            sizes = gzip_check(url)
            if warm:
                wrk(url, warmup, 2, 32, extra)
            with Sampler(kind, t["pid"], app_pid) as s:
                r = wrk(url, seconds, 2, 32, extra)
            r.update(sizes)
        elif cell == "slow":
            with Sampler("bastion", t["pid"], None) as s:
                r = slow_clients(t["http_port"], t["host"], float(setup.get("slow_seconds") or seconds))
        else:
            raise ValueError(cell)
        r.update(s.result)
        if r.get("requests") and "proxy_cpu_s" in r:
            r["cpu_us_per_req"] = r["proxy_cpu_s"] / r["requests"] * 1e6
        return r

    try:
        for run in range(runs):
            for cell, spec in CELLS.items():
                if cell not in only:
                    continue
                for name in spec["targets"]:
                    if name not in targets:
                        continue  # not started (bh2 runs only for the HTTP/2 cells)
                    try:
                        r = one(cell, name, warm=(run == 0))
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                        log(f"{cell} {name} run {run + 1}: FAILED: {exc}")
                        r = {"failed": str(exc)}
                    results["cells"].setdefault(cell, {}).setdefault(name, []).append(r)
                    brief = (f"fast client p50 {r['fast_p50_ms']:.1f} ms" if "fast_p50_ms" in r else
                             f"{r['rps']:,.0f} req/s" if "rps" in r else
                             f"{r['mb_s']:,.0f} MB/s" if "mb_s" in r else r.get("failed", "?"))
                    log(f"run {run + 1}/{runs} {cell:9s} {name:6s} {brief}")
                    (out_dir / "matrix.json").write_text(json.dumps(results, indent=1))
        if only & {"h2", "h2stream"}:
            log("HTTP/2 engines alone (bench/h2_engines.py)")
            try:
                out = _run([setup["python"], str(HERE / "h2_engines.py"), "--json", "20000"], 300)
                results["h2_engines"] = json.loads(out.strip().splitlines()[-1])
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
                log(f"h2_engines FAILED: {exc}")
        samples = int(setup["lifecycle_samples"])
        log(f"app's own start time, {samples} samples")
        results["app_start_ms"] = app_own_start(setup["python"], samples)
        for name in ("b1", "bauto"):
            t = targets[name]
            for what, fn in (("cold_start_ms", cold_start), ("crash_ms", crash_recovery)):
                log(f"{name}: {what}, {samples} samples")
                try:
                    results.setdefault(what, {})[name] = fn(t["admin"], t["http_port"], samples)
                except (RuntimeError, OSError) as exc:
                    log(f"{name} {what} FAILED: {exc}")
                    results.setdefault(what, {})[name] = {"failed": str(exc)}
        (out_dir / "matrix.json").write_text(json.dumps(results, indent=1))
        if setup.get("pyspy"):
            log(f"py-spy on a Bastion worker for {setup['profile_seconds']} s under wrk load")
            try:
                results["profile"] = profile(setup, out_dir)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                log(f"py-spy FAILED: {exc}")
                results["profile"] = {"failed": str(exc)}
    finally:
        results["finished"] = time.time()
        results["load_after"] = os.getloadavg()
        (out_dir / "matrix.json").write_text(json.dumps(results, indent=1))


# --- report ------------------------------------------------------------------------------
def _median(runs: list[dict[str, Any]] | None, key: str) -> float | None:
    values = [r[key] for r in runs or [] if isinstance(r, dict) and key in r]
    return statistics.median(values) if values else None


def _med_list(values: Any) -> float | None:
    return statistics.median(values) if isinstance(values, list) and values else None


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:.0f}%"


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _machine() -> list[str]:
    lscpu = _version(["sh", "-c", "lscpu | grep -E '^Model name' | sed 's/.*: *//'"])
    mem = _version(["sh", "-c", "free -h | awk '/^Mem:/ {print $2}'"])
    return [f"{platform.node()}: {_version(['nproc'])} CPUs ({lscpu}), {mem} memory, "
            f"Linux {platform.release()}"]


def _engines_table(figures: Any) -> list[str]:
    if not figures:
        return ["(not measured in this run: it runs with the h2 or h2stream cell)"]
    return ["| engine | CPU µs / request |", "|---|---:|",
            *(f"| {name} | {us:.1f} |" for name, us in figures)]


def cmd_report(out: str, doc: str, png: str) -> None:
    d = Path(out)
    res = json.loads((d / "matrix.json").read_text())
    setup, cells = res["setup"], res["cells"]

    def med(cell: str, name: str, key: str) -> float | None:
        return _median(cells.get(cell, {}).get(name), key)

    # (row label, cell, key, scale, digits, higher is better)
    rows = [
        ("HTTP/1.1 req/s", "http", "rps", 1, 0, True),
        ("HTTP/1.1 p50 ms", "http", "p50_us", 1e-3, 2, False),
        ("HTTP/1.1 p99 ms", "http", "p99_us", 1e-3, 2, False),
        ("TLS keep-alive req/s", "tls", "rps", 1, 0, True),
        ("TLS keep-alive p99 ms", "tls", "p99_us", 1e-3, 2, False),
        ("TLS handshakes/s (new conn. per request)", "handshake", "rps", 1, 0, True),
        ("HTTP/2 req/s (h2load -c10 -m10)", "h2", "rps", 1, 0, True),
        ("HTTP/2 mean request time ms", "h2", "mean_us", 1e-3, 2, False),
        ("wrk -c1 p50 latency ms", "c1", "p50_us", 1e-3, 3, False),
        ("wrk -c1 p99 latency ms", "c1", "p99_us", 1e-3, 3, False),
        ("1 GiB stream MB/s", "stream", "mb_s", 1, 0, True),
        ("1 GiB stream: proxy RSS growth MiB", "stream", "rss_growth", 1 / 1048576, 1, False),
        ("1 GiB over HTTP/2 MB/s", "h2stream", "mb_s", 1, 0, True),
        ("1 GiB over HTTP/2: proxy RSS growth MiB", "h2stream", "rss_growth", 1 / 1048576, 1, False),
        ("proxy CPU µs/request, HTTP/1.1", "http", "cpu_us_per_req", 1, 1, False),
        ("proxy CPU µs/request, TLS keep-alive", "tls", "cpu_us_per_req", 1, 1, False),
        ("proxy CPU µs/request, TLS handshakes", "handshake", "cpu_us_per_req", 1, 1, False),
        ("proxy CPU µs/request, HTTP/2", "h2", "cpu_us_per_req", 1, 1, False),
        ("proxy peak RSS MiB (any load cell)", "*", "rss_peak", 1 / 1048576, 1, False),
    ]
    if "static" in cells:
        rows += [("static 1 KiB file req/s", "static", "rps", 1, 0, True),
                 ("static 1 KiB file p99 ms", "static", "p99_us", 1e-3, 2, False),
                 ("proxy CPU µs/request, static 1 KiB", "static", "cpu_us_per_req", 1, 1, False)]
    if "static-big" in cells:
        rows += [("static file stream MB/s", "static-big", "mb_s", 1, 0, True),
                 ("static file stream: RSS growth MiB", "static-big", "rss_growth", 1 / 1048576,
                  1, False)]
    if "gzip" in cells:
        rows += [("100 KiB HTML page gzip'd req/s", "gzip", "rps", 1, 0, True),
                 ("proxy CPU µs/request, gzip'd page", "gzip", "cpu_us_per_req", 1, 1, False),
                 ("gzip'd page bytes (of 102400)", "gzip", "gzip_bytes", 1, 0, False)]
    for cell in cells.values():
        for runs in cell.values():
            for r in runs:
                if "rss_peak" in r:
                    r["rss_growth"] = r["rss_peak"] - r["rss_start"]

    def value(cell: str, name: str, key: str) -> float | None:
        if cell == "*":
            vals = [v for c in cells for v in [med(c, name, key)] if v is not None]
            return max(vals) if vals else None
        return med(cell, name, key)

    columns = [c for c in COLUMNS if c != "bh2" or "bh2" in setup["targets"]]
    head = "| measure | " + " | ".join(LABELS[t] for t in columns) + " |"
    table = [head, "|---|" + "---:|" * len(columns)]
    for label, cell, key, scale, digits, _ in rows:
        n = value(cell, "nginx", key)
        parts = []
        for name in columns:
            v = value(cell, name, key)
            if v is None or (name == "direct" and key in ("cpu_us_per_req", "rss_peak", "rss_growth")):
                parts.append("–")
                continue
            text = _fmt(v * scale, digits)
            if name != "nginx" and n:
                text += f" ({v / n:.2f}×)"
            parts.append(text)
        table.append(f"| {label} | " + " | ".join(parts) + " |")

    app_start = _med_list(res.get("app_start_ms"))
    life = ["| measure | Bastion workers=1 | Bastion workers=auto |", "|---|---:|---:|",
            f"| app's own start (spawn `bench/app.py` → port accepts), median ms | {_fmt(app_start, 1)} | {_fmt(app_start, 1)} |"]
    cold = {n: _med_list(res.get("cold_start_ms", {}).get(n)) for n in ("b1", "bauto")}
    crash = {n: _med_list(res.get("crash_ms", {}).get(n)) for n in ("b1", "bauto")}
    life.append("| first request to a cold on-demand app, median ms | " +
                " | ".join(_fmt(cold[n], 1) for n in ("b1", "bauto")) + " |")
    life.append("| → Bastion's overhead beyond the app's own start, ms | " + " | ".join(
        _fmt(cold[n] - app_start, 1) if cold[n] is not None and app_start is not None else "–"
        for n in ("b1", "bauto")) + " |")
    life.append("| kill -9 of the app → next request served by a new process, median ms | " +
                " | ".join(_fmt(crash[n], 1) for n in ("b1", "bauto")) + " |")
    life.append("| → beyond the app's own start, ms | " + " | ".join(
        _fmt(crash[n] - app_start, 1) if crash[n] is not None and app_start is not None else "–"
        for n in ("b1", "bauto")) + " |")

    # targets
    def ratio(cell: str, key: str, name: str = "bauto") -> float | None:
        b, n = med(cell, name, key), med(cell, "nginx", key)
        return b / n if b is not None and n else None

    def check(ok: bool | None) -> str:
        return "–" if ok is None else ("**met**" if ok else "**not met**")

    def cmp(v: float | None, op: str, limit: float) -> bool | None:
        if v is None:
            return None
        return v >= limit if op == ">=" else v < limit

    grow_b = med("stream", "bauto", "rss_growth")
    t = []
    r = ratio("http", "rps")
    t.append(("HTTP/1.1 small responses, workers=auto: req/s ≥ 0.6× nginx's", _pct(r), cmp(r, ">=", 0.6)))
    r = ratio("http", "cpu_us_per_req")
    t.append(("… proxy CPU per request ≤ 2× nginx's", f"{r:.2f}×" if r else "–", cmp(r, "<", 2.0001)))
    r = ratio("http", "p99_us")
    t.append(("… p99 ≤ 2× nginx's", f"{r:.2f}×" if r else "–", cmp(r, "<", 2.0001)))
    r = ratio("c1", "p50_us")
    t.append(("wrk -c1 median latency ≤ 1.3× nginx's (workers=auto)", f"{r:.2f}×" if r else "–", cmp(r, "<", 1.3001)))
    r = ratio("tls", "rps")
    t.append(("TLS keep-alive req/s ≥ 0.5× nginx's (workers=auto)", _pct(r), cmp(r, ">=", 0.5)))
    r = ratio("handshake", "rps")
    t.append(("TLS handshakes/s ≥ 0.9× nginx's (workers=auto)", _pct(r), cmp(r, ">=", 0.9)))
    r = ratio("h2", "rps")
    t.append(("HTTP/2 (h2load -m10), workers=auto: ≥ 0.4× nginx's", _pct(r), cmp(r, ">=", 0.4)))
    r = ratio("h2", "cpu_us_per_req")
    t.append(("… proxy CPU per request ≤ 2.5× nginx's", f"{r:.2f}×" if r else "–", cmp(r, "<", 2.5001)))
    r = ratio("h2", "rps", "bh2")
    t.append(("… with the h2 engine (fallback; for the record, no target)", _pct(r), None))
    r = ratio("h2stream", "mb_s")
    t.append(("1 GiB over HTTP/2 ≥ 0.8× nginx's rate (workers=auto)", f"{r:.3f}×" if r else "–",
              cmp(r, ">=", 0.8)))
    g2 = med("h2stream", "bauto", "rss_growth")
    g2 = g2 / 1048576 if g2 is not None else None
    t.append(("… with Bastion's RSS growing < 32 MB", f"{_fmt(g2, 1)} MiB", cmp(g2, "<", 32 * 1e6 / 1048576)))
    r = ratio("stream", "mb_s")
    spread = {n: [x["mb_s"] for x in cells.get("stream", {}).get(n, []) if "mb_s" in x] for n in ("nginx", "bauto")}
    t.append(("1 GiB stream at least as fast as through nginx (workers=auto)",
              (f"{r:.3f}× (runs: nginx {'/'.join(f'{v:.0f}' for v in spread['nginx'])}, Bastion "
               f"{'/'.join(f'{v:.0f}' for v in spread['bauto'])} MB/s)") if r else "–", cmp(r, ">=", 1.0)))
    g = grow_b / 1048576 if grow_b is not None else None
    t.append(("… with Bastion's RSS growing < 32 MB", f"{_fmt(g, 1)} MiB", cmp(g, "<", 32 * 1e6 / 1048576)))
    peak = max((x.get("rss_peak", 0) for cell in cells.values() for x in cell.get("bauto", [])),
               default=None)
    pk = peak / 1048576 if peak else None
    t.append(("peak RSS of all Bastion processes under load (workers=auto) ≤ 100 MB",
              f"{_fmt(pk, 1)} MiB", cmp(pk, "<", 100 * 1e6 / 1048576)))
    ov = cold["bauto"] - app_start if cold["bauto"] is not None and app_start is not None else None
    t.append(("on-demand first request: < 30 ms beyond the app's own start", f"{_fmt(ov, 1)} ms", cmp(ov, "<", 30)))
    ov = crash["bauto"] - app_start if crash["bauto"] is not None and app_start is not None else None
    t.append(("crash → next served request < 50 ms beyond the app's own start", f"{_fmt(ov, 1)} ms beyond", cmp(ov, "<", 50)))
    if "static" in cells:
        r = ratio("static", "rps")
        t.append(("static 1 KiB files, keep-alive: req/s ≥ 0.5× nginx's (workers=auto)", _pct(r),
                  cmp(r, ">=", 0.5)))
    if "static-big" in cells:
        r = ratio("static-big", "mb_s")
        t.append(("static 1 GiB file over plain HTTP ≥ 0.9× nginx's rate (workers=auto)",
                  f"{r:.3f}×" if r else "–", cmp(r, ">=", 0.9)))
        grow = med("static-big", "bauto", "rss_growth")
        g = grow / 1048576 if grow is not None else None
        t.append(("… with Bastion's RSS flat (growing < 32 MB)", f"{_fmt(g, 1)} MiB",
                  cmp(g, "<", 32 * 1e6 / 1048576)))
    if "gzip" in cells:
        r = ratio("gzip", "rps")
        t.append(("compression: a 100 KiB HTML page gzip'd ≥ 0.5× nginx's `gzip on` "
                  "throughput (workers=auto)", _pct(r), cmp(r, ">=", 0.5)))
    slow: list[str] = []
    if "slow" in cells:
        names = ("slow-on", "slow-off")
        slow = ["| measure | " + " | ".join(SLOW_LABELS[n] for n in names) + " |",
                "|---|---:|---:|"]
        for label, key, digits in (("fast client, median ms", "fast_p50_ms", 1),
                                   ("fast client, p90 ms", "fast_p90_ms", 1),
                                   ("fast client, slowest ms", "fast_max_ms", 1),
                                   ("fast requests answered", "fast_requests", 0),
                                   ("uploads completed", "uploads", 0),
                                   ("downloads completed", "downloads", 0),
                                   ("client errors", "errors", 0),
                                   ("Bastion peak RSS MiB", "rss_peak", 1)):
            scale = 1 / 1048576 if key == "rss_peak" else 1
            slow.append(f"| {label} | " + " | ".join(
                _fmt(v * scale if (v := med("slow", n, key)) is not None else None, digits)
                for n in names) + " |")
        p50 = med("slow", "slow-on", "fast_p50_ms")
        off = med("slow", "slow-off", "fast_p50_ms")
        t.append(("slow clients: a fast client's median < 100 ms with buffering "
                  "(workers=1; buffering off for comparison)",
                  f"{_fmt(p50, 1)} ms (off: {_fmt(off, 1)} ms)", cmp(p50, "<", 100)))
    targets = ["| target (Bastion workers=auto vs nginx) | measured | |", "|---|---:|---|"]
    targets += [f"| {a} | {b} | {check(c)} |" for a, b, c in t]

    prof = res.get("profile") or {}
    if prof.get("top"):
        where = [f"py-spy 0.4 (`record -r 100 --nolineno`, idle time excluded) on one worker process "
                 f"(pid {prof['pid']}) of Bastion `workers: auto` for {setup['profile_seconds']} s under "
                 f"`wrk -t2 -c32` HTTP/1.1 load; {prof['samples']} samples. Top functions by self time:", "",
                 "| self % | function (file) |", "|---:|---|"]
        where += [f"| {share * 100:.1f} | `{fn}` |" for fn, share in prof["top"]]
        if prof.get("groups"):
            where += ["", "Self time by package: " + ", ".join(
                f"{name} {share * 100:.0f}%" for name, share in prof["groups"]) + ". "
                "Self time of a function includes the C code it calls (a socket write, the "
                "uvloop loop itself under `Runner.run`). The data plane's compiled modules "
                "(`proxy/edge/native.py`: h1, flow, upstream, strict, codec, headers) are C "
                "called from the loop: py-spy counts their time under `Runner.run` too, so "
                "what is listed by name is what still runs as Python."]
        where += ["", "Self time by area:", "", "| self % | area |", "|---:|---|"]
        where += [f"| {share * 100:.1f} | {area} |" for area, share in prof["areas"]]
    else:
        where = [f"(no profile: {prof.get('failed', 'not run')})"]

    when = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(res["started"]))
    lb, la = res.get("load_before", [0, 0, 0]), res.get("load_after", [0, 0, 0])
    duration = (res.get("finished", res["started"]) - res["started"]) / 60
    doc_lines = [
        "# Performance: Bastion vs nginx",
        "",
        "Generated by `bench/run.sh` (see `bench/README.md`); re-run it to refresh this page.",
        "All traffic on 127.0.0.1; load generator, proxies and app share the machine.",
        "",
        f"- date: {when}; the run took {duration:.1f} min",
        f"- machine: {_machine()[0]}; load average before {lb[0]:.2f}, after {la[0]:.2f} "
        "(anything above ~0 means other work shared the cores during the run)",
        f"- Bastion {setup.get('bastion_version', '?')} (HTTP/2 engine: {setup.get('h2_engine', '?')}), "
        f"Python {platform.python_version()}; "
        f"{_version(['nginx', '-v']).replace('nginx version: ', '')}; "
        f"{' '.join(_version(['wrk', '-v']).split()[:2])}; {_version(['h2load', '--version'])}; "
        f"{' '.join(_version(['curl', '--version']).split()[:2])}",
        f"- method: every load cell {setup['runs']}× {setup['duration']} s (interleaved across targets), "
        f"median shown; {setup['warmup']} s warm-up before the first run of each cell; "
        f"start-up and crash figures are medians of {setup['lifecycle_samples']} samples",
        f"- nginx: worker_processes {setup.get('nginx_workers', '?')}, access_log off, upstream keepalive 64, "
        "TLS 1.2/1.3 and http2 on the TLS listener; Bastion: access_log off, `workers: 1` and `workers: auto` "
        f"(= {os.cpu_count()} worker processes here), each launching its own copy of the app",
        "- upstream: `bench/app.py` (aiohttp low-level server + uvloop, one process): a 13-byte body, "
        "or `/big?size=N` streamed in 256 KiB writes",
        "- TLS: one trustme ECDSA P-256 certificate for both proxies; TLS 1.3",
        "- proxy CPU/RSS (psutil, every 0.1 s): nginx = master + workers; Bastion = main + keeper + "
        "worker processes; the app excluded. CPU per request = proxy CPU seconds / requests in the window",
        "",
        "## Results (ratios to nginx in parentheses)",
        "",
        *table,
        "",
        f"![req/s per cell]({Path(png).name})",
        "",
        *(["## Slow clients in front of a gunicorn sync worker", "",
           "`bench/wsgi_app.py` under gunicorn, one sync worker, behind Bastion `workers: 1`; "
           "20 clients upload 512 KiB each at 64 KiB/s and 20 read a 512 KiB answer at "
           "64 KiB/s, over and over, while a fast client asks for a 4-byte answer every "
           "0.1 s on a new connection; each latency counts from when the request was due, "
           "so one stuck for seconds delays those due behind it too (no coordinated "
           "omission).", "", *slow, ""] if slow else []),
        "## App lifecycle through Bastion",
        "",
        *life,
        "",
        "## Targets",
        "",
        *targets,
        "",
        "## Where the time goes",
        "",
        *where,
        "",
        "## HTTP/2 engines",
        "",
        "HTTP/2 is served by libnghttp2 (`ng2`: framing, HPACK, flow control and stream state "
        "in C, through Bastion's own extension `proxy/edge/_ng2.c`), or by the `h2` library "
        "where the extension is not built (the column \"Bastion auto, h2 engine\" runs with "
        "`BASTION_H2_ENGINE=h2`). Both apply the same checks and bounds. The engines alone "
        "(`bench/h2_engines.py`: a client's HEADERS for GET requests, ten streams per read, "
        "answered with a 13-byte body; no sockets, no app), CPU µs per request:",
        "",
        *_engines_table(res.get("h2_engines")),
        "",
        "## Caveats",
        "",
        "- One 2-core machine runs wrk/h2load/curl, the proxy and the app, so they compete for the "
        "same cores: a proxy that uses more CPU also takes it from the app and the load generator. "
        "CPU µs per request is the fairest per-request cost.",
        "- `direct` is bounded by the single Python app process; nginx and Bastion rows are bounded "
        "by the app too once the proxy is cheap enough.",
        "- Anything else running on the machine shows up directly; see the load averages above.",
    ]
    text = "\n".join(doc_lines) + "\n"
    inprocess = d / "inprocess.md"  # the opt-in inprocess cell (bench/inprocess.py)
    if inprocess.exists():
        text += "\n" + inprocess.read_text()
    Path(doc).write_text(text)
    print("\n".join(table + [""] + life + [""] + targets + [""] + where[:20]))
    try:
        _chart(cells, png)
    except ImportError:
        print("[bench] matplotlib not installed: no chart", file=sys.stderr)


def _chart(cells: dict[str, Any], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("http", "HTTP/1.1"), ("tls", "TLS\nkeep-alive"), ("handshake", "TLS new conn\nper request"),
              ("h2", "HTTP/2\n-c10 -m10"), ("c1", "wrk -c1")]
    colors = {"direct": "#9e9e9e", "nginx": "#2e7d32", "b1": "#90caf9", "bauto": "#1565c0", "bh2": "#ef6c00"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.16
    for i, name in enumerate(COLUMNS):
        xs, ys = [], []
        for j, (cell, _) in enumerate(groups):
            v = _median(cells.get(cell, {}).get(name), "rps")
            if v is not None:
                xs.append(j + (i - 2) * width)
                ys.append(v)
        if not ys:
            continue
        bars = ax.bar(xs, ys, width, label=LABELS[name], color=colors[name])
        ax.bar_label(bars, labels=[f"{y / 1000:.1f}k" for y in ys], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), [g[1] for g in groups])
    ax.set_ylabel("requests/s (median)")
    ax.set_title("Small responses, 127.0.0.1")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    ys = [(_median(cells.get("stream", {}).get(n), "mb_s") or 0) for n in TARGETS]
    bars = ax2.bar(range(len(TARGETS)), ys, color=[colors[n] for n in TARGETS])
    ax2.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7)
    ax2.set_xticks(range(len(TARGETS)), ["direct", "nginx", "B w=1", "B auto"], fontsize=8)
    ax2.set_ylabel("MB/s (median)")
    ax2.set_title("1 GiB download")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    {"run": cmd_run, "report": cmd_report}[command](*args)


if __name__ == "__main__":
    try:
        main()
    except Stop as exc:
        sys.exit(f"[bench] stopped ({exc})")
