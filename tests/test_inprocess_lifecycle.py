"""In-process apps' process management end to end: restart with fresh code, loads
bounded by each app's own ``startup_time_limit`` (in the background, never holding up
the worker or its other apps), health checks, and the keys an in-process app refuses.

Real Bastion processes, real worker processes importing real app modules that each
test writes into its temporary directory (so it can change them on disk), real
sockets; an out-of-process app under uvicorn next to them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from harness import BastionProcess, app_command, simple_config, wait_until

HEALTH = '''
    if scope["path"].endswith("/health"):  # HEALTH_FLAG holds "all" or a pid: 500 there
        agent = dict(scope["headers"]).get(b"user-agent", b"").decode()
        with open(os.environ["HEALTH_LOG"], "a") as log:
            log.write(f"{os.getpid()} {agent}\\n")
        try:
            with open(os.environ["HEALTH_FLAG"]) as flag:
                sick = flag.read().strip() in ("all", str(os.getpid()))
        except FileNotFoundError:
            sick = False
        await send({"type": "http.response.start", "status": 500 if sick else 200,
                    "headers": []})
        await send({"type": "http.response.body", "body": b"sick" if sick else b"ok"})
        return
'''


WSGI_HEALTH = '''
import os


def app(environ, start_response):  # a WSGI app whose /health logs who called it
    if environ["PATH_INFO"] == "/health":
        with open(os.environ["WSGI_HEALTH_LOG"], "a") as log:
            log.write(f"{os.getpid()} {environ.get('HTTP_USER_AGENT')}\\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"wsgi ok"]
'''


def asgi_source(answer: str, *, lifespan_sleep: float = 0.0, import_sleep: float = 0.0,
                health: bool = False, shutdown_sleep: float = 0.0) -> str:
    """An ASGI app answering ``answer PID``; its lifespan startup sleeps
    ``lifespan_sleep`` seconds, its shutdown ``shutdown_sleep``, its import
    ``import_sleep`` seconds (blocking); with
    ``health``, ``/health`` answers 500 in the worker HEALTH_FLAG names."""
    return f'''
import asyncio
import os
import time

time.sleep({import_sleep!r})
ANSWER = {answer!r}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep({lifespan_sleep!r})
                await send({{"type": "lifespan.startup.complete"}})
            else:
                await asyncio.sleep({shutdown_sleep!r})
                await send({{"type": "lifespan.shutdown.complete"}})
                return
{HEALTH if health else ""}
    body = f"{{ANSWER}} {{os.getpid()}}".encode()
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": body}})
'''


def hosted(tmp: Path, module: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "hosting_model": "in_process", "app": f"{module}:app",
            "cwd": str(tmp / "apps"), **extra}


def write_app(tmp: Path, module: str, source: str) -> None:
    (tmp / "apps").mkdir(exist_ok=True)
    (tmp / "apps" / f"{module}.py").write_text(source)


def worker_pids(proc: BastionProcess) -> set[int]:
    return {w["pid"] for w in proc.status()["workers"]}


def answers(proc: BastionProcess, path: str) -> tuple[int, str]:
    response = proc.get(path, timeout=15)
    return response.status, response.body.decode(errors="replace")


class Load:
    """Light load: a few clients sending requests back to back, recording failures and
    the answers' first words."""

    def __init__(self, proc: BastionProcess, path: str, clients: int = 2) -> None:
        self.proc = proc
        self.path = path
        self.failures: list[str] = []
        self.seen: list[str] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                status, body = answers(self.proc, self.path)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if status != 200:
                self.failures.append(f"{status} {body[:200]}")
            else:
                self.seen.append(body.split()[0])
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(20)


