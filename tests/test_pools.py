"""End to end: pools in depth (isolation, several processes per app, the request queue,
``start_mode: always``, idle stop).

Real Bastion processes (``tests/harness.py``), real uvicorn apps on loopback, real
``kill -9``. Every wait is bounded and every limit is small (idle 1 s, slow route 1 s),
so the file runs in well under a minute. ``-s`` prints the measured figures.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness import BastionProcess, app_command, pid_alive, simple_config, wait_until


class Bastions:
    """Starts Bastions for one test and always stops them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[BastionProcess] = []

    def start(self, apps: dict[str, dict[str, Any]], **top: Any) -> BastionProcess:
        directory = self.tmp / f"bastion{len(self.started)}"
        directory.mkdir()
        b = BastionProcess(directory, simple_config(apps, **top))
        self.started.append(b)
        b.start()
        admin = Path(b.config["admin_socket"])
        assert wait_until(admin.exists, timeout=10), f"no admin socket:\n{b.log()}"
        return b

    def cleanup(self) -> None:
        for b in self.started:
            b.stop()


@pytest.fixture
def bastions(tmp_path: Path) -> Iterator[Bastions]:
    helper = Bastions(tmp_path)
    try:
        yield helper
    finally:
        helper.cleanup()


def uvicorn_app(module: str = "echo_asgi:app", **settings: Any) -> dict[str, Any]:
    return {"command": app_command("uvicorn", module), "startup_time_limit": 10,
            "request_timeout": 10, **settings}


def app_state(b: BastionProcess, app: str) -> dict[str, Any]:
    return b.status()["apps"][app]  # type: ignore[no-any-return]


def ready_pids(b: BastionProcess, app: str) -> list[int]:
    return b.app_pids(app)


def get_pid(b: BastionProcess, path: str, timeout: float = 15.0) -> int:
    resp = b.get(path, timeout=timeout)
    assert resp.status == 200, (resp.status, resp.body[:300])
    return int(resp.json()["pid"])


# -- 1. two apps in one pool -------------------------------------------------------------
def test_two_apps_in_one_pool_are_isolated(bastions: Bastions) -> None:
    b = bastions.start(
        {"a": uvicorn_app("token_asgi:app", pool="shared", path="/a"),
         "b": uvicorn_app("token_asgi:app", pool="shared", path="/b")},
        pools={"shared": {"idle_timeout": 0}},
    )
    assert sorted(b.status()["pools"]["shared"]) == ["a", "b"]
    a1 = b.get("/a/token").json()
    b1 = b.get("/b/token").json()
    assert a1["pid"] != b1["pid"]
    assert a1["port"] != b1["port"]
    assert a1["token_sha256"] and b1["token_sha256"]
    assert a1["token_sha256"] != b1["token_sha256"]
    assert ready_pids(b, "a") == [a1["pid"]]
    assert ready_pids(b, "b") == [b1["pid"]]

    os.kill(a1["pid"], signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(a1["pid"]) and ready_pids(b, "a") != [a1["pid"]],
                      timeout=5), app_state(b, "a")
    # b never noticed.
    for _ in range(5):
        again = b.get("/b/token").json()
        assert again["pid"] == b1["pid"]
        assert again["token_sha256"] == b1["token_sha256"]
    assert app_state(b, "b")["restarts"] == 0
    # a comes back as a new process with a new token.
    a2 = b.get("/a/token").json()
    assert a2["pid"] != a1["pid"]
    assert a2["token_sha256"] != a1["token_sha256"]
    assert app_state(b, "a")["restarts"] == 1
    assert pid_alive(b1["pid"])


# -- 2. processes_per_app: 3 -------------------------------------------------------------
def test_three_processes_share_the_load_and_survive_a_kill(bastions: Bastions) -> None:
    b = bastions.start({"echo": uvicorn_app(processes_per_app=3, idle_timeout=0)})
    get_pid(b, "/info")
    assert wait_until(lambda: len(ready_pids(b, "echo")) == 3, timeout=15), app_state(b, "echo")
    pids = set(ready_pids(b, "echo"))

    def one(_: int) -> int:
        return get_pid(b, "/slow?s=0.01")

    with ThreadPoolExecutor(10) as pool:
        seen = Counter(pool.map(one, range(300)))
    print(f"\n300 requests over 3 processes: {dict(seen)}")
    assert set(seen) == pids, (seen, pids)
    assert all(n > 0 for n in seen.values())

    # kill -9 one process while ten clients keep sending.
    victim = min(pids)
    results: list[tuple[float, int | str, int | None]] = []  # (sent at, status, pid)
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                resp = b.get("/slow?s=0.01", timeout=10)
                status: int | str = resp.status
                pid = resp.json().get("pid") if resp.status == 200 else None
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                status, pid = type(exc).__name__, None
            with lock:
                results.append((sent, status, pid))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.7)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(15)
    after = [r for r in results if r[0] >= killed_at]
    failed_after = [r for r in after if r[1] != 200]
    failed_before = [r for r in results if r[0] < killed_at and r[1] != 200]
    served_after = Counter(r[2] for r in after if r[1] == 200)
    print(f"kill -9 of 1/3 under load: {len(results)} requests, failed in flight "
          f"{len(failed_before)}, failed after the kill {len(failed_after)}; "
          f"after the kill served by {dict(served_after)}")
    assert len(after) > 50
    assert len(failed_before) <= 10, failed_before
    assert not failed_after, failed_after[:10]
    assert victim not in served_after
    assert pids - {victim} <= set(served_after)  # the survivors (and a replacement) serve


