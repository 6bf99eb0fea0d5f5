"""The app lifecycle table (module/states.py), without processes.

``EXPECTED`` spells out, independently of the module, every allowed (phase, event) pair
and where it leads with default facts (nothing serving, nothing starting, the window not
full, no app_offline.htm). Every pair not listed must be refused. The guards get their
own tests with the facts that steer them.
"""

from __future__ import annotations

import itertools

import pytest

from bastion.module.messages import State
from bastion.module.states import (
    EVENTS,
    PHASES,
    PUBLISHED,
    TRANSITIONS,
    Event,
    Facts,
    IllegalTransition,
    Phase,
    allowed,
    transition,
)

LIVE_EXITS: dict[Event, Phase] = {
    "offline": "offline", "admin_stop": "held", "close": "closing", "closed": "closed",
}
EXPECTED: dict[Phase, dict[Event, Phase]] = {
    "stopped": {"start": "starting", "rest": "backoff", "failure": "failed", **LIVE_EXITS},
    "starting": {"up": "ready", "failure": "failed", **LIVE_EXITS},
    "ready": {"up": "ready", "failure": "failed", "recycle": "recycling", "idle": "stopped",
              **LIVE_EXITS},
    "recycling": {"up": "recycling", "failure": "failed", "recycled": "ready",
                  "idle": "stopped", **LIVE_EXITS},
    "failed": {"start": "starting", "up": "ready", "rest": "backoff", "failure": "failed",
               **LIVE_EXITS},
    "backoff": {"start": "starting", "up": "ready", "rest": "backoff", "failure": "failed",
                **LIVE_EXITS},
    "offline": {"failure": "offline", "online": "stopped", **LIVE_EXITS},
    "held": {"failure": "held", "offline": "held", "online": "held", "admin_stop": "held",
             "admin_start": "stopped", "close": "closing", "closed": "closed"},
    "closing": {"failure": "closing", "close": "closing", "closed": "closed"},
    "closed": {"failure": "closed", "closed": "closed"},
}


def test_table_covers_every_phase() -> None:
    assert set(TRANSITIONS) == set(PHASES) == set(EXPECTED)


@pytest.mark.parametrize(("phase", "event", "target"), [
    (phase, event, target) for phase, row in EXPECTED.items() for event, target in row.items()
])
def test_every_allowed_transition(phase: Phase, event: Event, target: Phase) -> None:
    assert allowed(phase, event)
    assert transition(phase, event, Facts()) == target


@pytest.mark.parametrize(("phase", "event"), [
    (phase, event) for phase, event in itertools.product(PHASES, EVENTS)
    if event not in EXPECTED[phase]
])
def test_every_forbidden_transition_is_refused(phase: Phase, event: Event) -> None:
    assert not allowed(phase, event)
    with pytest.raises(IllegalTransition) as info:
        transition(phase, event, Facts())
    assert (info.value.phase, info.value.event) == (phase, event)


@pytest.mark.parametrize("phase", ["ready", "recycling"])
def test_a_crash_while_others_serve_keeps_the_phase(phase: Phase) -> None:
    assert transition(phase, "failure", Facts(serving=1, resting=True)) == phase


@pytest.mark.parametrize("phase", ["stopped", "starting", "failed", "backoff"])
def test_a_process_that_still_serves_makes_the_app_ready(phase: Phase) -> None:
    assert transition(phase, "failure", Facts(serving=1)) == "ready"


@pytest.mark.parametrize("phase", ["starting", "ready", "recycling", "failed", "backoff"])
def test_a_failure_with_the_window_full_rests(phase: Phase) -> None:
    assert transition(phase, "failure", Facts(resting=True, launching=1)) == "backoff"


@pytest.mark.parametrize("phase", ["starting", "ready", "recycling", "failed"])
def test_a_failure_with_another_start_under_way_is_starting(phase: Phase) -> None:
    assert transition(phase, "failure", Facts(launching=1)) == "starting"


def test_admin_start_with_app_offline_htm_present_stays_offline() -> None:
    assert transition("held", "admin_start", Facts(offline_file=True)) == "offline"
    assert transition("held", "admin_start", Facts(offline_file=False)) == "stopped"


@pytest.mark.parametrize("phase", ["offline", "held", "closing", "closed"])
def test_failures_while_offline_or_closing_change_nothing(phase: Phase) -> None:
    assert transition(phase, "failure", Facts(serving=0, resting=True)) == phase


def test_published_states_keep_the_seven_states_of_the_messages() -> None:
    published: set[State] = set(PUBLISHED.values())
    assert published == {"stopped", "starting", "ready", "failed", "backoff", "offline",
                         "draining"}
    assert PUBLISHED["recycling"] == "ready"
    assert PUBLISHED["held"] == "offline"
    assert PUBLISHED["closing"] == "draining"


def test_nothing_starts_once_closed() -> None:
    for event in ("start", "up", "rest", "recycle", "admin_start", "online"):
        assert not allowed("closed", event)  # type: ignore[arg-type]