# -- restart: fresh code, workers rolled one at a time, nothing dropped ---------------------
def test_restart_loads_fresh_code_without_dropping_a_request(tmp_path: Path) -> None:
    write_app(tmp_path, "fresh", asgi_source("one", lifespan_sleep=0.5))
    apps = {"fresh": hosted(tmp_path, "fresh", "/")}
    config = simple_config(apps, workers=2)
    with BastionProcess(tmp_path, config) as proc:
        assert wait_until(lambda: answers(proc, "/")[1].startswith("one"), 20), proc.log()
        first = worker_pids(proc)
        with Load(proc, "/") as load:
            write_app(tmp_path, "fresh", asgi_source("version-two", lifespan_sleep=0.5))
            status, body = proc.admin_post("/apps/fresh/restart")
            assert status == 200, body
            assert wait_until(lambda: not worker_pids(proc) & first and len(
                worker_pids(proc)) == 2, 30), proc.log()
            assert wait_until(lambda: load.seen[-4:] == ["version-two"] * 4, 10)
        assert load.failures == [], load.failures
        assert "one" in load.seen  # the old workers served while the new ones loaded
        for _ in range(4):  # every worker has the new code
            assert answers(proc, "/")[1].startswith("version-two")
        assert proc.status()["apps"]["fresh"]["state"] == "ready"

        # New code that cannot load: the roll stops, the old workers keep serving.
        second = worker_pids(proc)
        write_app(tmp_path, "fresh", "raise RuntimeError('broken on purpose')\n")
        with Load(proc, "/") as load:
            assert proc.admin_post("/apps/fresh/restart")[0] == 200
            assert wait_until(lambda: "old worker(s) keep serving" in proc.log(), 20), \
                proc.log()
        assert load.failures == [], load.failures
        assert set(load.seen) == {"version-two"}
        assert wait_until(lambda: worker_pids(proc) == second, 10)
        status = proc.status()["apps"]["fresh"]
        assert "broken on purpose" in status["reason"]
        assert answers(proc, "/")[1].startswith("version-two")


# -- loads bounded by startup_time_limit, in the background ---------------------------------
def test_loads_are_bounded_by_startup_time_limit_and_never_hold_up_others(
        tmp_path: Path) -> None:
    write_app(tmp_path, "quick", asgi_source("quick"))
    # Longer than the worker's start limit (worker_timeout 2s: at least 5s), within
    # its own startup_time_limit: it loads.
    write_app(tmp_path, "slow", asgi_source("slow", lifespan_sleep=6.5))
    write_app(tmp_path, "hang", asgi_source("hang", lifespan_sleep=60))
    write_app(tmp_path, "heavy", asgi_source("heavy", import_sleep=60))
    apps = {
        "quick": hosted(tmp_path, "quick", "/quick"),
        "slow": hosted(tmp_path, "slow", "/slow", startup_time_limit="20s"),
        "hang": hosted(tmp_path, "hang", "/hang", startup_time_limit="2s",
                       rapid_fails_per_minute=2),
        "heavy": hosted(tmp_path, "heavy", "/heavy", startup_time_limit="2s"),
        "oop": {"path": "/oop", "command": app_command("uvicorn", "echo_asgi:app")},
    }
    config = simple_config(apps, workers=1, worker_timeout="2s", detailed_errors=True)
    with BastionProcess(tmp_path, config) as proc:
        began = time.monotonic()
        # The worker serves its other apps while three of them are still loading.
        assert wait_until(lambda: proc.status()["workers"], 10)
        (worker,) = worker_pids(proc)
        status, body = answers(proc, "/quick/")
        assert status == 200 and body.startswith("quick"), body
        assert time.monotonic() - began < 6, "the slow app held up the others"
        rows = proc.status()["apps"]["slow"]["processes"]  # still loading
        assert [(r["pid"], r["state"]) for r in rows] == [(worker, "starting")]
        assert proc.get("/oop/info", timeout=15).status == 200

        # A lifespan over its startup_time_limit: a failed load, with the reason.
        hang = proc.get("/hang/", timeout=15)
        assert hang.status == 502, hang.body
        assert b"took longer than startup_time_limit (2s)" in hang.body
        assert b"lifespan startup had not completed" in hang.body
        state = proc.status()["apps"]["hang"]
        assert state["state"] in ("failed", "backoff")
        assert "startup_time_limit (2s)" in state["reason"]
        # ... retried by the next request, and counted: the second failure (of 2 a
        # minute) rests the app (503 with Retry-After).
        assert wait_until(lambda: proc.get("/hang/", timeout=15).status == 503, 10)
        assert int(proc.get("/hang/").headers["retry-after"]) >= 1
        assert "startup_time_limit (2s)" in proc.status()["apps"]["hang"]["reason"]

        # An import over its limit (it blocks its own thread, not the worker's loop).
        heavy = proc.get("/heavy/", timeout=15)
        assert heavy.status == 502
        assert b"importing heavy:app had not finished" in heavy.body

        # The slow one loads after more than the worker's start limit, in the same worker.
        assert wait_until(lambda: answers(proc, "/slow/")[0] == 200, 15), proc.log()
        assert time.monotonic() - began > 5
        assert answers(proc, "/slow/")[1] == f"slow {worker}"
        assert worker_pids(proc) == {worker}
        assert proc.status()["apps"]["slow"]["state"] == "ready"
        assert answers(proc, "/quick/")[0] == 200
        assert proc.get("/oop/info").status == 200
        assert "killed" not in proc.log()


