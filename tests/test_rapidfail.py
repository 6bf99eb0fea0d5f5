"""Rapid-fail protection (module/rapidfail.py): a sliding window driven by explicit times.

Semantics pinned here (IIS's maxCrashes): with ``limit`` N, N-1 failures in the window
leave starts allowed; the N-th failure inside 60 s puts the app in backoff until the
oldest failure that keeps the window full leaves it.
"""

from __future__ import annotations

from bastion.module.rapidfail import RapidFailWindow


def test_below_limit_is_allowed() -> None:
    window = RapidFailWindow(3)
    window.record(100.0)
    window.record(101.0)
    assert window.count(101.0) == 2
    assert window.blocked_until(101.0) is None


def test_reaching_limit_blocks_until_oldest_failure_leaves_window() -> None:
    window = RapidFailWindow(3)
    for t in (100.0, 110.0, 120.0):
        window.record(t)
    assert window.blocked_until(120.0) == 160.0
    assert window.blocked_until(159.9) == 160.0
    assert window.blocked_until(160.0) is None
    assert window.count(160.0) == 2


def test_blocked_until_uses_oldest_relevant_failure_when_more_than_limit() -> None:
    window = RapidFailWindow(2)
    for t in (0.0, 10.0, 20.0, 30.0):
        window.record(t)
    # 4 failures, limit 2: starts are allowed again once only 1 is left in the window,
    # i.e. when the one at 20 expires.
    assert window.blocked_until(30.0) == 80.0
    assert window.blocked_until(70.0) == 80.0
    assert window.blocked_until(80.0) is None


def test_failures_expire_after_window() -> None:
    window = RapidFailWindow(2)
    window.record(0.0)
    window.record(30.0)
    assert window.blocked_until(30.0) == 60.0
    assert window.count(59.999) == 2
    assert window.count(60.0) == 1
    assert window.count(90.0) == 0
    window.record(91.0)
    assert window.blocked_until(91.0) is None


def test_failures_spread_wider_than_window_never_block() -> None:
    window = RapidFailWindow(2)
    for t in range(0, 600, 61):
        window.record(float(t))
        assert window.blocked_until(float(t)) is None


def test_custom_window_length() -> None:
    window = RapidFailWindow(1, window=5.0)
    window.record(10.0)
    assert window.blocked_until(10.0) == 15.0
    assert window.blocked_until(15.0) is None


def test_limit_zero_disables_protection() -> None:
    window = RapidFailWindow(0)
    for t in range(100):
        window.record(float(t) / 10)
    assert window.blocked_until(10.0) is None
    assert window.count(10.0) == 100


def test_clear_forgets_every_failure() -> None:
    window = RapidFailWindow(2)
    window.record(1.0)
    window.record(2.0)
    assert window.blocked_until(2.0) == 61.0
    window.clear()
    assert window.count(2.0) == 0
    assert window.blocked_until(2.0) is None
    window.record(3.0)
    assert window.blocked_until(3.0) is None
