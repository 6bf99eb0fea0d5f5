"""End to end: ``max_concurrency`` / ``max_queue`` hold for the whole Bastion, across
worker processes (``workers: 2``), and a request that waited too long in the queue is a
503 with ``Retry-After`` (it never reached the app).

Real Bastion, real worker processes, two real uvicorn processes of
``tests/apps/concurrency_app.py``, which writes the most requests it ever served at once
(and when each request reached it) to a file per process. Clients open one connection
per request (``Connection: close``) so the kernel spreads them over both workers; each
test checks that both workers did forward requests, else it could not tell shared
limits from per-worker ones. ``-s`` prints the measured figures.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import BastionProcess, app_command, simple_config, wait_until

STARTUP = 3  # startup_time_limit: a queued request gives up after STARTUP + 5 s


class Fixture:
    """One Bastion: workers: 2, processes_per_app: 2, max_concurrency: 1, max_queue: 3."""

    def __init__(self, bastion: BastionProcess, records: Path) -> None:
        self.bastion = bastion
        self.records = records

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.bastion.status()["workers"]]

    def app_pids(self) -> list[int]:
        return self.bastion.app_pids("c")

    def seen(self) -> dict[int, dict[str, Any]]:
        """What each app process wrote: pid -> {max_in_flight, served, starts}."""
        found = {}
        for path in self.records.glob("*.json"):
            data = json.loads(path.read_text())
            found[int(data["pid"])] = data
        return found

    def workers_that_forwarded(self) -> set[int]:
        """Worker processes holding a (kept-alive) connection to an app process."""
        ports = {p["port"] for p in self.bastion.status()["apps"]["c"]["processes"]}
        found = set()
        for pid in self.worker_pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            if any(c.raddr and c.raddr.port in ports for c in conns):
                found.add(pid)
        return found


def one(port: int, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], float]:
    """GET ``path`` on a fresh connection: (status, headers, seconds taken)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, \
            time.monotonic() - started
    finally:
        conn.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    tmp = tmp_path_factory.mktemp("shared")
    records = tmp / "records"
    records.mkdir()
    app = {"command": app_command("uvicorn", "concurrency_app:app"),
           "start_mode": "always", "processes_per_app": 2, "max_concurrency": 1,
           "max_queue": 3, "startup_time_limit": STARTUP, "request_timeout": 30,
           "environment": {"CONCURRENCY_DIR": str(records)}}
    bastion = BastionProcess(tmp, simple_config({"c": app}, workers=2)).start()
    fixture = Fixture(bastion, records)
    try:
        admin = Path(bastion.config["admin_socket"])
        assert wait_until(admin.exists, 20), bastion.log()
        assert wait_until(lambda: len(fixture.app_pids()) == 2, 30), bastion.log()
        assert wait_until(lambda: len(fixture.worker_pids()) == 2, 30), bastion.log()
        yield fixture
    finally:
        bastion.stop(signal.SIGKILL if bastion.proc and bastion.proc.poll() is None else 0)


