"""Deadlines that cross processes use CLOCK_MONOTONIC, never the wall clock.

The rapid-fail deadline (``AppState.retry_at``) is set by the module and read by every
proxy worker. Stepping the wall clock back (NTP, an administrator) must not make the
503s last longer. The system clock cannot be stepped here (it would disturb the whole
machine), so the step is played by making ``time.time`` run an hour behind between the
module's publish and the worker's read, exactly where a real step would fall.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from bastion.module.controller import AppController
from bastion.module.keeper import Keeper
from bastion.module.rapidfail import RapidFailWindow
from bastion.module.spec import AppSpec
from bastion.proxy.edge.endpoints import EndpointTable
from bastion.proxy.edge.errors import Unavailable

HOUR = 3600.0


def test_monotonic_clock_is_one_clock_for_every_process() -> None:
    before = time.monotonic()
    out = subprocess.run([sys.executable, "-c", "import time; print(time.monotonic())"],
                         capture_output=True, text=True, check=True).stdout
    after = time.monotonic()
    assert before <= float(out) <= after


def test_rapid_fail_503_ends_on_time_when_the_wall_clock_steps_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        sent: list[object] = []
        table = EndpointTable(sent.append)
        app = AppController(AppSpec(name="shop", command=("true",)), Keeper(), table.update)
        app.rapid = RapidFailWindow(1, window=1.0)  # one failure rests the app for 1 s
        app.rapid.record(time.monotonic())
        app.need()  # the window is full: backoff, published to the worker's table
        state = table.state("shop")
        assert state is not None and state.state == "backoff" and state.retry_at is not None

        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - HOUR)  # the clock steps back

        with pytest.raises(Unavailable) as info:
            await table.acquire("shop", 0.1)
        assert info.value.retry_after == 1, info.value.retry_after  # not 3601

        await asyncio.sleep(1.1)
        # The deadline has passed: the request asks the module for a start instead of
        # getting another 503 for an hour.
        with pytest.raises(Exception) as later:
            await table.acquire("shop", 0.1)
        assert not isinstance(later.value, Unavailable), later.value
        assert any(type(m).__name__ == "NeedApp" for m in sent)

    asyncio.run(main())
