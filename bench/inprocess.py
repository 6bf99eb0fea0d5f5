"""The in-process hosting benchmark (issue 13): the same app three ways, one run.

    python bench/inprocess.py                       # RUNS=3 DURATION=5: about 2 minutes
    python bench/inprocess.py --runs 1 --duration 1 # a smoke test
    CELLS="inprocess" bench/run.sh                  # the same, from the bench driver

Targets, all on 127.0.0.1 with free ports, started and stopped by this script:

| target | what |
|---|---|
| `uvicorn` | `uvicorn hello_apps:app --workers N --http httptools --loop uvloop` directly (N = usable cores, as Bastion's `workers: auto`) |
| `in_process` | Bastion `workers: auto`, the apps of `bench/hello_apps.py` called in its workers (`hosting_model: in_process`) |
| `out_of_process` | Bastion `workers: auto` in front of the same apps as processes of their own: uvicorn (httptools, uvloop) for the ASGI ones, gunicorn for Flask, `processes_per_app: N` |

Cells, each run ``RUNS`` times for ``DURATION`` seconds, interleaved; the medians are
reported: `http` (the raw ASGI hello app, `wrk -t2 -c32`, all three targets), `tls` (the
same over https, the two Bastions), `h2` (`h2load -c10 -m10` over https, the two
Bastions), `fastapi` and `flask` (`wrk -t2 -c32` on the framework apps, the two
Bastions). The table gives requests per second, p99 latency, and the ratios the issue
sets targets for: in process against uvicorn direct (>= 1.0x) and against out of
process (>= 2x). Writes JSON (``--json``) and a Markdown section (``--markdown``) when
asked. Needs wrk and h2load (bench/run.sh installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from matrix import h2load, wrk  # noqa: E402 - the bench's own load generators
from measure import wait_ok  # noqa: E402

CELLS = {
    "http": ("raw ASGI hello, HTTP/1.1 keep-alive (wrk -t2 -c32)", "/",
             ("uvicorn", "in_process", "out_of_process")),
    "tls": ("raw ASGI hello, TLS keep-alive (wrk -t2 -c32)", "/", ("in_process", "out_of_process")),
    "h2": ("raw ASGI hello, HTTP/2 (h2load -c10 -m10)", "/", ("in_process", "out_of_process")),
    "fastapi": ("FastAPI hello, HTTP/1.1 (wrk -t2 -c32)", "/fastapi/",
                ("in_process", "out_of_process")),
    "flask": ("Flask hello, HTTP/1.1 (wrk -t2 -c32)", "/flask/", ("in_process", "out_of_process")),
}


def cores() -> int:
    """Usable cores (what ``workers: auto`` resolves to)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bastion_config(kind: str, http: int, https: int, tls: Path, work: Path, python: str,
                   n: int) -> dict[str, Any]:
    """The configuration of the ``in_process`` or ``out_of_process`` Bastion."""
    common = {"cwd": str(HERE), "start_mode": "always"}
    if kind == "in_process":
        apps: dict[str, Any] = {
            "hello": {"path": "/", "hosting_model": "in_process", "app": "hello_apps:app",
                      "cwd": str(HERE)},
            "fastapi": {"path": "/fastapi", "hosting_model": "in_process",
                        "app": "hello_apps:fastapi_app", "cwd": str(HERE)},
            "flask": {"path": "/flask", "hosting_model": "in_process",
                      "app": "hello_apps:flask_app", "interface": "wsgi", "cwd": str(HERE)},
        }
    else:
        uvicorn = [python, "-m", "uvicorn", "--http", "httptools", "--loop", "uvloop",
                   "--no-access-log", "--host", "127.0.0.1", "--port", "{port}"]
        apps = {
            "hello": {"path": "/", "command": [*uvicorn, "hello_apps:app"],
                      "processes_per_app": n, **common},
            "fastapi": {"path": "/fastapi", "command": [*uvicorn, "hello_apps:fastapi_app"],
                        "processes_per_app": n, **common},
            "flask": {"path": "/flask", "command": [
                python, "-m", "gunicorn", "--workers", "1", "--bind", "127.0.0.1:{port}",
                "hello_apps:flask_app"], "processes_per_app": n, **common},
        }
    return {
        "listen": [{"address": f"127.0.0.1:{http}"},
                   {"address": f"127.0.0.1:{https}",
                    "tls": {"certificates": [{"cert": str(tls / "cert.pem"),
                                              "key": str(tls / "key.pem")}]}}],
        "admin_socket": str(work / f"{kind}-admin.sock"),
        "workers": "auto",
        "access_log": None,
        "apps": apps,
    }


