"""End to end: an app's lifecycle around its processes (app_offline.htm, logs, run-as
user, leftovers, and what the admin status says through all of it).

Real Bastion processes (``tests/harness.py``) with real apps on loopback: ``plain_app.py``
(standard library; slow start, 10 MB of output, prints on request), ``setsid_grandchild.py``
(leaves a daemon outside its process group), ``misbehave.py exit-at-once``. Every wait is
bounded; the fixture stops Bastion and kills any leftover a test recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import (
    APPS,
    PY,
    BastionProcess,
    Response,
    app_command,
    pid_alive,
    readable_apps_copy,
    runs_as,
    simple_config,
    wait_until,
)


class Bastions:
    """Starts Bastions for one test; stops them and kills recorded leftovers afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[BastionProcess] = []
        self.leftovers: list[int] = []
        self.cleanups: list[Callable[[], object]] = []

    def start(self, apps: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
              **top: Any) -> BastionProcess:
        directory = self.tmp / f"bastion{len(self.started)}"
        directory.mkdir()
        b = BastionProcess(directory, simple_config(apps, **top), env=env)
        self.started.append(b)
        b.start()
        assert wait_until(Path(b.config["admin_socket"]).exists, timeout=10), b.log()
        return b

    def cleanup(self) -> None:
        for b in self.started:
            b.stop()
        for pid in self.leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for cleanup in self.cleanups:
            cleanup()


@pytest.fixture
def bastions(tmp_path: Path) -> Iterator[Bastions]:
    helper = Bastions(tmp_path)
    try:
        yield helper
    finally:
        helper.cleanup()


class Background:
    """One request in a thread."""

    def __init__(self, b: BastionProcess, path: str, timeout: float = 20.0) -> None:
        self.response: Response | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(b, path, timeout), daemon=True)
        self._thread.start()

    def _run(self, b: BastionProcess, path: str, timeout: float) -> None:
        try:
            self.response = b.get(path, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self, timeout: float = 20.0) -> Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background request still running"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def plain(*args: str, python: str = PY, apps: Path = APPS, **settings: Any) -> dict[str, Any]:
    """An app running tests/apps/plain_app.py (or its copy in ``apps``)."""
    return {"command": [python, str(apps / "plain_app.py"), "{port}", *args],
            "startup_time_limit": 10, "request_timeout": 10, "idle_timeout": 0, **settings}


def app_state(b: BastionProcess, app: str) -> dict[str, Any]:
    return b.status()["apps"][app]  # type: ignore[no-any-return]


def get_pid(b: BastionProcess, path: str = "/") -> int:
    resp = b.get(path, timeout=20)
    assert resp.status == 200, (resp.status, resp.body[:500])
    return int(resp.json()["pid"])


# -- 7. app_offline.htm ------------------------------------------------------------------
OFFLINE_PAGE = "<!doctype html>\n<html><body><h1>Back soon</h1><p>maintenance 7</p></body></html>\n"


