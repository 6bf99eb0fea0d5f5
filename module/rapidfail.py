"""Rapid-fail protection: a sliding 60-second window of crashes and failed starts.

Pure logic, no clock of its own: every call takes ``now`` (``time.monotonic()``), so tests
drive it with plain numbers. An app may fail ``limit`` times within any ``window``
seconds; once it has, it is in backoff until the oldest of those failures leaves the
window. That mirrors IIS's rapid-fail protection ("maxCrashes within interval") with a
real sliding window instead of a fixed one, so the wait it reports is exact.
"""

from __future__ import annotations

from collections import deque


class RapidFailWindow:
    """Counts failures in a sliding window and says when an app must rest."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        """``limit`` failures are allowed within ``window`` seconds; 0 disables protection."""
        self.limit = limit
        self.window = window
        self._failures: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self.window:
            self._failures.popleft()

    def record(self, now: float) -> None:
        """Count one crash or failed start at ``now``."""
        self._expire(now)
        self._failures.append(now)

    def count(self, now: float) -> int:
        """Failures still inside the window at ``now``."""
        self._expire(now)
        return len(self._failures)

    def blocked_until(self, now: float) -> float | None:
        """The monotonic time until which starts are refused, or None when allowed."""
        if self.limit <= 0:
            return None
        self._expire(now)
        if len(self._failures) < self.limit:
            return None
        # The window frees a slot when the oldest failure that keeps it full expires.
        return self._failures[len(self._failures) - self.limit] + self.window

    def clear(self) -> None:
        """Forget every failure (after a config reload or a manual start)."""
        self._failures.clear()