def test_shutdown_time_limit_bounds_the_lifespan_shutdown(tmp_path: Path) -> None:
    write_app(tmp_path, "lingering", asgi_source("lingering", shutdown_sleep=60))
    apps = {"lingering": hosted(tmp_path, "lingering", "/", shutdown_time_limit="1s")}
    proc = BastionProcess(tmp_path, simple_config(apps, workers=1)).start()
    try:
        assert wait_until(lambda: answers(proc, "/")[0] == 200, 20), proc.log()
    finally:
        began = time.monotonic()
        assert proc.stop() == 0
    assert time.monotonic() - began < 5
    assert "lifespan shutdown did not complete within 1s" in proc.log()
    assert "killed" not in proc.log()


# -- health checks, in-process ----------------------------------------------------------------
def test_failing_health_checks_replace_that_worker_and_count(tmp_path: Path) -> None:
    flag, calls = tmp_path / "unhealthy", tmp_path / "health.log"
    wsgi_calls = tmp_path / "wsgi-health.log"
    write_app(tmp_path, "checked", asgi_source("checked", health=True))
    write_app(tmp_path, "wchecked", WSGI_HEALTH)
    env = {"HEALTH_FLAG": str(flag), "HEALTH_LOG": str(calls),
           "WSGI_HEALTH_LOG": str(wsgi_calls)}
    check = {"path": "/health", "interval": "0.2s", "timeout": "1s", "failures": 3}
    apps = {"checked": hosted(tmp_path, "checked", "/c", environment=env,
                              health_check=check, rapid_fails_per_minute=2),
            "wchecked": hosted(tmp_path, "wchecked", "/w", environment=env,
                               interface="wsgi", health_check=check)}
    with BastionProcess(tmp_path, simple_config(apps, workers=2)) as proc:
        assert wait_until(lambda: len(proc.status()["apps"]["checked"]["processes"]) == 2,
                          20), proc.log()
        first = worker_pids(proc)

        def checked_in(log: Path = calls) -> set[int]:
            lines = log.read_text().splitlines() if log.exists() else []
            assert all(line.endswith(" bastion-health-check") for line in lines)
            return {int(line.split()[0]) for line in lines}

        # each worker calls the apps itself, in-process, through the same call path
        assert wait_until(lambda: checked_in() == first, 10)
        assert wait_until(lambda: checked_in(wsgi_calls) == first, 10)
        sick, well = sorted(first)
        with Load(proc, "/c/") as load:
            flag.write_text(str(sick))
            assert wait_until(lambda: sick not in worker_pids(proc)
                              and len(worker_pids(proc)) == 2, 20), proc.log()
        assert load.failures == [], load.failures
        assert well in worker_pids(proc)  # only the unhealthy worker was replaced
        assert "failed 3 health checks in a row (last: status 500)" in proc.log()
        status = proc.status()["apps"]["checked"]
        assert status["recycles"] == 1
        assert wait_until(lambda: proc.status()["apps"]["checked"]["state"] == "ready", 10)
        # it counted as a failure: one more fills the window (2 a minute) -> 503
        flag.write_text("all")
        assert wait_until(lambda: proc.get("/c/").status == 503, 20), proc.log()
        resting = proc.get("/c/")
        assert int(resting.headers["retry-after"]) >= 1
        assert "health checks" in proc.status()["apps"]["checked"]["reason"]
