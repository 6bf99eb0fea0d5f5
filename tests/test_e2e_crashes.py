"""End to end: crash injection against a real Bastion (issue "Bastion end to end").

Every test starts a real Bastion (``tests/harness.py``) with real app servers (uvicorn,
gunicorn, plain Python) on loopback and injects real faults: ``kill -9`` of an app,
SIGSTOP, apps that exit at once or never bind, SIGTERM and SIGKILL of Bastion itself.
Limits are small (start-up 1.5-2 s, request timeout 1.5-8 s) so the file runs in well
under two minutes; every wait is bounded, and the fixture stops Bastion (and resumes any
process a test stopped) in teardown.

Run with ``-s`` to see the measured restart and start-up latencies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import (
    BastionProcess,
    Response,
    app_command,
    pid_alive,
    simple_config,
    wait_until,
)


class Crashes:
    """Starts Bastions for one test and cleans up after it, whatever happened."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bastions: list[BastionProcess] = []
        self.paused: list[int] = []  # pids a test sent SIGSTOP

    def start(self, apps: dict[str, dict[str, Any]], **top: Any) -> BastionProcess:
        directory = self.tmp / f"bastion{len(self.bastions)}"
        directory.mkdir()
        bastion = BastionProcess(directory, simple_config(apps, **top))
        self.bastions.append(bastion)
        bastion.start()
        # The listeners accept a moment before the admin socket exists.
        admin = Path(bastion.config["admin_socket"])
        assert wait_until(admin.exists, timeout=10), f"no admin socket:\n{bastion.log()}"
        return bastion

    def pause(self, pid: int) -> None:
        self.paused.append(pid)
        os.kill(pid, signal.SIGSTOP)

    def cleanup(self) -> None:
        for pid in self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for bastion in self.bastions:
            bastion.stop()


@pytest.fixture
def crashes(tmp_path: Path) -> Iterator[Crashes]:
    helper = Crashes(tmp_path)
    try:
        yield helper
    finally:
        helper.cleanup()


class Background:
    """One request in a thread; ``result()`` joins it (bounded)."""

    def __init__(self, call: Callable[[], Response]) -> None:
        self._call = call
        self.response: Response | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.response = self._call()
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc
        self.finished_at = time.monotonic()

    def result(self, timeout: float = 20.0) -> Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"background request still running after {timeout}s"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def processes(b: BastionProcess, app: str) -> list[dict[str, Any]]:
    """The app's processes from the admin socket's /status."""
    return list(b.status()["apps"][app]["processes"])


def only_process(b: BastionProcess, app: str) -> dict[str, Any]:
    procs = processes(b, app)
    assert len(procs) == 1, procs
    return procs[0]