def burst(port: int, paths: list[str], stagger: float = 0.0
          ) -> list[tuple[int, dict[str, str], float]]:
    """Send every path at once from its own thread (or ``stagger`` s apart)."""
    results: list[Any] = [None] * len(paths)
    gate = threading.Barrier(len(paths))

    def send(i: int) -> None:
        if stagger:
            time.sleep(i * stagger)
        else:
            gate.wait(10)
        try:
            results[i] = one(port, paths[i])
        except Exception as exc:  # noqa: BLE001 - kept and shown by the test
            results[i] = (0, {"error": repr(exc)}, 0.0)

    threads = [threading.Thread(target=send, args=(i,), daemon=True)
               for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_no_app_process_ever_serves_two_requests_at_once(shared: Fixture) -> None:
    port = shared.bastion.port()
    statuses: list[int] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        # Three clients: at most 2 in flight + 1 waiting, within max_queue.
        for i in range(8):
            status, _, _ = one(port, f"/?s=0.1&n=c{k}-{i}")
            with lock:
                statuses.append(status)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - started
    seen = shared.seen()
    print(f"\n24 requests of 0.1 s, 3 clients, 2 processes: {took:.2f}s; "
          f"per process {[(d['served'], d['max_in_flight']) for d in seen.values()]}")
    assert statuses == [200] * 24, statuses
    assert shared.workers_that_forwarded() == set(shared.worker_pids()), \
        "only one worker forwarded: the test proves nothing"
    assert set(seen) == set(shared.app_pids())  # both processes served
    assert all(d["max_in_flight"] == 1 for d in seen.values()), seen


def test_queue_overflows_into_503_at_max_queue_across_workers(shared: Fixture) -> None:
    # 2 processes x max_concurrency 1 in flight + max_queue 3 waiting = 5 accepted.
    results = burst(shared.bastion.port(), [f"/?s=1.5&n=b{i}" for i in range(10)])
    statuses = sorted(status for status, _, _ in results)
    print(f"\nburst of 10: statuses {statuses}; refused in "
          f"{[round(t, 3) for s, _, t in results if s == 503]}s")
    assert statuses == [200] * 5 + [503] * 5, results
    for status, headers, took in results:
        if status == 503:
            assert int(headers["retry-after"]) >= 1, headers
            assert took < 1.0  # refused at once, not after waiting
    assert shared.workers_that_forwarded() == set(shared.worker_pids())
    assert all(d["max_in_flight"] == 1 for d in shared.seen().values())


def test_waiting_requests_are_served_in_arrival_order(shared: Fixture) -> None:
    # One every 0.15 s, each 0.4 s long: two run, and from the third on they wait
    # (up to two at once, within max_queue).
    names = [f"o{i}" for i in range(8)]
    results = burst(shared.bastion.port(), [f"/?s=0.4&n={n}" for n in names], stagger=0.15)
    assert [status for status, _, _ in results] == [200] * 8, results
    assert sum(took >= 0.5 for _, _, took in results) >= 3, results  # they did queue
    starts = sorted((at, name) for d in shared.seen().values()
                    for name, at in d["starts"] if name in names)
    order = [name for _, name in starts]
    print(f"\narrival order {names}\nserved order  {order}")
    assert order == names


def test_request_that_waited_too_long_in_the_queue_is_503(shared: Fixture) -> None:
    port = shared.bastion.port()
    hold = STARTUP + 7.0  # longer than the queue wait limit (startup_time_limit + 5 s)
    hogs = [threading.Thread(target=one, args=(port, f"/?s={hold}&n=hog{i}"), daemon=True)
            for i in range(2)]
    for hog in hogs:
        hog.start()
    time.sleep(1.0)  # both processes are busy with a hog (the file is written at the end)
    status, headers, took = one(port, "/?n=late")
    print(f"\nqueued behind busy processes: {status} after {took:.2f}s")
    assert status == 503, (status, headers)
    assert int(headers["retry-after"]) >= 1
    assert STARTUP + 5 - 0.5 <= took < STARTUP + 5 + 2.0
    assert "late" not in {n for d in shared.seen().values() for n, _ in d["starts"]}
    for hog in hogs:
        hog.join(30)


def test_a_killed_worker_gives_back_the_slot_it_held(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    app = {"command": app_command("uvicorn", "concurrency_app:app"),
           "start_mode": "always", "max_concurrency": 1, "max_queue": 5,
           "startup_time_limit": STARTUP, "request_timeout": 60,
           "environment": {"CONCURRENCY_DIR": str(records)}}
    bastion = BastionProcess(tmp_path, simple_config({"c": app}, workers=2)).start()
    f = Fixture(bastion, records)
    try:
        assert wait_until(Path(bastion.config["admin_socket"]).exists, 20), bastion.log()
        assert wait_until(lambda: len(f.app_pids()) == 1, 30), bastion.log()
        assert wait_until(lambda: len(f.worker_pids()) == 2, 30), bastion.log()
        port = bastion.port()
        held = threading.Thread(target=lambda: _quiet(port, "/?s=30&n=held"), daemon=True)
        held.start()
        # The one slot is held by whichever worker took that request.
        assert wait_until(lambda: len(f.workers_that_forwarded()) == 1, 10)
        (holder,) = f.workers_that_forwarded()
        psutil.Process(holder).kill()
        status, _, took = one(port, "/?n=after", timeout=20)
        print(f"\nslot held by a killed worker: next request {status} in {took:.2f}s")
        assert status == 200, bastion.log()[-3000:]
        assert took < 3.0  # not after the queue wait limit (STARTUP + 5 s)
    finally:
        bastion.stop(signal.SIGKILL if bastion.proc and bastion.proc.poll() is None else 0)


def _quiet(port: int, path: str) -> None:
    """A request whose connection is expected to break."""
    try:
        one(port, path, timeout=60)
    except OSError:
        pass
