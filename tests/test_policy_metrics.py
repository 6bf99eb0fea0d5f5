"""Pure units: lifecycle policy, metrics, channel framing, worker count."""

from __future__ import annotations

import asyncio

import pytest

from bastion.module.policy import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    HEALTHY_UPTIME,
    ProcessFacts,
    backoff_after_exit,
    drained,
    is_idle,
    next_backoff,
    recycle_reason,
)
from bastion.module.spec import RecycleSettings
from bastion.proxy.control import channel
from bastion.proxy.edge.metrics import BUCKETS, Metrics, merge, render


def test_backoff_doubles_from_half_a_second_and_is_capped() -> None:
    delays = [0.0]
    for _ in range(10):
        delays.append(next_backoff(delays[-1]))
    assert delays[:5] == [0.0, BACKOFF_FIRST, 1.0, 2.0, 4.0]
    assert max(delays) == BACKOFF_CAP
    assert backoff_after_exit(8.0, HEALTHY_UPTIME) == 0.0
    assert backoff_after_exit(8.0, HEALTHY_UPTIME - 1) == 8.0


@pytest.mark.parametrize(
    ("rules", "facts", "expected"),
    [
        (RecycleSettings(), ProcessFacts(10_000, 10_000, 10**10), None),
        (RecycleSettings(max_age=60), ProcessFacts(59.9, 0, 0), None),
        (RecycleSettings(max_age=60), ProcessFacts(60, 0, 0), "max_age"),
        (RecycleSettings(max_requests=100), ProcessFacts(1, 99, 0), None),
        (RecycleSettings(max_requests=100), ProcessFacts(1, 100, 0), "max_requests"),
        (RecycleSettings(max_memory=1000), ProcessFacts(1, 0, 999), None),
        (RecycleSettings(max_memory=1000), ProcessFacts(1, 0, 1000), "max_memory"),
    ],
)
def test_recycle_reason(rules: RecycleSettings, facts: ProcessFacts, expected: str | None) -> None:
    reason = recycle_reason(rules, facts)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)


def test_idle_and_drained() -> None:
    assert not is_idle(0, last_active=0, in_flight=0, now=10**6)  # 0 = never
    assert not is_idle(60, last_active=100, in_flight=0, now=159)
    assert is_idle(60, last_active=100, in_flight=0, now=160)
    assert not is_idle(60, last_active=100, in_flight=1, now=1000)
    assert drained(0, draining_since=10, limit=30, now=10)
    assert not drained(2, draining_since=10, limit=30, now=39)
    assert drained(2, draining_since=10, limit=30, now=40)


def test_metrics_count_merge_and_render() -> None:
    one, two = Metrics(), Metrics()
    one.observe("shop", 200, 0.004)
    one.observe("shop", 502, 0.2)
    two.observe("shop", 200, 100.0)
    two.open_connections = 3
    merged = merge([one.snapshot(), two.snapshot()])
    assert sorted(merged["requests"]) == [["shop", 200, 2], ["shop", 502, 1]]
    assert merged["latency"]["shop"][0] == 1  # 4 ms: first bucket
    assert merged["latency"]["shop"][-1] == 1  # 100 s: +Inf
    assert merged["upstream_errors"] == {"shop": 1}
    status = {"apps": {"shop": {"restarts": 4, "processes": [{"state": "ready"}]}}}
    text = render(merged, status, workers=2)
    assert 'bastion_requests_total{app="shop",status="200"} 2' in text
    assert 'bastion_request_duration_seconds_bucket{app="shop",le="+Inf"} 3' in text
    assert f'le="{BUCKETS[0]:g}"}} 1' in text
    assert 'bastion_app_restarts_total{app="shop"} 4' in text
    assert 'bastion_app_processes{app="shop",state="ready"} 1' in text
    assert "bastion_open_connections 3" in text
    assert "bastion_workers 2" in text


def test_channel_frames_round_trip_and_refuse_huge_frames() -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(channel.json_frame(channel.MESSAGE, {"kind": "need", "app": "a"}))
        reader.feed_data(channel.frame(channel.READY))
        reader.feed_data(channel.HEADER.pack(b"M", channel.MAX_FRAME + 1))
        reader.feed_eof()
        assert await channel.read_frame(reader) == (b"M", b'{"kind":"need","app":"a"}')
        assert await channel.read_frame(reader) == (b"R", b"")
        with pytest.raises(ValueError):
            await channel.read_frame(reader)

    asyncio.run(run())