class Targets:
    """The three targets' processes (stopped on exit, whatever happens)."""

    def __init__(self, python: str, work: Path) -> None:
        self.python = python
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: dict[str, dict[str, str]] = {}

    def _spawn(self, name: str, argv: list[str], cwd: Path) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(argv, cwd=str(cwd), stdout=log,
                                           stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL,
                                           start_new_session=True))

    def start(self, n: int) -> None:
        subprocess.run([self.python, str(HERE / "measure.py"), "cert",
                        str(self.work / "tls")], check=True)
        port = free_port()
        self._spawn("uvicorn", [self.python, "-m", "uvicorn", "--app-dir", str(HERE),
                                "hello_apps:app", "--workers", str(n), "--http", "httptools",
                                "--loop", "uvloop", "--no-access-log", "--host", "127.0.0.1",
                                "--port", str(port)], HERE)
        self.urls["uvicorn"] = {"http": f"http://127.0.0.1:{port}"}
        import yaml

        for kind in ("in_process", "out_of_process"):
            http, https = free_port(), free_port()
            config = bastion_config(kind, http, https, self.work / "tls", self.work,
                                    self.python, n)
            path = self.work / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(config))
            self._spawn(kind, [self.python, "-m", "bastion", "serve", "-c", str(path)],
                        self.work)
            self.urls[kind] = {"http": f"http://127.0.0.1:{http}",
                               "https": f"https://127.0.0.1:{https}"}
        for name, urls in self.urls.items():
            for _, cell_path, _ in CELLS.values():
                if name != "uvicorn" or cell_path == "/":
                    wait_ok(urls["http"] + cell_path)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def measure(cell: str, urls: dict[str, str], seconds: float, warm: float) -> dict[str, Any]:
    path = CELLS[cell][1]
    if cell == "h2":
        return h2load(urls["https"] + path, seconds, warm or 1)
    url = (urls["https"] if cell == "tls" else urls["http"]) + path
    if warm:
        wrk(url, warm, 2, 32)
    return wrk(url, seconds, 2, 32)


def report(results: dict[str, Any], n: int) -> str:
    """The Markdown section of the results."""
    def med(cell: str, target: str, key: str) -> float | None:
        values = [r[key] for r in results["cells"].get(cell, {}).get(target, [])
                  if key in r]
        return statistics.median(values) if values else None

    lines = [
        "## In-process hosting (`CELLS=inprocess`, bench/inprocess.py)",
        "",
        f"{n} usable core(s); uvicorn `--workers {n}` (httptools, uvloop); both Bastions "
        "`workers: auto`; out of process: uvicorn (ASGI) or gunicorn (Flask) with "
        f"`processes_per_app: {n}`. Median of {results['runs']} run(s) of "
        f"{results['duration']:g} s.",
        "",
        "| cell | uvicorn direct | in process | out of process | in / uvicorn | in / out |",
        "|---|---|---|---|---|---|",
    ]
    for cell, (label, _, _) in CELLS.items():
        row = [label]
        figures = {}
        for target in ("uvicorn", "in_process", "out_of_process"):
            rps = med(cell, target, "rps")
            p99 = med(cell, target, "p99_us")
            figures[target] = rps
            if rps is None:
                row.append("-")
            else:
                row.append(f"{rps:,.0f} req/s" + (f", p99 {p99 / 1000:.1f} ms" if p99 else ""))
        for a, b in (("in_process", "uvicorn"), ("in_process", "out_of_process")):
            x, y = figures.get(a), figures.get(b)
            row.append(f"{x / y:.2f}x" if x and y else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("RUNS", 3)))
    parser.add_argument("--duration", type=float,
                        default=float(os.environ.get("DURATION", "5").rstrip("s")))
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="write the Markdown section here")
    parser.add_argument("--cells", default=" ".join(CELLS),
                        help="space-separated subset of: " + " ".join(CELLS))
    args = parser.parse_args()
    n = cores()
    chosen = [c for c in args.cells.split() if c in CELLS]
    with tempfile.TemporaryDirectory(prefix="bastion-inprocess-") as tmp:
        targets = Targets(args.python, Path(tmp))
        results: dict[str, Any] = {"runs": args.runs, "duration": args.duration,
                                   "cores": n, "cells": {}}
        try:
            targets.start(n)
            for run in range(args.runs):
                for cell in chosen:
                    for target in CELLS[cell][2]:
                        try:
                            r = measure(cell, targets.urls[target], args.duration,
                                        args.warmup if run == 0 else 0.0)
                        except (RuntimeError, subprocess.TimeoutExpired) as exc:
                            r = {"failed": str(exc)}
                        results["cells"].setdefault(cell, {}).setdefault(target, []).append(r)
                        brief = f"{r['rps']:,.0f} req/s" if "rps" in r else r.get("failed")
                        print(f"[inprocess] run {run + 1}/{args.runs} {cell:8s} {target:15s} "
                              f"{brief}", file=sys.stderr, flush=True)
        finally:
            targets.stop()
    text = report(results, n)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