def in_flight(b: BastionProcess, app: str) -> int:
    return sum(int(p.get("in_flight", 0)) for p in processes(b, app))


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def all_dead(pids: list[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


def uvicorn_app(module: str = "echo_asgi:app", **settings: Any) -> dict[str, Any]:
    return {"command": app_command("uvicorn", module), "startup_time_limit": 5,
            "request_timeout": 2, **settings}


# -- 1. kill -9 during a request ------------------------------------------------------
def test_kill9_during_request_gives_502_then_a_new_process_with_new_pid_port_token(
        crashes: Crashes) -> None:
    b = crashes.start({"echo": uvicorn_app("token_asgi:app", request_timeout=8)})

    started = time.monotonic()
    first = b.get("/token", timeout=15)
    startup_latency = time.monotonic() - started
    assert first.status == 200, first.body
    before = only_process(b, "echo")
    old = first.json()
    assert old["pid"] == before["pid"]
    assert old["port"] == str(before["port"])
    assert old["token_sha256"] and len(old["token_sha256"]) == 64
    assert old["token_sha256"] != hashlib.sha256(b"").hexdigest()

    slow = Background(lambda: b.get("/slow?s=5", timeout=15))
    assert wait_until(lambda: in_flight(b, "echo") >= 1, timeout=5), "slow request never arrived"
    os.kill(old["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    failed = slow.result(timeout=15)
    assert failed.status == 502, failed.body
    # The app died: a 502 at once, not a 504 after request_timeout (8 s).
    assert slow.finished_at - killed_at < 3.0

    nxt = b.get("/token", timeout=15)
    restart_time = time.monotonic() - killed_at
    assert nxt.status == 200, nxt.body
    new = nxt.json()
    after = only_process(b, "echo")
    assert new["pid"] == after["pid"]
    assert new["port"] == str(after["port"])
    assert new["pid"] != old["pid"]
    assert new["port"] != old["port"]
    assert after["port"] != before["port"]
    assert new["token_sha256"] != old["token_sha256"]
    assert not pid_alive(old["pid"])
    assert b.status()["apps"]["echo"]["restarts"] == 1

    print(f"\n[latency] start-up (first request to a cold uvicorn app): "
          f"{startup_latency * 1000:.0f} ms")
    print(f"[latency] kill -9 to 502 of the request in flight: "
          f"{(slow.finished_at - killed_at) * 1000:.0f} ms")
    print(f"[latency] restart (kill -9 to next request served by the new process): "
          f"{restart_time * 1000:.0f} ms")


def test_requests_arriving_just_after_kill9_wait_for_the_restart(
        crashes: Crashes, tmp_path: Path) -> None:
    """Requests that arrive right after the only process died, before Bastion has seen it
    go, are refused by its port: they reached no app, so they wait for the restart and are
    served by the new process (as a request for an app not started yet waits), not
    answered 502. (A request the process was serving when it died is not sent again: see
    the test above.) The app closes every connection after its answer (HTTP/1.0), so no
    kept-alive connection to the old process is left to break. Bastion's main process
    (the module) is stopped for a moment so that the proxy workers surely see the dead
    port before the module has seen the exit."""
    b = crashes.start({"plain": {
        "command": app_command("python", "flaky_start.py", "{port}"),
        "environment": {"FAIL_FLAG": str(tmp_path / "never")}, "startup_time_limit": 5}},
        workers=2)
    assert b.get("/", timeout=15).status == 200
    old = only_process(b, "plain")["pid"]
    crashes.pause(b.pid)
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(old), timeout=5, interval=0.005)  # ports closed
    replies = [Background(lambda: b.get("/", timeout=15)) for _ in range(4)]
    time.sleep(0.3)
    os.kill(b.pid, signal.SIGCONT)
    for reply in replies:
        response = reply.result(timeout=20)
        assert response.status == 200, response.body
        assert response.json()["pid"] != old
    assert b.status()["apps"]["plain"]["restarts"] == 1


# -- 2. exit at once: 502, then rapid-fail 503 with Retry-After -----------------------
def _exit_at_once(crashes: Crashes, **top: Any) -> BastionProcess:
    return crashes.start({"bad": {
        "command": app_command("python", "misbehave.py", "exit-at-once"),
        "startup_time_limit": 2, "rapid_fails_per_minute": 2}}, **top)


def _assert_resting(response: Response) -> None:
    assert response.status == 503, response.body
    retry_after = response.headers.get("retry-after")
    assert retry_after is not None, response.headers
    assert retry_after.isdigit(), retry_after
    assert 0 < int(retry_after) <= 60


def test_app_exiting_at_once_gives_502_then_503_with_retry_after(crashes: Crashes) -> None:
    """The first failed start is a 502; once rapid_fails_per_minute (2) failures are in
    the window, requests get 503 with Retry-After and no further start is tried."""
    b = _exit_at_once(crashes)
    first = b.get("/", timeout=15)
    assert first.status == 502, first.body
    assert b"bad" in first.body  # the page names the app
    assert b.get("/", timeout=15).status == 502  # the second failure: its own start failed
    assert b.status()["apps"]["bad"]["restarts"] == 2
    third = b.get("/", timeout=15)
    _assert_resting(third)
    fourth = b.get("/", timeout=15)
    _assert_resting(fourth)
    assert b.status()["apps"]["bad"]["restarts"] == 2  # resting: no third start


# Fails at commit 842fa7a (a bug in Bastion). Uncommitted proxy/endpoints.py changes seen in
# the working tree while this was written make it pass: drop the marker with that fix.
def test_rapid_fail_sequence_is_502_502_503(crashes: Crashes) -> None:
    """N=2: at most 2 failures per 60 s window, so requests 1 and 2 each see their start
    fail (502) and only request 3, past the limit, is refused with 503."""
    b = _exit_at_once(crashes)
    statuses = [b.get("/", timeout=15).status for _ in range(3)]
    assert statuses == [502, 502, 503]


# -- 3. never binds: 502 after startup_time_limit, process gone -----------------------
def test_app_that_never_binds_gives_502_after_startup_time_limit_and_is_killed(
        crashes: Crashes) -> None:
    b = crashes.start({"nobind": {
        "command": app_command("python", "misbehave.py", "never-bind"),
        "startup_time_limit": 1.5, "request_timeout": 2}})

    started = time.monotonic()
    pending = Background(lambda: b.get("/", timeout=20))
    seen: set[int] = set()

    def starting_pid() -> bool:
        for proc in b.descendants():
            if "never-bind" in cmdline(proc):
                seen.add(proc.pid)
        return bool(seen)

    assert wait_until(starting_pid, timeout=5), "the never-binding app was never started"
    response = pending.result(timeout=20)
    elapsed = pending.finished_at - started
    assert response.status == 502, response.body
    assert 1.4 <= elapsed < 10, elapsed
    assert wait_until(lambda: all_dead(sorted(seen)), timeout=5), \
        f"never-binding app still alive: {sorted(seen)}"
    assert not any("never-bind" in cmdline(p) for p in b.descendants())
    assert processes(b, "nobind") == []


# -- 4. hang and SIGSTOP: 504 after request_timeout -----------------------------------
def test_hanging_and_stopped_app_give_504_after_request_timeout(crashes: Crashes) -> None:
    b = crashes.start({"echo": uvicorn_app(request_timeout=1.5)})
    assert b.get("/info", timeout=15).status == 200
    pid = only_process(b, "echo")["pid"]

    started = time.monotonic()
    hung = b.get("/hang", timeout=20)
    elapsed = time.monotonic() - started
    assert hung.status == 504, hung.body
    assert 1.4 <= elapsed < 10, elapsed

    crashes.pause(pid)
    started = time.monotonic()
    stopped = b.get("/info", timeout=20)
    elapsed = time.monotonic() - started
    assert stopped.status == 504, stopped.body
    assert 1.4 <= elapsed < 10, elapsed

    os.kill(pid, signal.SIGCONT)
    resumed = b.get("/info", timeout=15)
    assert resumed.status == 200, resumed.body


# -- 5. Bastion stopped (SIGTERM) or killed (SIGKILL): nothing of the apps survives ---
def _start_tree(crashes: Crashes, tmp: Path) -> tuple[BastionProcess, list[int], int]:
    """Bastion with gunicorn (master + 2 workers) and a forking app; all their pids."""
    pidfile = tmp / "grandchild.pids"
    b = crashes.start({
        "wsgi": {"command": app_command("gunicorn", "echo_wsgi:app"), "path": "/wsgi",
                 "startup_time_limit": 10, "request_timeout": 5},
        "forker": {"command": app_command("python", "misbehave.py", "grandchild", "{port}"),
                   "path": "/forker", "cwd": str(tmp), "environment": {"PIDFILE": str(pidfile)},
                   "startup_time_limit": 5, "request_timeout": 5},
    })
    assert b.get("/wsgi/info", timeout=20).status == 200
    assert b.get("/forker/", timeout=20).status < 500
    master = only_process(b, "wsgi")["pid"]
    assert wait_until(lambda: len(psutil.Process(master).children()) >= 2, timeout=10)
    workers = [p.pid for p in psutil.Process(master).children()]
    assert wait_until(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, 5)
    forker = [int(p) for p in pidfile.read_text().split()]
    assert forker[0] == only_process(b, "forker")["pid"]
    pids = [master, *workers, *forker]
    assert all(pid_alive(p) for p in pids), pids
    keepers = [p.pid for p in b.descendants() if "module.keeper" in cmdline(p)]
    assert len(keepers) == 1, [cmdline(p) for p in b.descendants()]
    return b, pids, keepers[0]


def test_sigterm_of_bastion_exits_0_and_leaves_no_app_process_or_grandchild(
        crashes: Crashes, tmp_path: Path) -> None:
    b, pids, keeper = _start_tree(crashes, tmp_path)
    status = b.stop(signal.SIGTERM, timeout=20)
    assert status == 0, b.log()
    assert wait_until(lambda: all_dead([*pids, keeper]), timeout=5), \
        [p for p in [*pids, keeper] if pid_alive(p)]


def test_sigkill_of_bastion_leaves_no_app_process_grandchild_or_keeper(
        crashes: Crashes, tmp_path: Path) -> None:
    b, pids, keeper = _start_tree(crashes, tmp_path)
    os.kill(b.pid, signal.SIGKILL)
    assert wait_until(lambda: all_dead(pids), timeout=5), [p for p in pids if pid_alive(p)]
    assert wait_until(lambda: not pid_alive(keeper), timeout=5), "the keeper outlived Bastion"
    assert b.stop() == -signal.SIGKILL


# -- 6. start_mode: always ------------------------------------------------------------
def test_start_mode_always_starts_without_a_request_and_restarts_after_kill9(
        crashes: Crashes) -> None:
    b = crashes.start({"echo": uvicorn_app(start_mode="always")})
    assert wait_until(lambda: len(processes(b, "echo")) == 1
                      and processes(b, "echo")[0]["state"] == "ready", timeout=10), \
        b.status()
    old = only_process(b, "echo")["pid"]
    assert pid_alive(old)

    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        procs = processes(b, "echo")
        return len(procs) == 1 and procs[0]["pid"] != old and procs[0]["state"] == "ready"

    assert wait_until(restarted, timeout=5), b.status()
    new = only_process(b, "echo")["pid"]
    assert not pid_alive(old)
    assert pid_alive(new)
    info = b.get("/info", timeout=10)
    assert info.status == 200
    assert info.json()["pid"] == new


# -- 7. a crash costs only the crashing app's requests --------------------------------
def test_crash_of_one_app_does_not_disturb_another(crashes: Crashes) -> None:
    b = crashes.start({"one": uvicorn_app(path="/one", request_timeout=8),
                       "two": uvicorn_app(path="/two", request_timeout=8)})
    one = b.get("/one/info", timeout=15).json()["pid"]
    two = b.get("/two/info", timeout=15).json()["pid"]
    assert one != two

    slow_one = Background(lambda: b.get("/one/slow?s=3", timeout=15))
    slow_two = Background(lambda: b.get("/two/slow?s=3", timeout=15))
    assert wait_until(lambda: in_flight(b, "one") >= 1 and in_flight(b, "two") >= 1, 5)
    os.kill(one, signal.SIGKILL)

    assert slow_one.result().status == 502
    during = b.get("/two/info", timeout=10)
    assert during.status == 200 and during.json()["pid"] == two
    assert slow_two.result().status == 200
    after = b.get("/two/info", timeout=10)
    assert after.status == 200 and after.json()["pid"] == two
    assert b.status()["apps"]["two"]["restarts"] == 0
    assert only_process(b, "two")["pid"] == two
    restarted = b.get("/one/info", timeout=15)
    assert restarted.status == 200 and restarted.json()["pid"] != one


# -- 8. detailed_errors ---------------------------------------------------------------
def _failed_restart_page(crashes: Crashes, tmp: Path, detailed: bool) -> Response:
    """kill -9 an app whose next start fails (exit status 3); the 502 of that start."""
    flag = tmp / "fail-next-start"
    b = crashes.start({"flaky": {
        "command": app_command("python", "flaky_start.py", "{port}"),
        "environment": {"FAIL_FLAG": str(flag)},
        "startup_time_limit": 2, "request_timeout": 2}}, detailed_errors=detailed)
    assert b.get("/", timeout=15).status == 200
    pid = only_process(b, "flaky")["pid"]
    flag.write_text("")
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), timeout=5)
    page = b.get("/", timeout=15)
    assert page.status == 502, page.body
    assert b"flaky" in page.body  # the page names the app
    return page


def test_detailed_errors_page_shows_exit_status_and_output_of_failed_restart(
        crashes: Crashes, tmp_path: Path) -> None:
    page = _failed_restart_page(crashes, tmp_path, detailed=True)
    assert b"exited with status 3" in page.body, page.body
    assert b"flaky: refusing to start" in page.body, page.body


# Fails at commit 842fa7a (a bug in Bastion). Uncommitted proxy/endpoints.py changes seen in
# the working tree while this was written make it pass: drop the marker with that fix.
def test_without_detailed_errors_page_hides_exit_status_and_output(
        crashes: Crashes, tmp_path: Path) -> None:
    page = _failed_restart_page(crashes, tmp_path, detailed=False)
    assert b"exited with status" not in page.body, page.body
    assert b"refusing to start" not in page.body, page.body


def test_detailed_errors_page_of_exit_at_once_shows_exit_status(crashes: Crashes) -> None:
    b = crashes.start({"bad": {
        "command": app_command("python", "misbehave.py", "exit-at-once"),
        "startup_time_limit": 2}}, detailed_errors=True)
    page = b.get("/", timeout=15)
    assert page.status == 502, page.body
    assert b"exited with status 3" in page.body, page.body
    assert b"misbehave: giving up at once" in page.body, page.body
