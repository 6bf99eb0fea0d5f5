"""End to end: whose listener an app is, and whether a ready process still answers.

* A foreign process that holds the port chosen for an app (bound between Bastion's port
  choice and the app's own bind) must never be taken for the app: it gets neither a
  request nor the pairing token, and the app is started again on another port.
* ``health_check``: a process that accepts but no longer answers (SIGSTOP) is replaced
  overlapped after ``failures`` failed checks; clients see 504 only for about that long.
* Three request timeouts (504) in a row on one process recycle it the same way.

Real Bastion processes (``tests/harness.py``), real apps (``tests/apps/plain_app.py``),
real signals. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import APPS, PY, BastionProcess, Response, pid_alive, simple_config, wait_until


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[BastionProcess]]:
    bastions: list[BastionProcess] = []
    try:
        yield bastions
    finally:
        for b in bastions:
            b.stop()


def start(started: list[BastionProcess], tmp: Path, apps: dict[str, dict[str, Any]],
          **top: Any) -> BastionProcess:
    directory = tmp / f"bastion{len(started)}"
    directory.mkdir()
    b = BastionProcess(directory, simple_config(apps, **top))
    started.append(b)
    b.start()
    assert wait_until(Path(b.config["admin_socket"]).exists, timeout=10), b.log()
    return b


def plain(*args: str, **settings: Any) -> dict[str, Any]:
    """An app running tests/apps/plain_app.py."""
    return {"command": [PY, str(APPS / "plain_app.py"), "{port}", *args],
            "startup_time_limit": 10, "request_timeout": 10, "idle_timeout": 0, **settings}


class Background:
    """One request in a thread."""

    def __init__(self, b: BastionProcess, path: str, timeout: float = 30.0) -> None:
        self.response: Response | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(b, path, timeout), daemon=True)
        self._thread.start()

    def _run(self, b: BastionProcess, path: str, timeout: float) -> None:
        try:
            self.response = b.get(path, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self, timeout: float = 30.0) -> Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background request still running"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


class ForeignListener:
    """A listening socket in this test process (no app's) that records what it gets and
    answers every connection with its own 200."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.received: list[bytes] = []
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                conn.settimeout(0.5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                if data:
                    self.received.append(data)
                    with contextlib.suppress(OSError):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n"
                                     b"Connection: close\r\n\r\nforeign")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


# -- a foreign listener on the app's port -------------------------------------------------
def test_a_foreign_listener_on_the_apps_port_gets_no_request_and_no_token(
        started: list[BastionProcess], tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    # The app sleeps 2 s before its bind: the test takes its port in between.
    b = start(started, tmp_path, {"web": plain("--start-delay", "2", stdout_log=str(log))})
    request = Background(b, "/")
    marker = re.compile(r"app web: started pid (\d+) port (\d+)")
    assert wait_until(lambda: log.exists() and marker.search(log.read_text()), timeout=5)
    match = marker.search(log.read_text())
    assert match is not None
    first_pid, port = int(match.group(1)), int(match.group(2))
    foreign = ForeignListener(port)
    try:
        resp = request.result()
        assert resp.status == 200, (resp.status, resp.body[:300])
        answer = resp.json()
        assert answer["app"] == "web" and answer["pid"] != first_pid, answer
        assert foreign.accepted >= 1  # Bastion's readiness probe reached it ...
        assert foreign.received == [], foreign.received  # ... but no request, no token
        st = b.status()["apps"]["web"]
        assert [p["port"] for p in st["processes"]] != [port], st
        assert st["processes"][0]["pid"] == answer["pid"]
        assert wait_until(lambda: not pid_alive(first_pid), timeout=5)
        assert "another process" in log.read_text()
    finally:
        foreign.close()


# -- health checks ------------------------------------------------------------------------
def ready_pids(b: BastionProcess, app: str = "web") -> list[int]:
    return [p["pid"] for p in b.status()["apps"][app]["processes"] if p["state"] == "ready"]


def test_a_stopped_process_is_replaced_by_the_health_check(
        started: list[BastionProcess], tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    check = {"path": "/health", "interval": "0.5s", "timeout": "0.5s", "failures": 2}
    b = start(started, tmp_path, {"web": plain(
        request_timeout=2, health_check=check, stdout_log=str(log))})
    resp = b.get("/")
    assert resp.status == 200
    old = resp.json()["pid"]
    time.sleep(1.2)  # a few healthy checks: none may replace it
    assert ready_pids(b) == [old] and b.status()["apps"]["web"]["recycles"] == 0

    os.kill(old, signal.SIGSTOP)  # accepts (the kernel does), never answers
    stopped_at = time.monotonic()
    try:
        seen: list[tuple[float, int, int | None]] = []
        while time.monotonic() - stopped_at < 20:
            resp = b.get("/", timeout=10)
            pid = resp.json()["pid"] if resp.status == 200 else None
            seen.append((round(time.monotonic() - stopped_at, 2), resp.status, pid))
            if resp.status == 200 and pid != old:
                break
        print(f"\nafter SIGSTOP (s, status, pid): {seen}")
        assert seen[-1][1] == 200 and seen[-1][2] != old, seen
        statuses = [status for _, status, _ in seen[:-1]]
        assert set(statuses) <= {504}, seen
        # 2 checks of 0.5 s, 0.5 s apart, the 0.5 s tick and a start: a few seconds,
        # i.e. at most two 2-second request timeouts in a row.
        assert len(statuses) <= 3 and seen[-1][0] < 8, seen
        st = b.status()["apps"]["web"]
        assert st["recycles"] == 1 and ready_pids(b) == [seen[-1][2]], st
        assert "health check /health failed" in log.read_text()
        # The old one drained (its requests timed out) and was stopped: SIGCONT + SIGTERM.
        assert wait_until(lambda: not pid_alive(old), timeout=10)
        assert b.get("/").json()["pid"] == seen[-1][2]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)


def test_three_request_timeouts_in_a_row_replace_the_process(
        started: list[BastionProcess], tmp_path: Path) -> None:
    b = start(started, tmp_path, {"web": plain(request_timeout=1)})
    old = b.get("/").json()["pid"]

    def slow() -> int:
        return b.get("/slow?s=3", timeout=10).status

    # Two timeouts, then an answer: the row is broken, the process kept.
    assert [slow(), slow()] == [504, 504]
    assert b.get("/").json()["pid"] == old
    time.sleep(0.5)  # the answer's usage report reaches the module
    assert slow() == 504
    time.sleep(0.5)
    assert ready_pids(b) == [old] and b.status()["apps"]["web"]["recycles"] == 0

    # Three in a row: replaced overlapped (the fourth request already goes to the new one).
    assert [slow(), slow()] == [504, 504]
    assert wait_until(lambda: ready_pids(b) not in ([], [old]), timeout=10), b.status()
    new = ready_pids(b)[0]
    assert b.status()["apps"]["web"]["recycles"] == 1
    assert b.get("/").json()["pid"] == new != old
    assert wait_until(lambda: not pid_alive(old), timeout=10)


# -- phases that used to be flags ---------------------------------------------------------
def test_admin_start_of_a_running_app_keeps_it_serving(
        started: list[BastionProcess], tmp_path: Path) -> None:
    b = start(started, tmp_path, {"web": plain()})
    pid = b.get("/").json()["pid"]
    status, _ = b.admin_post("/apps/web/start")
    assert status == 200
    began = time.monotonic()
    resp = b.get("/", timeout=20)
    assert resp.status == 200 and resp.json()["pid"] == pid
    assert time.monotonic() - began < 2  # it used to wait for a start that never came
    assert b.status()["apps"]["web"]["state"] == "ready"


def test_app_offline_htm_removed_while_stopped_by_the_administrator_stays_503(
        started: list[BastionProcess], tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    b = start(started, tmp_path, {"web": plain(cwd=str(site))})
    assert b.get("/").status == 200
    status, _ = b.admin_post("/apps/web/stop")
    assert status == 200
    offline = site / "app_offline.htm"
    offline.write_text("<h1>maintenance</h1>")
    assert wait_until(lambda: b.get("/").body == b"<h1>maintenance</h1>", timeout=5)
    offline.unlink()
    assert wait_until(lambda: b.get("/").body != b"<h1>maintenance</h1>", timeout=5)
    began = time.monotonic()
    resp = b.get("/", timeout=20)
    assert resp.status == 503, resp.status  # still stopped by the administrator
    assert time.monotonic() - began < 2
    assert b.status()["apps"]["web"]["processes"] == []
    status, _ = b.admin_post("/apps/web/start")
    assert status == 200
    assert b.get("/").status == 200
