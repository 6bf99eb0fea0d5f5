"""Periodic tasks survive their own errors (module/periodic.py), with rate-limited logs.

The rules of ``ErrorLog`` with plain numbers; ``every`` and ``Guard`` in a real event
loop with a step that fails; and, end to end, Bastion's module tick going on after
the /proc scan failed with EMFILE (RLIMIT_NOFILE lowered, client connections filling
it): app_offline.htm still works afterwards and SIGTERM still stops the apps
gracefully (the tick used to die for good, and the stop ended with exit 2).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from harness import BastionProcess, app_command, simple_config, wait_until

from bastion.module.periodic import ErrorLog, Guard, every

ECHO = app_command("uvicorn", "echo_asgi:app")


def test_error_log_first_failure_then_one_line_per_quiet_period() -> None:
    errors = ErrorLog(quiet=60.0)
    assert errors.failed(100.0) == (True, 0)
    assert errors.failed(100.5) == (False, 0)
    assert errors.failed(130.0) == (False, 0)
    assert errors.failed(160.0) == (True, 2)  # says how many it held back
    assert errors.failed(161.0) == (False, 0)
    assert errors.failures == 5
    assert errors.succeeded() == 5
    assert errors.succeeded() == 0
    assert errors.failed(162.0) == (True, 0)  # a new run of failures shows again at once


def test_every_goes_on_after_errors_and_logs_them_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []
    log = logging.getLogger("test.periodic")

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 5:
            raise OSError(24, "Too many open files")

    async def main() -> None:
        task = asyncio.create_task(every("probe", 0.02, step, log, quiet=60.0))
        while len(calls) < 8:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="test.periodic"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert len(calls) >= 8  # five failures did not end it
    failures = [r for r in caplog.records if "probe failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "Too many open files" in caplog.text
    assert any("probe works again after 5 failure(s)" in r.getMessage()
               for r in caplog.records)


def test_every_runs_async_steps_on_the_monotonic_clock() -> None:
    times: list[float] = []

    async def step() -> None:
        times.append(time.monotonic())
        await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.create_task(every("async", 0.05, step, logging.getLogger("x"),
                                         first=0.0))
        await asyncio.sleep(0.33)
        task.cancel()

    asyncio.run(main())
    assert 5 <= len(times) <= 8, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.04, gaps


def test_guard_keeps_parts_apart(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard(logging.getLogger("test.guard"), quiet=60.0)
    with caplog.at_level(logging.WARNING, logger="test.guard"):
        for _ in range(3):
            for part in ("a", "b"):
                try:
                    raise ValueError(part)
                except ValueError:
                    guard.failed(part)
        guard.succeeded("a")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a failed", "b failed", "a works again after 3 failure(s)"]


# -- end to end: the module tick after EMFILE ----------------------------------------------

def _hold_connections(port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            break
        held.append(sock)
    return held


@pytest.mark.skipif(not hasattr(psutil.Process, "rlimit"), reason="needs prlimit")
def test_module_tick_survives_emfile(tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always",
                                     "cwd": str(app_dir)}}, workers=1)
    bastion = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: bastion.app_pids("echo"), 20), bastion.log()
        (app_pid,) = bastion.app_pids("echo")
        main = psutil.Process(bastion.pid)
        old = main.rlimit(psutil.RLIMIT_NOFILE)
        limit = max(64, main.num_fds() + 16)
        main.rlimit(psutil.RLIMIT_NOFILE, (limit, old[1]))
        held = _hold_connections(bastion.port(), limit)
        try:
            # Every descriptor is taken: the ticks' /proc scans fail for a while.
            assert wait_until(lambda: main.num_fds() >= limit, 10), (main.num_fds(), limit)
            time.sleep(3)
        finally:
            for sock in held:
                sock.close()
            main.rlimit(psutil.RLIMIT_NOFILE, old)
        print(f"{len(held)} connections held with RLIMIT_NOFILE {limit}")
        # The tick goes on: app_offline.htm takes the app offline and stops it.
        (app_dir / "app_offline.htm").write_text("<h1>maintenance</h1>")
        assert wait_until(lambda: bastion.status()["apps"]["echo"]["state"] == "offline",
                          10), bastion.log()
        assert wait_until(lambda: not psutil.pid_exists(app_pid), 10)
        assert bastion.get("/").status == 503
        (app_dir / "app_offline.htm").unlink()
        assert wait_until(lambda: bastion.app_pids("echo"), 20), bastion.log()
        assert bastion.stop(signal.SIGTERM) == 0, bastion.log()
        log = bastion.log()
        assert "killing what is left" not in log
        # The failures were logged, once per part and run, and so was their end.
        scan_errors = [line for line in log.splitlines()
                       if "bastion.module: orphan scan failed" in line]
        assert len(scan_errors) == 1, log
        assert "Too many open files" in log.split(scan_errors[0], 1)[1][:3000], log
        assert "orphan scan works again after" in log, log
    finally:
        bastion.stop(signal.SIGKILL)