def test_app_offline_htm_takes_the_app_down_and_back(bastions: Bastions, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    b = bastions.start({"web": plain(cwd=str(site))})
    first = get_pid(b)
    assert b.get("/").json()["cwd"] == str(site)

    (site / "app_offline.htm").write_text(OFFLINE_PAGE)
    written = time.monotonic()
    assert wait_until(lambda: b.get("/").status == 503, timeout=1.5, interval=0.05), \
        app_state(b, "web")
    print(f"\napp_offline.htm: 503 after {time.monotonic() - written:.2f}s")
    resp = b.get("/")
    assert resp.status == 503
    assert resp.body.decode() == OFFLINE_PAGE
    assert resp.headers["content-type"].startswith("text/html")
    assert wait_until(lambda: not pid_alive(first), timeout=1.5 - (time.monotonic() - written)
                      + 0.5)
    state = app_state(b, "web")
    assert state["state"] == "offline", state
    assert state["processes"] == []
    # Requests while offline do not start it.
    for _ in range(3):
        assert b.get("/").status == 503
    assert app_state(b, "web")["processes"] == []

    (site / "app_offline.htm").unlink()
    assert wait_until(lambda: b.get("/").status == 200, timeout=3), app_state(b, "web")
    second = get_pid(b)
    assert second != first
    assert app_state(b, "web")["state"] == "ready"


def test_app_offline_htm_while_the_app_starts_ends_offline(
        bastions: Bastions, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    b = bastions.start({"web": plain("--start-delay", "2", cwd=str(site))})
    waiting = Background(b, "/")
    assert wait_until(lambda: any(p["state"] == "starting"
                                  for p in app_state(b, "web")["processes"]), timeout=5)
    starting = [p["pid"] for p in app_state(b, "web")["processes"]]
    (site / "app_offline.htm").write_text(OFFLINE_PAGE)
    resp = waiting.result()
    assert resp.status == 503, (resp.status, resp.body[:300])
    assert resp.body.decode() == OFFLINE_PAGE
    # Once its start completes it is stopped too: offline, nothing left.
    assert wait_until(lambda: not any(pid_alive(p) for p in starting), timeout=6), \
        app_state(b, "web")
    assert wait_until(lambda: app_state(b, "web")["processes"] == [], timeout=2)
    assert app_state(b, "web")["state"] == "offline"
    time.sleep(0.6)  # a tick later it is still offline, nothing started
    assert app_state(b, "web")["state"] == "offline"
    assert b.get("/").status == 503

    (site / "app_offline.htm").unlink()
    assert wait_until(lambda: b.get("/", timeout=10).status == 200, timeout=8)
    assert get_pid(b) not in starting


# -- 8. logs -----------------------------------------------------------------------------
STARTED = re.compile(r"=== bastion \S+ app (\S+): started pid (\d+) port (\d+) ===")


def test_stdout_log_headers_flood_and_reopen_on_sigusr1(
        bastions: Bastions, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    web_log = logs / "web.log"
    flood_log = logs / "flood.log"
    b = bastions.start({
        "web": plain("--banner", "hello-from-web", stdout_log=str(web_log)),
        "flood": plain("--flood", str(10 * 1024 * 1024), path="/flood",
                       stdout_log=str(flood_log)),
    })
    pid = get_pid(b, "/print?msg=first-request-line")
    port = app_state(b, "web")["processes"][0]["port"]
    assert wait_until(lambda: "first-request-line" in web_log.read_text(), timeout=3)
    text = web_log.read_text()
    assert "hello-from-web" in text
    assert ("web", str(pid), str(port)) in STARTED.findall(text), text

    # 10 MB of output before listening: it still starts and serves, the log has it all.
    started = time.monotonic()
    flood_pid = get_pid(b, "/flood/")
    print(f"\n10 MB flood at start: served after {time.monotonic() - started:.2f}s")
    assert wait_until(lambda: "flood done" in flood_log.read_text(errors="replace"), timeout=10)
    assert flood_log.stat().st_size >= 10 * 1024 * 1024
    assert get_pid(b, "/flood/") == flood_pid

    # Crash: an exit header line names the pid and how it ended.
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: f"pid {pid} killed by signal SIGKILL" in web_log.read_text(),
                      timeout=5), web_log.read_text()[-2000:]
    second = get_pid(b, "/print?msg=second-process-line")

    # logrotate: rename, SIGUSR1, the new file gets new output and the old one does not.
    rotated = logs / "web.log.1"
    web_log.rename(rotated)
    os.kill(b.pid, signal.SIGUSR1)
    assert wait_until(web_log.exists, timeout=3), b.log()
    assert get_pid(b, "/print?msg=after-rotate-line") == second
    assert wait_until(lambda: "after-rotate-line" in web_log.read_text(), timeout=3)
    assert "after-rotate-line" not in rotated.read_text()
    assert "second-process-line" in rotated.read_text()

    b.stop()
    assert f"pid {second} stopped" in web_log.read_text(), web_log.read_text()


# -- 9. run as another user --------------------------------------------------------------
def python_for(uid: int, gid: int) -> str | None:
    """An interpreter that user ``uid`` may run (the venv's may live under /root)."""
    for candidate in (PY, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([candidate, "-c", "import http.server"], user=uid, group=gid,
                                  extra_groups=[], cwd="/", capture_output=True, timeout=20)
            if done.returncode == 0:
                return candidate
    return None


@pytest.mark.parametrize("loop", [
    "default",
    "asyncio",  # uvloop hidden from Bastion: the feature itself
])
def test_pool_user_runs_the_app_as_that_user(bastions: Bastions, tmp_path: Path,
                                             loop: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: only a root Bastion can start apps as another user")
    try:
        import pwd

        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this system")
    python = python_for(nobody.pw_uid, nobody.pw_gid)
    if python is None:
        pytest.skip("no Python interpreter here that the user 'nobody' may run")
    apps = readable_apps_copy()  # the clone itself may be where nobody cannot enter
    bastions.cleanups.append(lambda: shutil.rmtree(apps, ignore_errors=True))
    why = runs_as(python, nobody.pw_uid, nobody.pw_gid, apps / "plain_app.py")
    if why is not None:
        pytest.skip(f"the user 'nobody' cannot run the test app here: {why}")
    env = None
    if loop == "asyncio":
        shim = tmp_path / "no-uvloop"
        shim.mkdir()
        (shim / "uvloop.py").write_text("raise ImportError('hidden by the test')\n")
        env = {"PYTHONPATH": str(shim)}
    log = tmp_path / "logs" / "restricted.log"
    b = bastions.start(
        {"web": plain("--banner", "hello-as-nobody", python=python, pool="restricted",
                      cwd="/", stdout_log=str(log), startup_time_limit=3, apps=apps)},
        pools={"restricted": {"user": "nobody"}}, env=env,
    )
    resp = b.get("/")
    assert resp.status == 200, (resp.status, resp.body[:500], b.log())
    info = resp.json()
    assert info["uid"] == nobody.pw_uid and info["euid"] == nobody.pw_uid
    proc = psutil.Process(info["pid"])
    assert proc.uids() == (nobody.pw_uid,) * 3
    assert proc.gids() == (nobody.pw_gid,) * 3
    assert b.status()["apps"]["web"]["processes"][0]["pid"] == info["pid"]
    # Bastion itself still runs as root, and it writes the app's log.
    assert psutil.Process(b.pid).uids().effective == 0
    assert wait_until(lambda: log.exists() and "hello-as-nobody" in log.read_text(), timeout=3)
    assert f"started pid {info['pid']}" in log.read_text()


# -- 10. no orphans ----------------------------------------------------------------------
def start_grandchild_app(bastions: Bastions, tmp_path: Path, name: str) -> tuple[
        BastionProcess, int, int]:
    pidfile = tmp_path / f"{name}.pid"
    b = bastions.start({"gc": {
        "command": [PY, str(APPS / "setsid_grandchild.py"), "{port}"],
        "environment": {"PIDFILE": str(pidfile)}, "startup_time_limit": 10,
        "idle_timeout": 0, "shutdown_time_limit": 2}})
    app_pid = get_pid(b)
    assert wait_until(pidfile.exists, timeout=5)
    grandchild = int(pidfile.read_text())
    bastions.leftovers.append(grandchild)
    assert pid_alive(grandchild)
    # It really left: another session and process group than the app's.
    assert os.getsid(grandchild) != os.getsid(app_pid)
    assert os.getpgid(grandchild) != os.getpgid(app_pid)
    assert grandchild not in [c.pid for c in psutil.Process(app_pid).children(recursive=True)]
    return b, app_pid, grandchild


def test_setsid_grandchild_dies_when_bastion_stops(bastions: Bastions, tmp_path: Path) -> None:
    b, app_pid, grandchild = start_grandchild_app(bastions, tmp_path, "stop")
    assert b.stop() == 0
    assert wait_until(lambda: not pid_alive(grandchild), timeout=5), \
        f"grandchild {grandchild} survived bastion's stop"
    assert not pid_alive(app_pid)


def test_setsid_grandchild_dies_when_its_app_crashes(bastions: Bastions, tmp_path: Path) -> None:
    b, app_pid, grandchild = start_grandchild_app(bastions, tmp_path, "crash")
    os.kill(app_pid, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lambda: not pid_alive(grandchild), timeout=5), \
        f"grandchild {grandchild} survived the crash of {app_pid}"
    print(f"\nsetsid grandchild killed {time.monotonic() - killed:.2f}s after the crash")
    assert get_pid(b) != app_pid  # and the app itself comes back


def test_setsid_grandchild_dies_when_bastion_is_killed(
        bastions: Bastions, tmp_path: Path) -> None:
    b, app_pid, grandchild = start_grandchild_app(bastions, tmp_path, "kill")
    time.sleep(1.2)  # a couple of ticks: whatever tracking there is has seen it
    os.kill(b.pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(app_pid), timeout=5)
    assert wait_until(lambda: not pid_alive(grandchild), timeout=5), \
        f"grandchild {grandchild} survived SIGKILL of bastion"


# -- 11. the state query -----------------------------------------------------------------
PROCESS_FIELDS = {"pid": int, "port": int, "uptime": (int, float), "requests": int,
                  "in_flight": int, "rss": int, "cpu_percent": (int, float), "state": str}


def check_process_fields(proc: dict[str, Any]) -> None:
    for key, kind in PROCESS_FIELDS.items():
        assert key in proc, (key, proc)
        assert isinstance(proc[key], kind), (key, proc)
    assert proc["pid"] > 0 and 0 < proc["port"] < 65536
    assert proc["uptime"] >= 0 and proc["requests"] >= 0 and proc["in_flight"] >= 0
    assert proc["cpu_percent"] >= 0


def test_status_through_start_crash_backoff_and_recycle(bastions: Bastions) -> None:
    b = bastions.start({
        "web": plain("--start-delay", "1.5"),
        "dead": {"command": app_command("python", "misbehave.py", "exit-at-once"),
                 "path": "/dead", "rapid_fails_per_minute": 1, "startup_time_limit": 5},
    })
    st = app_state(b, "web")
    assert st["state"] == "stopped" and st["processes"] == [] and st["restarts"] == 0
    assert b.status()["pools"] == {"default": ["web", "dead"]} or \
        sorted(b.status()["pools"]["default"]) == ["dead", "web"]

    # start: starting (with a starting process), then ready.
    first_request = Background(b, "/")
    assert wait_until(lambda: app_state(b, "web")["state"] == "starting", timeout=3)
    st = app_state(b, "web")
    assert [p["state"] for p in st["processes"]] == ["starting"], st
    check_process_fields(st["processes"][0])
    assert first_request.result().status == 200
    st = app_state(b, "web")
    assert st["state"] == "ready"
    assert [p["state"] for p in st["processes"]] == ["ready"], st
    proc = st["processes"][0]
    check_process_fields(proc)
    first = proc["pid"]
    assert proc["rss"] > 1024 * 1024 and proc["uptime"] >= 1.5
    assert wait_until(lambda: app_state(b, "web")["processes"][0]["requests"] == 1, timeout=2)

    # in flight, and the request counter.
    slow = Background(b, "/slow?s=1.5")
    assert wait_until(lambda: app_state(b, "web")["processes"][0]["in_flight"] == 1, timeout=1.2)
    assert slow.result().status == 200
    assert wait_until(lambda: app_state(b, "web")["processes"][0]["in_flight"] == 0
                      and app_state(b, "web")["processes"][0]["requests"] == 2, timeout=2)

    # crash: failed (on demand: it waits for the next request), counted, last exit named.
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: app_state(b, "web")["state"] in ("failed", "starting"),
                      timeout=3), app_state(b, "web")
    st = app_state(b, "web")
    assert st["restarts"] == 1 and "SIGKILL" in st["last_exit"], st
    assert first not in [p["pid"] for p in st["processes"]]

    # backoff: an app that exits at once, one failure allowed per minute.
    resp = b.get("/dead")
    assert resp.status == 502, resp.status
    st = app_state(b, "dead")
    assert st["state"] == "backoff", st
    assert st["restarts"] == 1 and "status 3" in st["last_exit"], st
    assert st["retry_at"] is not None and 50 < st["retry_at"] - time.time() <= 60, st
    resp = b.get("/dead")
    assert resp.status == 503 and 50 <= int(resp.headers["retry-after"]) <= 60, resp.headers
    assert app_state(b, "dead")["restarts"] == 1  # resting: not started again
    assert app_state(b, "dead")["processes"] == []

    # recycle: counted; the replacement starts beside the old one, which then drains.
    second = get_pid(b)
    status, body = b.admin_post("/apps/web/recycle")
    assert status == 200, body
    seen: set[tuple[int, str]] = set()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        st = app_state(b, "web")
        for p in st["processes"]:
            check_process_fields(p)
            seen.add((p["pid"], p["state"]))
        if st["processes"] and all(p["pid"] != second for p in st["processes"]):
            break
        time.sleep(0.05)
    assert st["recycles"] == 1 and st["state"] == "ready", st
    assert (second, "ready") in seen
    new = [pid for pid, state in seen if pid != second and state == "starting"]
    assert new, seen  # overlapped: the new one was starting while the old one served
    assert [p["pid"] for p in st["processes"]] == new and st["processes"][0]["state"] == "ready"
    print(f"\nrecycle as seen by /status: {sorted(seen)}")
    assert get_pid(b) == new[0]
    assert wait_until(lambda: not pid_alive(second), timeout=3)
