"""Periodic tasks that survive their own errors, with rate-limited error logs.

Theory of operation
-------------------
Bastion runs a handful of loops for as long as it lives: the module's tick (app_offline,
idle stop, recycle, descendant tracking, zombie reaping), the certificate watcher, the
systemd watchdog and the worker liveness check in the main process; metrics and
heartbeats in every worker process. One exception escaping such a loop would end it for
good, silently, and whatever it drives would stop working while everything else looks
healthy (an EMFILE from a /proc scan is enough).

``every(name, interval, step)`` runs ``step`` (a plain or an async function) every
``interval`` seconds on ``time.monotonic()``, for ever. An exception from one step is
logged and the loop goes on with the next step; only cancellation ends it. A failing
step usually fails again at the next step, so ``ErrorLog`` (pure, clock injected) lets
the first failure of a run through with its traceback and then at most one line per
``quiet`` seconds, which says how many failures it held back; the first success after
failures is logged too, so the log shows when the trouble ended.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Step = Callable[[], Awaitable[None] | None]

QUIET = 60.0  # at most one error line per task and per this many seconds


@dataclass
class ErrorLog:
    """Decides which failures of one periodic task are logged (pure: give it the time)."""

    quiet: float = QUIET
    failures: int = 0  # consecutive failures so far
    held_back: int = 0  # failures not logged since the last line
    _last_line: float | None = None

    def failed(self, now: float) -> tuple[bool, int]:
        """A step failed at ``now``: (log it?, failures held back before this one)."""
        self.failures += 1
        if self._last_line is not None and now - self._last_line < self.quiet:
            self.held_back += 1
            return False, 0
        held, self.held_back = self.held_back, 0
        self._last_line = now
        return True, held

    def succeeded(self) -> int:
        """A step succeeded: the number of consecutive failures it ends (0: none)."""
        ended, self.failures, self.held_back = self.failures, 0, 0
        self._last_line = None
        return ended


async def every(name: str, interval: float, step: Step, log: logging.Logger, *,
                first: float | None = None, quiet: float = QUIET) -> None:
    """Run ``step`` every ``interval`` seconds (the first time after ``first``, default
    ``interval``) until cancelled; a failing step is logged (rate-limited) and skipped."""
    guard = Guard(log, quiet)
    next_at = time.monotonic() + (interval if first is None else first)
    while True:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a periodic task must outlive any one failure
            guard.failed(name)
        else:
            guard.succeeded(name)
        # A slow step (or a blocked loop) never makes the steps catch up in a burst.
        next_at = max(next_at + interval, time.monotonic())


class Guard:
    """Runs the parts of a periodic task one by one, each failure logged rate-limited
    by part name, so one failing part neither stops the others nor floods the log."""

    def __init__(self, log: logging.Logger, quiet: float = QUIET) -> None:
        self._log = log
        self._quiet = quiet
        self._errors: dict[str, ErrorLog] = {}

    def failed(self, name: str) -> None:
        """Log the exception being handled as a failure of part ``name`` (rate-limited)."""
        errors = self._errors.setdefault(name, ErrorLog(self._quiet))
        show, held = errors.failed(time.monotonic())
        if show:
            more = f" ({held} more failure(s) not logged)" if held else ""
            self._log.exception("%s failed%s", name, more)

    def succeeded(self, name: str) -> None:
        """Part ``name`` worked (logs the end of a run of failures)."""
        errors = self._errors.get(name)
        if errors is not None and (ended := errors.succeeded()):
            self._log.warning("%s works again after %d failure(s)", name, ended)