@pytest.mark.parametrize("mode", ["on_demand", "always"])
def test_three_processes_come_back_to_three_after_a_kill(bastions: Bastions, mode: str) -> None:
    b = bastions.start({"echo": uvicorn_app(processes_per_app=3, idle_timeout=0,
                                            start_mode=mode)})
    get_pid(b, "/info")
    assert wait_until(lambda: len(ready_pids(b, "echo")) == 3, timeout=15), app_state(b, "echo")
    pids = set(ready_pids(b, "echo"))
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in ready_pids(b, "echo"), timeout=5)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and len(ready_pids(b, "echo")) < 3:
        get_pid(b, "/info")  # on demand: requests keep asking for the app
        time.sleep(0.2)
    now = set(ready_pids(b, "echo"))
    assert len(now) == 3, app_state(b, "echo")
    assert victim not in now and now >= pids - {victim}


# -- 3. the request queue ----------------------------------------------------------------
def test_queue_serves_in_arrival_order_and_refuses_beyond_max_queue(bastions: Bastions) -> None:
    b = bastions.start({"echo": uvicorn_app(max_concurrency=1, max_queue=2, idle_timeout=0)})
    pid = get_pid(b, "/info")  # ready before the burst: nothing waits for a start
    results: dict[int, tuple[int, dict[str, str], float, float]] = {}

    def send(i: int) -> None:
        sent = time.monotonic()
        resp = b.get(f"/slow?s=1&n={i}", timeout=15)
        results[i] = (resp.status, resp.headers, sent, time.monotonic())
        if resp.status == 200:
            assert resp.json()["pid"] == pid
            assert resp.json()["query"] == f"s=1&n={i}"

    threads = []
    for i in range(5):
        t = threading.Thread(target=send, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(0.15)  # a clear arrival order
    for t in threads:
        t.join(15)
    assert sorted(results) == list(range(5)), results
    statuses = [results[i][0] for i in range(5)]
    print(f"\nqueue: statuses {statuses}, done at "
          f"{[round(results[i][3] - results[0][2], 2) for i in range(5)]}")
    assert statuses == [200, 200, 200, 503, 503]
    for i in (3, 4):
        status, headers, sent, done = results[i]
        assert "retry-after" in headers, headers
        assert int(headers["retry-after"]) >= 1
        assert done - sent < 0.8  # refused at once, not after waiting
    done = [results[i][3] for i in range(3)]
    assert done[0] < done[1] < done[2]
    # One at a time: each queued request started only after the one before it finished.
    assert done[1] - done[0] >= 0.8 and done[2] - done[1] >= 0.8, done


# -- 4. start_mode: always ---------------------------------------------------------------
def test_start_mode_always_starts_and_restarts_without_a_request(bastions: Bastions) -> None:
    b = bastions.start({"echo": uvicorn_app(start_mode="always")})
    assert wait_until(lambda: len(ready_pids(b, "echo")) == 1, timeout=15), app_state(b, "echo")
    first = ready_pids(b, "echo")[0]
    assert pid_alive(first)
    state = app_state(b, "echo")
    assert state["state"] == "ready"
    os.kill(first, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lambda: ready_pids(b, "echo") not in ([], [first]), timeout=15), \
        app_state(b, "echo")
    print(f"\nalways: back without a request in {time.monotonic() - killed:.2f}s")
    second = ready_pids(b, "echo")[0]
    assert second != first and pid_alive(second)
    assert app_state(b, "echo")["restarts"] == 1
    assert get_pid(b, "/info") == second


# -- 5. idle stop ------------------------------------------------------------------------
def test_idle_timeout_stops_the_app_and_the_next_request_starts_it(bastions: Bastions) -> None:
    b = bastions.start({"echo": uvicorn_app(idle_timeout=1)})
    first = get_pid(b, "/info")
    served = time.monotonic()
    assert wait_until(lambda: not pid_alive(first), timeout=4), app_state(b, "echo")
    print(f"\nidle stop after {time.monotonic() - served:.2f}s (idle_timeout 1s)")
    state = app_state(b, "echo")
    assert state["state"] == "stopped", state
    assert state["processes"] == []
    assert state["restarts"] == 0  # an idle stop is not a crash
    second = get_pid(b, "/info")
    assert second != first
    assert ready_pids(b, "echo") == [second]


def test_idle_timeout_does_not_stop_an_app_that_keeps_getting_requests(
        bastions: Bastions) -> None:
    b = bastions.start({"echo": uvicorn_app(idle_timeout=1)})
    first = get_pid(b, "/info")
    for _ in range(8):  # 3.2 s of requests every 0.4 s: never 1 s without one
        time.sleep(0.4)
        assert get_pid(b, "/info") == first, b.log()
    assert app_state(b, "echo")["state"] == "ready"


def test_idle_clock_starts_when_the_last_request_ends(bastions: Bastions) -> None:
    b = bastions.start({"echo": uvicorn_app(idle_timeout=1)})
    first = get_pid(b, "/info")
    resp = b.get("/slow?s=2", timeout=10)  # in flight for longer than idle_timeout
    ended = time.monotonic()
    assert resp.status == 200 and resp.json()["pid"] == first
    # Not idle under the request; and 0.8 s after its end it has not been idle for 1 s.
    time.sleep(max(0.0, ended + 0.8 - time.monotonic()))
    assert pid_alive(first), b.log()
    assert ready_pids(b, "echo") == [first]
