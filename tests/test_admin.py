"""The admin socket and the commands that use it, against a real Bastion.

``GET /status`` fields, ``bastion status`` (table and ``--json``), ``GET /metrics`` in the
Prometheus text format (request counters, histogram, restarts after a kill -9), the
socket's mode, ``POST /apps/NAME/stop|start`` and ``bastion recycle``. Runs with two
worker processes, so the figures cross the worker channel (reported about every second).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, BastionProcess, app_command, simple_config, wait_until
from test_workers import ready_pids, worker_pids

ECHO = app_command("uvicorn", "echo_asgi:app")
SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def bastion_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BASTION_CONFIG"}
    return subprocess.run([sys.executable, "-m", "bastion", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def admin_get(bastion: BastionProcess, path: str) -> tuple[str, str]:
    """``GET path`` on the admin socket: (head, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(bastion.config["admin_socket"])
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bastion\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), body.decode()


def metrics(bastion: BastionProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``GET /metrics`` parsed: (name, labels) -> value; every line must be valid."""
    head, body = admin_get(bastion, "/metrics")
    assert head.startswith("HTTP/1.1 200"), head
    assert "text/plain" in head.lower()
    samples = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            assert not line or re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def bastion(tmp_path: Path) -> Iterator[BastionProcess]:
    config = simple_config({
        "x": {"command": ECHO, "start_mode": "always"},
        "other": {"command": ECHO, "path": "/other"},
    }, workers=2)
    running = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: ready_pids(running, "x"), 20), running.log()
        assert wait_until(lambda: len(worker_pids(running)) == 2, 20)
        yield running
    finally:
        running.stop()


def test_status_fields(bastion: BastionProcess) -> None:
    for _ in range(5):
        assert bastion.get("/info").status == 200
    assert wait_until(lambda: bastion.status()["apps"]["x"]["processes"][0]["requests"] >= 5,
                      5), bastion.status()["apps"]["x"]
    data = bastion.status()
    assert data["pid"] == bastion.pid
    assert {k: sorted(v) for k, v in data["pools"].items()} == {"default": ["other", "x"]}
    assert sorted(data["apps"]) == ["other", "x"]
    assert data["generation"] == 0 and data["config"] == str(bastion.path)
    assert [w["pid"] for w in data["workers"]] == worker_pids(bastion)
    app = data["apps"]["x"]
    assert app["state"] == "ready" and app["pool"] == "default"
    assert app["restarts"] == 0 and app["last_exit"] == ""
    (proc,) = app["processes"]
    assert set(proc) >= {"pid", "port", "state", "uptime", "requests", "in_flight", "rss",
                         "cpu_percent"}
    assert proc["state"] == "ready" and proc["in_flight"] == 0
    assert proc["requests"] == 5
    assert proc["rss"] > 1_000_000 and 0 <= proc["cpu_percent"] <= 400
    assert 0 < proc["uptime"] < 120
    assert 1024 <= proc["port"] <= 65535
    assert bastion.get("/info").json()["pid"] == proc["pid"]
    assert data["apps"]["other"]["processes"] == []  # on demand, not started yet


def test_status_command(bastion: BastionProcess) -> None:
    pid = bastion.app_pids("x")[0]
    table = bastion_cli("status", "-c", str(bastion.path))
    assert table.returncode == 0, table.stderr
    # One row per process: app, state, pid, port, uptime, requests, in flight, RSS, CPU.
    assert re.search(rf"^\s*x\s+ready/ready\s+{pid}\s+\d+\s+\d+s\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+$",
                     table.stdout, re.M), table.stdout
    assert re.search(r"^\s*other\s+stopped\s+-", table.stdout, re.M), table.stdout
    assert "pool default" in table.stdout and "APP" in table.stdout
    as_json = bastion_cli("status", "--json", "-c", str(bastion.path))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["apps"]["x"]["processes"][0]["pid"] == pid


def test_status_command_without_bastion(tmp_path: Path) -> None:
    config = tmp_path / "b.yaml"
    config.write_text(f"listen: [{{address: '127.0.0.1:1'}}]\nadmin_socket: {tmp_path}/no.sock\n"
                      f"apps: {{x: {{command: [python3, app.py]}}}}\n")
    done = bastion_cli("status", "-c", str(config))
    assert done.returncode == 2
    assert f"no admin socket at {tmp_path}/no.sock (admin_socket in {config})" in done.stderr


def test_admin_socket_mode(bastion: BastionProcess) -> None:
    mode = os.stat(bastion.config["admin_socket"]).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_metrics(bastion: BastionProcess) -> None:
    before = sample(metrics(bastion), "bastion_requests_total", app="x", status="200")
    for _ in range(7):
        assert bastion.get("/info").status == 200
    # Worker processes report about once a second.
    assert wait_until(lambda: sample(metrics(bastion), "bastion_requests_total",
                                     app="x", status="200") == before + 7, 3), metrics(bastion)
    samples = metrics(bastion)
    buckets = {dict(labels)["le"]: value for (name, labels), value in samples.items()
               if name == "bastion_request_duration_seconds_bucket" and ("app", "x") in labels}
    assert "+Inf" in buckets and "0.005" in buckets and len(buckets) >= 10
    values = [buckets[k] for k in sorted(buckets, key=lambda le: float(le))]
    assert values == sorted(values) and values[-1] == before + 7  # cumulative
    assert sample(samples, "bastion_request_duration_seconds_count", app="x") == before + 7
    assert sample(samples, "bastion_request_duration_seconds_sum", app="x") > 0
    assert sample(samples, "bastion_workers") == 2
    assert sample(samples, "bastion_app_processes", app="x", state="ready") == 1
    assert sample(samples, "bastion_app_restarts_total", app="x") == 0

    os.kill(bastion.app_pids("x")[0], signal.SIGKILL)
    assert wait_until(lambda: sample(metrics(bastion), "bastion_app_restarts_total",
                                     app="x") == 1, 10), bastion.status()["apps"]["x"]
    assert wait_until(lambda: ready_pids(bastion, "x"), 20)
    assert bastion.get("/info").status == 200
    assert "signal" in bastion.status()["apps"]["x"]["last_exit"].lower() or \
        "9" in bastion.status()["apps"]["x"]["last_exit"]


def test_stop_and_start(bastion: BastionProcess) -> None:
    pid = bastion.app_pids("x")[0]
    status, body = bastion.admin_post("/apps/x/stop")
    assert status == 200 and body["ok"], body
    assert wait_until(lambda: not ready_pids(bastion, "x"), 10)
    assert bastion.get("/info").status == 503
    assert bastion.get("/info").status == 503  # stays stopped: no start on demand
    assert bastion.get("/other/info").status == 200  # the other app is untouched
    status, body = bastion.admin_post("/apps/x/start")
    assert status == 200 and body["ok"], body
    assert wait_until(lambda: bastion.get("/info").status == 200, 20)
    assert bastion.app_pids("x") != [pid]
    assert bastion.admin_post("/apps/nope/stop")[0] == 404


def test_recycle_command(bastion: BastionProcess) -> None:
    (old,) = bastion.app_pids("x")
    done = bastion_cli("recycle", "x", "-c", str(bastion.path))
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: ready_pids(bastion, "x") not in ([], [old]), 20), \
        bastion.status()["apps"]["x"]
    (new,) = wait_pid_settled(bastion, "x", old)
    assert new != old
    assert bastion.get("/info").json()["pid"] == new
    assert bastion.status()["apps"]["x"]["recycles"] >= 1
    unknown = bastion_cli("recycle", "nope", "-c", str(bastion.path))
    assert unknown.returncode == 1 and "nope" in unknown.stderr


def wait_pid_settled(bastion: BastionProcess, app: str, old: int) -> list[int]:
    """The ready pids once the old process has drained away."""
    def settled() -> Any:
        pids = ready_pids(bastion, app)
        return pids and old not in pids and all(
            p["pid"] != old for p in bastion.status()["apps"][app]["processes"])
    assert wait_until(settled, 20), bastion.status()["apps"][app]
    return ready_pids(bastion, app)
