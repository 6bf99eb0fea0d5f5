"""Pure decisions of the app lifecycle: restart delays, recycling, idleness.

No I/O and no clock: callers pass ``now`` (``time.monotonic()``) and plain numbers, so
every rule here is tested with numbers alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import RecycleSettings

BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
HEALTHY_UPTIME = 60.0


def next_backoff(previous: float) -> float:
    """The restart delay after ``previous``: 0 (at once), then 0.5 s doubling to 30 s."""
    return BACKOFF_FIRST if previous <= 0 else min(previous * 2, BACKOFF_CAP)


def backoff_after_exit(current: float, uptime: float) -> float:
    """A process that stayed up ``HEALTHY_UPTIME`` resets the backoff: restart at once."""
    return 0.0 if uptime >= HEALTHY_UPTIME else current


@dataclass(frozen=True)
class ProcessFacts:
    """What is known about one ready process when deciding on a recycle."""

    age: float  # seconds since it became ready
    served: int  # requests sent to it
    tree_rss: int  # bytes, the whole process tree; 0 when not sampled


def recycle_reason(rules: RecycleSettings, facts: ProcessFacts) -> str | None:
    """Why this process should be recycled now, or None."""
    if rules.max_age > 0 and facts.age >= rules.max_age:
        return f"max_age {rules.max_age:g}s reached"
    if rules.max_requests > 0 and facts.served >= rules.max_requests:
        return f"max_requests {rules.max_requests} reached"
    if rules.max_memory > 0 and facts.tree_rss >= rules.max_memory:
        return f"max_memory {rules.max_memory} bytes reached ({facts.tree_rss})"
    return None


def is_idle(idle_timeout: float, last_active: float, in_flight: int, now: float) -> bool:
    """True when nothing has asked for the app for ``idle_timeout`` seconds (0 = never)."""
    return idle_timeout > 0 and in_flight == 0 and now - last_active >= idle_timeout


def drained(in_flight: int, draining_since: float, limit: float, now: float) -> bool:
    """A draining process may be stopped: no request left, or waited ``limit`` seconds."""
    return in_flight == 0 or now - draining_since >= limit
