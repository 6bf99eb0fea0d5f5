"""Proxy worker processes (``workers: N``), SIGTERM drain, and the top-level ``user`` drop.

Real Bastion processes on loopback. ``Load`` is a small client (threads, one connection
per request with ``Connection: close`` so the kernel spreads the accepts over the
workers) that counts every failure; tests/test_reload.py uses it too. Which worker served
is seen from outside: a worker that forwarded a request keeps a keep-alive connection to
the app's port, visible with psutil.
"""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import (
    BastionProcess,
    app_command,
    pid_alive,
    readable_apps_copy,
    runs_as,
    simple_config,
    wait_until,
)

ECHO = app_command("uvicorn", "echo_asgi:app")


class Load:
    """Client threads sending GETs at about ``rate`` requests/s, counting failures.

    ``targets`` is called for every request and returns ``(port, path)``, so a test can
    change what it hits while the load runs. A failure is any exception (refused, reset,
    timeout) or a status other than 200; each is kept with its time and description.
    """

    def __init__(self, targets: Callable[[], tuple[int, str]], rate: float = 150.0,
                 threads: int = 4, timeout: float = 10.0) -> None:
        self.targets = targets
        self.interval = threads / rate
        self.threads = threads
        self.timeout = timeout
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def one(self) -> None:
        port, path = self.targets()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except Exception as exc:  # noqa: BLE001 - every failure counts
            with self._lock:
                self.failures.append((time.monotonic(), f"{path}: {type(exc).__name__}: {exc}"))
            return
        finally:
            conn.close()
        with self._lock:
            self.statuses[status] += 1
            if status == 200:
                self.ok += 1
            else:
                self.failures.append((time.monotonic(), f"{path}: HTTP {status}"))

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.one()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()

    @property
    def total(self) -> int:
        with self._lock:
            return self.ok + len(self.failures)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(self.timeout + 5)

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` more requests have finished."""
        goal = self.total + count
        assert wait_until(lambda: self.total >= goal, timeout), \
            f"only {self.total} of {goal} requests done in {timeout}s"

    def summary(self) -> str:
        return (f"{self.ok} ok, {len(self.failures)} failed "
                f"(statuses {dict(self.statuses)}): {[f for _, f in self.failures[:10]]}")


def status_or_none(bastion: BastionProcess) -> dict[str, Any] | None:
    """``/status``, or None while the admin socket is not up yet (it starts after the
    listeners are bound, so a port that accepts does not mean the socket exists)."""
    try:
        return bastion.status()
    except OSError:
        return None


def ready_pids(bastion: BastionProcess, app: str) -> list[int]:
    """Pids of the ready processes of ``app`` ([] while the admin socket is not up)."""
    status = status_or_none(bastion)
    if status is None:
        return []
    return [p["pid"] for p in status["apps"][app]["processes"] if p["state"] == "ready"]


def worker_pids(bastion: BastionProcess) -> list[int]:
    """Pids of the worker processes in ``/status`` ([] while the admin socket is not up)."""
    status = status_or_none(bastion)
    return [] if status is None else [w["pid"] for w in status["workers"]]


def worker_children(bastion: BastionProcess) -> list[psutil.Process]:
    """Direct children of Bastion that run ``proxy.worker``."""
    found = []
    for proc in psutil.Process(bastion.pid).children():
        try:
            if "bastion.proxy.control.worker" in proc.cmdline():
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def forwarded_to(pid: int, app_port: int) -> bool:
    """True when process ``pid`` holds a connection to the app's loopback port."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.raddr and c.raddr.port == app_port for c in conns)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[BastionProcess]:
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}}, workers=2)
    bastion = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: ready_pids(bastion, "echo"), 20), bastion.log()
        # Workers start one after the other; the listener answers once the first is up.
        assert wait_until(lambda: len(worker_pids(bastion)) == 2, 20), bastion.log()
        yield bastion
    finally:
        bastion.stop(signal.SIGKILL if bastion.proc and bastion.proc.poll() is None else 0)


def test_two_worker_processes_both_serve(two_workers: BastionProcess) -> None:
    bastion = two_workers
    children = worker_children(bastion)
    assert len(children) == 2, [c.cmdline() for c in psutil.Process(bastion.pid).children()]
    pids = worker_pids(bastion)
    assert sorted(pids) == sorted(c.pid for c in children)
    assert bastion.pid not in pids
    app_port = bastion.status()["apps"]["echo"]["processes"][0]["port"]

    with Load(lambda: (bastion.port(), "/info"), rate=200, threads=4) as load:
        load.wait_for(200)
    assert not load.failures, load.summary()
    # Each worker that forwarded a request keeps its keep-alive connection to the app.
    assert wait_until(lambda: all(forwarded_to(pid, app_port) for pid in pids), 5), (
        {pid: forwarded_to(pid, app_port) for pid in pids})


def test_killed_worker_is_replaced_while_serving(two_workers: BastionProcess) -> None:
    bastion = two_workers
    before = worker_pids(bastion)
    victim = before[0]
    with Load(lambda: (bastion.port(), "/info"), rate=150, threads=4) as load:
        load.wait_for(60)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(lambda: len(set(worker_pids(bastion)) - set(before)) == 1, 10), (
            bastion.status()["workers"])
        replaced_in = time.monotonic() - killed_at
        load.wait_for(150)
    now = worker_pids(bastion)
    print(f"worker kill: {load.summary()}; replaced in {replaced_in:.2f}s")
    assert victim not in now and len(now) == 2 and before[1] in now
    assert not pid_alive(victim)
    assert len(worker_children(bastion)) == 2
    # Only requests in flight on the killed worker may fail (4 client threads).
    assert len(load.failures) <= 4, load.summary()
    assert load.ok >= 200
    assert bastion.get("/info").status == 200


# -- SIGTERM drains ------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_request_in_flight(tmp_path: Path, workers: int) -> None:
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}},
                           workers=workers)
    bastion = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: ready_pids(bastion, "echo"), 20), bastion.log()
        assert wait_until(lambda: len(worker_pids(bastion)) == workers, 20)
        assert len(worker_children(bastion)) == (0 if workers == 1 else 2)
        everything = [p.pid for p in bastion.descendants()]
        result: dict[str, Any] = {}

        def slow() -> None:
            started = time.monotonic()
            try:
                resp = bastion.get("/slow?s=2", timeout=15)
                result["status"] = resp.status
                result["body"] = resp.body
            except Exception as exc:  # noqa: BLE001
                result["error"] = repr(exc)
            result["took"] = time.monotonic() - started

        thread = threading.Thread(target=slow)
        thread.start()
        # The request has reached the app (in flight) before the signal.
        assert wait_until(
            lambda: any(p.get("in_flight") for p in
                        bastion.status()["apps"]["echo"]["processes"]), 5) or workers > 1
        time.sleep(0.5)
        bastion.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        try:
            code = bastion.proc.wait(20)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            tree = [(p.pid, p.cmdline()[:4]) for p in bastion.descendants()]
            pytest.fail(f"no exit 20 s after SIGTERM; alive: {tree}; request: {result}\n"
                        f"{bastion.log()}")
        thread.join(20)
        assert result.get("status") == 200, (result, bastion.log())
        assert result["took"] >= 1.9
        assert code == 0, bastion.log()
        assert wait_until(lambda: not any(pid_alive(pid) for pid in everything), 5), [
            pid for pid in everything if pid_alive(pid)]
    finally:
        bastion.stop(signal.SIGKILL)


# -- top-level user: privilege drop ---------------------------------------------------------

def _nobody_can_import() -> bool:
    """True when this interpreter's standard library is readable after dropping to nobody.

    A worker imports some modules lazily (``encodings.idna`` on its first upstream
    request), after the drop; a Python installed under a 0700 home (pyenv in /root) can
    then not serve requests. That is the machine's set-up, not Bastion's.
    """
    code = ("import os; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "import encodings.idna, http.cookies")
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          timeout=30).returncode == 0


def _wait_dropped(bastion: BastionProcess, count: int, uid: int) -> list[psutil.Process]:
    """The ``count`` worker processes, once every one of them runs as ``uid``."""
    def dropped() -> bool:
        children = worker_children(bastion)
        try:
            return len(children) == count and all(c.uids().effective == uid for c in children)
        except psutil.NoSuchProcess:
            return False

    assert wait_until(dropped, 20), ([(c.pid, c.uids()) for c in worker_children(bastion)],
                                     bastion.log())
    return worker_children(bastion)


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@ROOT_ONLY
@pytest.mark.parametrize("workers", [1, 2])
def test_top_level_user_drops_worker_privileges(tmp_path: Path, workers: int) -> None:
    nobody = pwd.getpwnam("nobody")
    config = simple_config(
        {"plain": {"command": app_command("python", "plain_app.py", "{port}"),
                   "start_mode": "always"}},
        user="nobody", workers=workers)
    bastion = BastionProcess(tmp_path, config).start()
    try:
        # user: with workers: 1 runs one worker process, not the in-process proxy.
        procs = _wait_dropped(bastion, workers, nobody.pw_uid)
        for worker in procs:
            assert worker.uids() == (nobody.pw_uid,) * 3
            assert worker.gids().effective == nobody.pw_gid
            assert worker.ppid() == bastion.pid
        assert psutil.Process(bastion.pid).uids().effective == 0  # the main process
        assert sorted(worker_pids(bastion)) == sorted(w.pid for w in procs)
        assert wait_until(lambda: ready_pids(bastion, "plain"), 20), bastion.log()
        (app_pid,) = bastion.app_pids("plain")
        assert psutil.Process(app_pid).uids().effective == 0  # a pool without user: root
        if not _nobody_can_import():
            pytest.skip(f"{sys.base_prefix} is not readable by nobody: cannot serve here")
        resp = bastion.get("/", timeout=10)
        assert resp.status == 200, resp.body
        assert resp.json()["euid"] == 0 and resp.json()["pid"] == app_pid
    finally:
        assert bastion.stop() == 0, bastion.log()


@ROOT_ONLY
def test_top_level_user_with_pool_user(tmp_path: Path) -> None:
    """Apps of a pool with its own ``user`` run as that user; the workers as the top one."""
    nobody = pwd.getpwnam("nobody")
    # A system python3: the tests' interpreter may live where nobody cannot run it.
    python3 = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    # The app's script in a copy every user may read: the clone may be where nobody
    # cannot enter (/root/..., a mktemp -d).
    apps = readable_apps_copy()
    try:
        why = runs_as(python3, nobody.pw_uid, nobody.pw_gid, apps / "plain_app.py")
        if why is not None:
            pytest.skip(f"the user 'nobody' cannot run the test app here: {why}")
        _pool_user_app(tmp_path, python3, apps, nobody.pw_uid)
    finally:
        shutil.rmtree(apps, ignore_errors=True)


def _pool_user_app(tmp_path: Path, python3: str, apps: Path, uid: int) -> None:
    config = simple_config(
        {"plain": {"command": [python3, str(apps / "plain_app.py"), "{port}"],
                   "pool": "web", "cwd": "/", "start_mode": "always"}},
        user="nobody", workers=2, pools={"web": {"user": "nobody"}})
    with BastionProcess(tmp_path, config) as bastion:
        _wait_dropped(bastion, 2, uid)
        assert wait_until(lambda: ready_pids(bastion, "plain"), 20), bastion.log()
        (app_pid,) = bastion.app_pids("plain")
        assert psutil.Process(app_pid).uids().effective == uid
        if not _nobody_can_import():
            pytest.skip(f"{sys.base_prefix} is not readable by nobody: cannot serve here")
        resp = bastion.get("/", timeout=10)
        assert resp.status == 200, resp.body
        assert resp.json()["euid"] == uid


@ROOT_ONLY
def test_top_level_user_access_log_in_root_only_directory(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir(mode=0o750)
    config = simple_config(
        {"echo": {"command": ECHO}}, user="nobody", workers=1,
        access_log=str(logs / "access.log"))
    with BastionProcess(tmp_path, config) as bastion:
        time.sleep(2)
        first = worker_pids(bastion)
        time.sleep(1)
        assert worker_pids(bastion) == first, "the worker keeps dying and being replaced"
        assert "exited with" not in bastion.log(), bastion.log()[-2000:]
        if _nobody_can_import():
            assert bastion.get("/info", timeout=5).status == 200
            assert wait_until(lambda: "/info" in (logs / "access.log").read_text(), 5)


# -- a worker dying at start-up, certificates of a generation, liveness, stop -------------

def test_worker_dying_during_start_up_is_replaced_and_ready_is_sent(tmp_path: Path) -> None:
    """A worker killed before it says READY, while Bastion still starts its workers:
    the main process goes on, says READY, and replaces it (it exited 1 after 30 s)."""
    from test_sdnotify import FakeSystemd

    systemd = FakeSystemd(tmp_path / "notify.sock")
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}}, workers=3)
    bastion = BastionProcess(tmp_path, config, env={"NOTIFY_SOCKET": str(systemd.path)})
    try:
        bastion.start()
        began = time.monotonic()
        assert wait_until(lambda: worker_children(bastion), 10, interval=0.005), bastion.log()
        victim = worker_children(bastion)[0]
        victim.kill()  # a worker process needs ~0.3 s to import: it is not ready yet
        ready = systemd.wait_for("READY", 15)
        print(f"READY {time.monotonic() - began:.2f}s after the start")
        assert ready["READY"] == "1"
        assert "before it was ready" in bastion.log(), bastion.log()
        assert wait_until(lambda: len(worker_pids(bastion)) == 3, 15), bastion.log()
        assert victim.pid not in worker_pids(bastion)
        assert len(worker_children(bastion)) == 3
        assert wait_until(lambda: ready_pids(bastion, "echo"), 20), bastion.log()
        assert bastion.get("/info").status == 200
        assert bastion.stop() == 0, bastion.log()
        assert "Traceback" not in bastion.log(), bastion.log()
    finally:
        systemd.close()
        bastion.stop(signal.SIGKILL)


def test_replacement_worker_serves_the_generations_certificates(
        tmp_path: Path, tls_ca: Any) -> None:
    """A broken pair on disk (here: a certificate that does not match the key) does not
    stop a killed worker from being replaced: the replacement starts from the bytes its
    generation read, serves them, and stays up; the broken files are refused by the
    certificate watcher's reload."""
    from conftest import tls_config

    tls = tls_config(tls_ca, tmp_path / "tls")
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}},
                           workers=2, tls=tls)
    bastion = BastionProcess(tmp_path, config, tls_ca=tls_ca).start()
    try:
        assert wait_until(lambda: len(worker_pids(bastion)) == 2, 20), bastion.log()
        assert wait_until(lambda: ready_pids(bastion, "echo"), 20), bastion.log()
        assert bastion.get("/info", listener=1).status == 200
        cert = Path(tls["certificates"][0]["cert"])
        other = tls_ca.issue_cert("other.test")  # its certificate, not matching our key
        cert.write_bytes(other.cert_chain_pems[0].bytes())
        before = worker_pids(bastion)
        os.kill(before[0], signal.SIGKILL)
        assert wait_until(lambda: len(set(worker_pids(bastion)) - set(before)) == 1, 15), \
            bastion.log()
        settled = worker_pids(bastion)
        time.sleep(4)  # a replacement reading the broken files would have died by now
        assert worker_pids(bastion) == settled, bastion.log()
        assert len(worker_children(bastion)) == 2
        for _ in range(6):  # both workers serve the generation's certificate
            assert bastion.get("/info", listener=1).status == 200
        assert "exited with" not in bastion.log().split("replacing it", 1)[1], bastion.log()
    finally:
        bastion.stop(signal.SIGKILL)


def test_worker_with_a_blocked_event_loop_is_killed_and_replaced(tmp_path: Path) -> None:
    """``worker_timeout``: a worker that sends no heartbeat (SIGSTOP: its loop cannot
    run) is SIGKILLed and replaced within about ``worker_timeout``; the server serves."""
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}},
                           workers=2, worker_timeout="2s")
    bastion = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: len(worker_pids(bastion)) == 2, 20), bastion.log()
        assert wait_until(lambda: ready_pids(bastion, "echo"), 20), bastion.log()
        before = worker_pids(bastion)
        victim = psutil.Process(before[0])
        with Load(lambda: (bastion.port(), "/info"), rate=50, threads=2, timeout=15) as load:
            load.wait_for(20)
            victim.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            assert wait_until(lambda: not pid_alive(victim.pid), 10), bastion.log()
            killed_in = time.monotonic() - stopped_at
            assert wait_until(lambda: len(set(worker_pids(bastion)) - set(before)) == 1, 10)
            replaced_in = time.monotonic() - stopped_at
            failed_before = len(load.failures)
            load.wait_for(60)
        print(f"stopped worker killed after {killed_in:.2f}s, replaced after "
              f"{replaced_in:.2f}s; {load.summary()}")
        # Silent for more than 2 s since its last heartbeat (sent up to 0.5 s before the
        # SIGSTOP), found by a check that runs every 0.5 s.
        assert 1.4 <= killed_in <= 4.0, killed_in
        assert replaced_in <= 6.0, replaced_in
        assert "sent no heartbeat" in bastion.log(), bastion.log()
        assert len(worker_children(bastion)) == 2 and before[1] in worker_pids(bastion)
        # Only connections the stopped worker had accepted may fail; none after.
        assert len(load.failures) == failed_before <= 4, load.summary()
        assert bastion.get("/info").status == 200
    finally:
        bastion.stop(signal.SIGKILL)


@pytest.mark.parametrize("workers", [1, 2])
def test_new_connections_are_refused_at_once_during_a_stop(tmp_path: Path,
                                                          workers: int) -> None:
    """Once a graceful stop begins, no copy of the listening sockets stays open, so a
    new connection is refused at once instead of waiting in a backlog nobody accepts
    from until the drain ends; the request in flight still finishes."""
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}},
                           workers=workers)
    bastion = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: ready_pids(bastion, "echo"), 20), bastion.log()
        assert wait_until(lambda: len(worker_pids(bastion)) == workers, 20)
        result: dict[str, Any] = {}

        def slow() -> None:
            try:
                result["status"] = bastion.get("/slow?s=4", timeout=20).status
            except Exception as exc:  # noqa: BLE001
                result["error"] = repr(exc)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(1.0)  # the request is in flight
        bastion.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.5)  # the workers have begun their stop
        began = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            bastion.get("/info", timeout=5)
        print(f"refused after {time.monotonic() - began:.3f}s")
        thread.join(20)
        assert result.get("status") == 200, (result, bastion.log())
        assert bastion.proc.wait(20) == 0, bastion.log()  # type: ignore[union-attr]
    finally:
        bastion.stop(signal.SIGKILL)
