"""The module <-> proxy messages (module/messages.py) survive a JSON round trip."""

from __future__ import annotations

import json

import pytest

from bastion.module import messages
from bastion.module.messages import (
    AppState,
    Endpoint,
    EndpointFailed,
    NeedApp,
    SlotFreed,
    SlotGranted,
    SlotRefused,
    SlotWanted,
    from_wire,
)


def through_json(message: object) -> object:
    wire = message.to_wire()  # type: ignore[attr-defined]
    return from_wire(json.loads(json.dumps(wire)))


@pytest.mark.parametrize(
    "message",
    [
        AppState("shop", 1, "stopped"),
        AppState(
            "shop",
            7,
            "ready",
            endpoints=(Endpoint(101, 30001, "tok-a"), Endpoint(102, 0, "tok-b", "/run/a.sock")),
            reason="exited with status 3",
            detail="line 1\nline 2 \u00e9",
        ),
        AppState("shop", 9, "backoff", retry_at=1_700_000_000.25, reason="too many crashes"),
        AppState("shop", 3, "offline", offline_body="<h1>down</h1>"),
        NeedApp("shop"),
        EndpointFailed("shop", 4242, "connection refused"),
        EndpointFailed("shop", 4242),
        SlotWanted("shop", 2, 17),
        SlotGranted("shop", 2, 17, Endpoint(101, 30001, "tok-a")),
        SlotGranted("shop", 2, 18, Endpoint(102, 0, "tok-b", "/run/a.sock")),
        SlotRefused("shop", 2, 19, retry_after=3, reason="queue full"),
        SlotFreed("shop", 2, 17),
    ],
)
def test_round_trip(message: object) -> None:
    back = through_json(message)
    assert back == message
    assert type(back) is type(message)


def test_state_endpoints_come_back_as_endpoint_tuple() -> None:
    state = AppState("a", 2, "ready", endpoints=(Endpoint(1, 2, "t"),))
    back = through_json(state)
    assert isinstance(back, AppState)
    assert isinstance(back.endpoints, tuple)
    assert isinstance(back.endpoints[0], Endpoint)
    hash(back)  # frozen and hashable, as the original


def test_wire_kinds() -> None:
    assert AppState("a", 1, "ready").to_wire()["kind"] == "state"
    assert NeedApp("a").to_wire() == {"kind": "need", "app": "a"}
    assert EndpointFailed("a", 5, "x").to_wire() == {"kind": "failed", "app": "a", "pid": 5, "error": "x"}


def test_usage_report_round_trip_when_present() -> None:
    if not hasattr(messages, "UsageReport"):
        pytest.skip("no UsageReport message in this version")
    report = messages.UsageReport(
        "shop", 2, (messages.ProcessUsage(11, 5, 1), messages.ProcessUsage(12, 0, 0))
    )
    assert through_json(report) == report


@pytest.mark.parametrize("data", [{"kind": "bogus", "app": "a"}, {"app": "a"}, {}])
def test_unknown_kind_raises(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="unknown message kind"):
        from_wire(data)
