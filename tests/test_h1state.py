"""The HTTP/1.1 connection's state table (proxy/edge/h1state.py), alone: every allowed
move, every other (state, event) pair refused, and the deadline of each state."""

from __future__ import annotations

import itertools

import pytest

from bastion.proxy.config.model import Limits
from bastion.proxy.edge import h1state as st
from bastion.proxy.edge.h1state import (
    ACTIVE,
    BYTES,
    CLOSE,
    CLOSED,
    FRESH,
    HEAD,
    IDLE,
    KEEP,
    LOST,
    REFUSE,
    START,
    SWITCH,
    TUNNEL,
    StateError,
    deadline_of,
    next_state,
)

# The moves the theory of operation describes, written out independently of TABLE.
ALLOWED: dict[tuple[str, str], str] = {
    (FRESH, BYTES): HEAD,
    (FRESH, REFUSE): CLOSED,
    (FRESH, CLOSE): CLOSED,
    (HEAD, START): ACTIVE,
    (HEAD, REFUSE): CLOSED,
    (ACTIVE, KEEP): IDLE,
    (ACTIVE, CLOSE): CLOSED,
    (ACTIVE, SWITCH): TUNNEL,
    (ACTIVE, REFUSE): CLOSED,
    (IDLE, BYTES): HEAD,
    (IDLE, START): ACTIVE,
    (IDLE, CLOSE): CLOSED,
    (IDLE, REFUSE): CLOSED,
    (TUNNEL, CLOSE): CLOSED,
    (FRESH, LOST): CLOSED,
    (HEAD, LOST): CLOSED,
    (ACTIVE, LOST): CLOSED,
    (IDLE, LOST): CLOSED,
    (TUNNEL, LOST): CLOSED,
    (CLOSED, LOST): CLOSED,
}
ALL_PAIRS = list(itertools.product(st.STATES, st.EVENTS))
REFUSED = [pair for pair in ALL_PAIRS if pair not in ALLOWED]


def test_states_and_events_are_the_documented_ones() -> None:
    assert set(st.STATES) == {FRESH, HEAD, ACTIVE, IDLE, TUNNEL, CLOSED}
    assert len(st.STATES) == 6
    assert set(st.EVENTS) == {BYTES, START, KEEP, CLOSE, SWITCH, REFUSE, LOST}
    assert len(st.EVENTS) == 7


def test_table_is_exactly_the_allowed_moves() -> None:
    assert st.TABLE == ALLOWED


@pytest.mark.parametrize(("state", "event"), sorted(ALLOWED), ids=lambda v: str(v))
def test_allowed_move(state: str, event: str) -> None:
    assert next_state(state, event) == ALLOWED[(state, event)]


@pytest.mark.parametrize(("state", "event"), REFUSED, ids=lambda v: str(v))
def test_refused_move(state: str, event: str) -> None:
    with pytest.raises(StateError) as caught:
        next_state(state, event)
    assert state in str(caught.value) and event in str(caught.value)
    # Nothing chained to it (no KeyError from the table lookup in the traceback).
    error = caught.value
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_refused_pairs_are_the_rest() -> None:
    # 6 states x 7 events = 42 pairs: 20 allowed, 22 refused.
    assert len(ALL_PAIRS) == 42
    assert len(REFUSED) == 42 - len(ALLOWED) == 22


def test_lost_reaches_closed_from_everywhere() -> None:
    for state in st.STATES:
        assert next_state(state, LOST) == CLOSED


def test_closed_is_terminal() -> None:
    for event in st.EVENTS:
        if event != LOST:
            with pytest.raises(StateError):
                next_state(CLOSED, event)


def test_tunnel_leaves_only_by_closing() -> None:
    moves = {event for (state, event) in st.TABLE if state == TUNNEL}
    assert moves == {CLOSE, LOST}


def test_only_active_switches() -> None:
    assert [state for (state, event) in st.TABLE if event == SWITCH] == [ACTIVE]


def test_a_keep_alive_cycle() -> None:
    state = FRESH
    for event, expected in [(BYTES, HEAD), (START, ACTIVE), (KEEP, IDLE), (BYTES, HEAD),
                            (START, ACTIVE), (KEEP, IDLE), (START, ACTIVE), (CLOSE, CLOSED)]:
        state = next_state(state, event)
        assert state == expected


def test_state_error_is_a_runtime_error() -> None:
    assert issubclass(StateError, RuntimeError)


@pytest.mark.parametrize(("state", "deadline"), [
    (FRESH, "header_timeout"),
    (HEAD, "header_timeout"),
    (ACTIVE, "flow"),
    (IDLE, "keepalive_timeout"),
    (TUNNEL, None),
    (CLOSED, None),
])
def test_deadline_of(state: str, deadline: str | None) -> None:
    assert deadline_of(state) == deadline


def test_deadlines_name_limits() -> None:
    limits = Limits()
    for state in st.STATES:
        name = deadline_of(state)
        if name is not None and name != "flow":
            assert isinstance(getattr(limits, name), float)


def test_deadline_of_unknown_state() -> None:
    assert deadline_of("NOPE") is None
