"""End to end: overlapped recycle under load, for every trigger.

A real Bastion runs echo_asgi under uvicorn; one client thread paces ~200 requests/s on
loopback (a new connection per request) while a recycle happens, triggered by
``max_age``, ``max_requests``, ``max_memory``, the admin socket or ``bastion recycle``.
Every one must be answered 200 (failed = any other status or an exception), and the
responses must come from more than one pid. ``-s`` prints the failed count and the gap
(longest time between two successful responses) for each trigger.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import PY, REPO, BastionProcess, app_command, pid_alive, simple_config, wait_until

RATE = 200.0  # requests per second


@pytest.fixture
def bastion_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[BastionProcess] = []

    def start(apps: dict[str, dict[str, Any]], **top: Any) -> BastionProcess:
        directory = tmp_path / f"bastion{len(started)}"
        directory.mkdir()
        b = BastionProcess(directory, simple_config(apps, **top))
        started.append(b)
        b.start()
        assert wait_until(Path(b.config["admin_socket"]).exists, timeout=10), b.log()
        return b

    try:
        yield start
    finally:
        for b in started:
            b.stop()


@dataclass
class Load:
    """One client thread sending GET /info at ``RATE`` per second until stopped."""

    b: BastionProcess
    ok: list[tuple[float, int]] = field(default_factory=list)  # (answered at, pid)
    failed: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        interval = 1.0 / RATE
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                resp = self.b.get("/info", timeout=10)
                if resp.status == 200:
                    self.ok.append((time.monotonic(), int(resp.json()["pid"])))
                else:
                    self.failed.append((time.monotonic(), f"{resp.status} {resp.body[:200]!r}"))
            except Exception as exc:  # noqa: BLE001 - a failure to count
                self.failed.append((time.monotonic(), repr(exc)))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def start(self) -> Load:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive()

    @property
    def pids(self) -> list[int]:
        """Distinct pids in the order they first answered."""
        seen: list[int] = []
        for _, pid in self.ok:
            if pid not in seen:
                seen.append(pid)
        return seen

    @property
    def gap(self) -> float:
        times = [t for t, _ in self.ok]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def echo(**settings: Any) -> dict[str, Any]:
    return {"command": app_command("uvicorn", "echo_asgi:app"), "startup_time_limit": 10,
            "request_timeout": 10, "idle_timeout": 0, **settings}


def run_recycle(b: BastionProcess, trigger: Any, seconds: float) -> Load:
    first = b.get("/info")  # started (on demand) just before the load begins
    assert first.status == 200, first.body
    load = Load(b).start()
    try:
        trigger(b)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        load.stop()
    return load


def report(name: str, b: BastionProcess, load: Load) -> dict[str, Any]:
    state = b.status()["apps"]["echo"]
    total = len(load.ok) + len(load.failed)
    print(f"\nrecycle by {name}: {total} requests "
          f"({total / max(1e-9, load.ok[-1][0] - load.ok[0][0]):.0f}/s), "
          f"failed {len(load.failed)}, gap {load.gap * 1000:.0f} ms, "
          f"pids {len(load.pids)}, recycles {state['recycles']}")
    assert total > 300, total
    assert not load.failed, load.failed[:5]
    assert len(load.pids) >= 2, load.pids
    assert state["recycles"] >= 1, state
    assert state["restarts"] == 0, state  # a recycle is not a crash
    # Every old process is gone once it drained (bounded wait).
    assert wait_until(lambda: not any(pid_alive(p) for p in load.pids[:-1]), timeout=5), \
        b.status()
    return state


def no_trigger(b: BastionProcess) -> None:
    pass


def admin_trigger(b: BastionProcess) -> None:
    time.sleep(1.0)
    status, body = b.admin_post("/apps/echo/recycle")
    assert status == 200, body


def cli_trigger(b: BastionProcess) -> None:
    time.sleep(1.0)
    done = subprocess.run([PY, "-m", "bastion", "recycle", "echo", "-c", str(b.path)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "recycling echo" in done.stdout


CASES = {
    "max_age": ({"recycle": {"max_age": 2}}, no_trigger, 3.5),
    "max_requests": ({"recycle": {"max_requests": 100}}, no_trigger, 2.5),
    "max_memory": ({"recycle": {"max_memory": "10m"}}, no_trigger, 3.0),
    "admin": ({}, admin_trigger, 2.5),
    "cli": ({}, cli_trigger, 2.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_recycle_under_load_fails_no_request(bastion_factory: Any, name: str) -> None:
    settings, trigger, seconds = CASES[name]
    b = bastion_factory({"echo": echo(**settings)})
    load = run_recycle(b, trigger, seconds)
    state = report(name, b, load)
    served = {pid: sum(1 for _, p in load.ok if p == pid) for pid in load.pids}
    first_at = {pid: min(t for t, p in load.ok if p == pid) for pid in load.pids}
    last_at = {pid: max(t for t, p in load.ok if p == pid) for pid in load.pids}
    if name == "max_requests":
        # Recycled for reaching 100, and not much later (a replacement starts meanwhile).
        for pid in load.pids[1:-1]:
            assert 100 <= served[pid] <= 100 + RATE * 1.5, served
    if name == "max_age":
        old, new = load.pids[0], load.pids[1]
        assert last_at[old] - load.started >= 1.8, (last_at, load.started)
        assert first_at[new] - load.started <= 4.5, (first_at, load.started)
    if name in ("admin", "cli"):
        assert state["recycles"] == 1
        assert len(load.pids) == 2


def test_recycle_of_a_stopped_app_is_refused(bastion_factory: Any) -> None:
    b = bastion_factory({"echo": echo()})
    status, body = b.admin_post("/apps/echo/recycle")
    assert status == 409, body
    status, body = b.admin_post("/apps/nope/recycle")
    assert status == 404, body
    done = subprocess.run([PY, "-m", "bastion", "recycle", "echo", "-c", str(b.path)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "no running process" in done.stderr, done


def test_recycle_keeps_processes_per_app_and_drains_a_long_request(bastion_factory: Any) -> None:
    b = bastion_factory({"echo": echo(processes_per_app=2)})
    assert b.get("/info").status == 200
    assert wait_until(lambda: len(b.app_pids("echo")) == 2, timeout=15), b.status()
    old = set(b.app_pids("echo"))
    # A request in flight on an old process when the recycle starts finishes with 200.
    result: dict[str, Any] = {}

    def slow() -> None:
        resp = b.get("/slow?s=2", timeout=15)
        result["status"], result["pid"] = resp.status, resp.json().get("pid")

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    time.sleep(0.4)
    status, body = b.admin_post("/apps/echo/recycle")
    assert status == 200, body
    saw_draining = wait_until(lambda: any(
        p["state"] == "draining" for p in b.status()["apps"]["echo"]["processes"]), timeout=8)
    t.join(15)
    assert result.get("status") == 200 and result["pid"] in old, result
    assert saw_draining, b.status()
    assert wait_until(lambda: len(b.app_pids("echo")) == 2
                      and not set(b.app_pids("echo")) & old, timeout=15), b.status()
    assert wait_until(lambda: not any(pid_alive(p) for p in old), timeout=5)
    assert b.status()["apps"]["echo"]["recycles"] == 1
