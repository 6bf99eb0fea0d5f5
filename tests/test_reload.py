"""Reload (SIGHUP, ``bastion reload``) under load: no request fails, the new config applies.

A client (``Load`` from tests/test_workers.py: threads, one connection per request)
keeps about 150 requests/s going while the config changes: a second app at a new path,
an environment change of the first app (recycled overlapped: new pid), an unchanged app
(same pid), a second listener. An invalid config, or a listener that cannot be bound,
is refused: ``bastion reload`` exits 1 and the old config keeps serving.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO, BastionProcess, app_command, free_port, wait_until
from test_workers import Load, ready_pids, worker_pids

ECHO = app_command("uvicorn", "echo_asgi:app")
PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<message>.+)$", re.M)


def bastion_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BASTION_CONFIG"}
    return subprocess.run([sys.executable, "-m", "bastion", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def first_config(workers: int) -> dict[str, Any]:
    return {
        "listen": [{"address": f"127.0.0.1:{free_port()}"}],
        "workers": workers,
        "apps": {
            "one": {"command": ECHO, "path": "/", "start_mode": "always",
                    "environment": {"FLAVOUR": "old"}},
            "keep": {"command": ECHO, "path": "/keep", "start_mode": "always"},
        },
    }


def write_config(bastion: BastionProcess, config: dict[str, Any]) -> None:
    config.setdefault("admin_socket", bastion.config["admin_socket"])
    bastion.config = config
    bastion.path.write_text(yaml.safe_dump(config))


class Targets:
    """A thread-safe rotation of (port, path) that a test can replace."""

    def __init__(self, *targets: tuple[int, str]) -> None:
        self._lock = threading.Lock()
        self.set(*targets)

    def set(self, *targets: tuple[int, str]) -> None:
        with self._lock:
            self._cycle = itertools.cycle(targets)

    def __call__(self) -> tuple[int, str]:
        with self._lock:
            return next(self._cycle)


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or resets, or goes quiet)."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return answer


@pytest.fixture
def running(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BastionProcess]:
    bastion = BastionProcess(tmp_path, first_config(request.param)).start()
    try:
        assert wait_until(lambda: ready_pids(bastion, "one") and ready_pids(bastion, "keep"), 20), \
            bastion.log()
        assert wait_until(lambda: len(worker_pids(bastion)) == request.param, 20)
        yield bastion
    finally:
        bastion.stop()


@pytest.mark.parametrize(("running", "how"), [(1, "sighup"), (2, "sighup"), (1, "cli"),
                                              (2, "cli")],
                         indirect=["running"], ids=["w1-sighup", "w2-sighup", "w1-cli", "w2-cli"])
def test_reload_under_load(running: BastionProcess, how: str) -> None:
    bastion = running
    one_before = bastion.app_pids("one")
    keep_before = bastion.app_pids("keep")
    workers_before = worker_pids(bastion)
    port = bastion.port()
    new_port = free_port()
    config = first_config(bastion.config["workers"])
    config["listen"] = [bastion.config["listen"][0], {"address": f"127.0.0.1:{new_port}"}]
    config["apps"]["one"]["environment"] = {"FLAVOUR": "new"}
    config["apps"]["two"] = {"command": ECHO, "path": "/two"}

    targets = Targets((port, "/info"), (port, "/keep/info"))
    with Load(targets, rate=150, threads=4) as load:
        load.wait_for(100)
        write_config(bastion, config)
        started = time.monotonic()
        if how == "sighup":
            os.kill(bastion.pid, signal.SIGHUP)
            assert wait_until(lambda: bastion.status()["generation"] == 1, 30), bastion.log()
        else:
            done = bastion_cli("reload", "-c", str(bastion.path))
            assert done.returncode == 0, done.stderr
            assert "reloaded" in done.stdout
            assert bastion.status()["generation"] == 1
        assert wait_until(lambda: bastion.app_pids("one") not in ([], one_before), 30), \
            bastion.status()["apps"]["one"]
        took = time.monotonic() - started
        load.wait_for(100)
        # The new listener and the new app, under the same load.
        targets.set((port, "/info"), (new_port, "/keep/info"), (port, "/two/info"),
                    (new_port, "/two/info"))
        load.wait_for(150)
    print(f"reload ({how}, workers {bastion.config['workers']}) in {took:.2f}s: "
          f"{load.summary()}")
    # A connection accepted by the old generation is served (its first request too),
    # and new connections go to the new one: nothing fails.
    assert not load.failures, load.summary()
    assert load.ok >= 350

    assert bastion.get("/two/info").json()["app"] == "two"
    assert bastion.get("/two/info", listener=1).json()["app"] == "two"
    assert bastion.get("/info", listener=1).json()["app"] == "one"
    one_after = bastion.app_pids("one")
    assert one_after and set(one_after).isdisjoint(one_before)
    assert bastion.get("/info").json()["pid"] in one_after
    assert bastion.app_pids("keep") == keep_before
    assert bastion.get("/keep/info").json()["pid"] in keep_before
    if bastion.config["workers"] > 1:
        # A new generation of worker processes; the old one drained and exited.
        assert set(worker_pids(bastion)).isdisjoint(workers_before)


@pytest.mark.parametrize("running", [1, 2], indirect=True, ids=["w1", "w2"])
def test_ten_reloads_under_fresh_connection_load_lose_nothing(running: BastionProcess) -> None:
    """Four clients, a new connection per request, ten SIGHUPs in a row, each starting a
    new worker generation (a changed edge setting): not one request may fail."""
    bastion = running
    port = bastion.port()
    targets = Targets((port, "/info"), (port, "/keep/info"))
    with Load(targets, rate=300, threads=4) as load:
        load.wait_for(100)
        for generation in range(1, 11):
            config = first_config(bastion.config["workers"])
            config["listen"] = bastion.config["listen"]
            config["limits"] = {"keepalive_timeout": 60 + generation}
            write_config(bastion, config)
            os.kill(bastion.pid, signal.SIGHUP)
            assert wait_until(lambda g=generation: bastion.status()["generation"] == g, 30), \
                bastion.log()
            load.wait_for(30)
        load.wait_for(50)
    print(f"ten reloads: {load.summary()}")
    assert not load.failures, load.summary()
    assert load.ok >= 300


@pytest.mark.parametrize("running", [2], indirect=True, ids=["w2"])
def test_invalid_reload_keeps_serving(running: BastionProcess) -> None:
    bastion = running
    one_before = bastion.app_pids("one")
    good = bastion.path.read_text()
    # An unknown key on a known line.
    lines = good.splitlines()
    lines.insert(0, "idle_timout: 5m")
    bastion.path.write_text("\n".join(lines) + "\n")

    targets = Targets((bastion.port(), "/info"))
    with Load(targets, rate=100, threads=2) as load:
        load.wait_for(30)
        done = bastion_cli("reload", "-c", str(bastion.path))
        assert done.returncode == 1, (done.stdout, done.stderr)
        problems = [m.groupdict() for m in PROBLEM.finditer(done.stderr)]
        assert problems, done.stderr
        assert problems[0]["file"] == str(bastion.path) and problems[0]["line"] == "1"
        assert "idle_timout" in problems[0]["message"]
        # The running Bastion refuses it too, whether asked on the socket or by SIGHUP.
        status, body = bastion.admin_post("/reload")
        assert status == 400 and body["reloaded"] is False
        assert any(p.startswith(f"{bastion.path}:1:") for p in body["problems"]), body
        os.kill(bastion.pid, signal.SIGHUP)
        assert wait_until(lambda: bastion.log().count("reload refused") >= 2, 10), \
            bastion.log()
        load.wait_for(30)
    assert not load.failures, load.summary()
    state = bastion.status()
    assert state["generation"] == 0
    assert sorted(state["apps"]) == ["keep", "one"]
    assert bastion.app_pids("one") == one_before
    assert bastion.get("/info").status == 200


@pytest.mark.parametrize("running", [1], indirect=True, ids=["w1"])
def test_reload_with_unbindable_listener_is_refused(running: BastionProcess) -> None:
    bastion = running
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = first_config(1)
        config["listen"] = [bastion.config["listen"][0], {"address": f"127.0.0.1:{busy}"}]
        config["apps"]["two"] = {"command": ECHO, "path": "/two"}
        write_config(bastion, config)
        done = bastion_cli("reload", "-c", str(bastion.path))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "refused" in done.stderr
    state = bastion.status()
    assert state["generation"] == 0 and "two" not in state["apps"]
    assert bastion.get("/info").status == 200
    assert bastion.get("/two/info").json()["app"] == "one"  # the old routes


@pytest.mark.parametrize("running", [1, 2], indirect=True, ids=["w1", "w2"])
def test_request_head_arriving_during_reload_is_served(running: BastionProcess) -> None:
    bastion = running
    # A real change (not only certificates), so a new generation of workers takes over.
    changed = dict(bastion.config, limits={"keepalive_timeout": "76s"})
    bastion.path.write_text(yaml.safe_dump(changed))
    with socket.create_connection(("127.0.0.1", bastion.port()), timeout=10) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: example.com\r\n")
        time.sleep(0.3)  # accepted, head half received
        os.kill(bastion.pid, signal.SIGHUP)
        assert wait_until(lambda: bastion.status()["generation"] == 1, 15), bastion.log()
        sock.sendall(b"Connection: close\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize("running", [1, 2], indirect=True, ids=["w1", "w2"])
def test_connection_accepted_before_a_reload_is_served_after_it(
        running: BastionProcess) -> None:
    """A client that connected to the old generation but sends its first request only
    once the new one took over is still answered (the old worker waits for a fresh
    connection's first request before it closes it), with ``Connection: close``."""
    bastion = running
    changed = dict(bastion.config, limits={"keepalive_timeout": "77s"})
    bastion.path.write_text(yaml.safe_dump(changed))
    with socket.create_connection(("127.0.0.1", bastion.port()), timeout=10) as sock:
        time.sleep(0.2)  # accepted by the old generation, nothing sent yet
        os.kill(bastion.pid, signal.SIGHUP)
        assert wait_until(lambda: bastion.status()["generation"] == 1, 15), bastion.log()
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: example.com\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"connection: close" in answer.split(b"\r\n\r\n")[0].lower()
