"""The states of an HTTP/1.1 client connection, and the only moves between them.

A pure table in the manner of h11's ``_state.py``: ``H1Connection`` (``proxy.edge.h1``)
asks ``next_state`` for every move, so a move that is not in the table is a bug that
shows at once (``StateError``) instead of a connection that silently does the wrong
thing. Each state has at most one deadline, which is what the connection's single
timer waits for:

=========  =========================================  ==============================
state      meaning                                    deadline
=========  =========================================  ==============================
FRESH      accepted, no byte of a request yet         header_timeout (then 408)
HEAD       a request head is arriving                 header_timeout (then 408)
ACTIVE     a request is being served (by a Flow)      the flow's (408 body, 504 app)
IDLE       kept alive between two requests            keepalive_timeout (silent close)
TUNNEL     a WebSocket after its 101: a byte pipe     none (either side may close)
CLOSED     closed or closing                          none
=========  =========================================  ==============================

Events: ``BYTES`` (the first bytes of a head), ``START`` (a complete head starts being
served), ``KEEP`` / ``CLOSE`` (the answer is out and the connection stays / closes),
``SWITCH`` (101), ``REFUSE`` (refused at the edge, or a deadline passed), ``LOST``
(the transport is gone, from anywhere).
"""

from __future__ import annotations

from typing import Final

from .errors import StateError as StateError  # (defined with the proxy's other errors)

# Final: compiled (proxy/edge/native.py), a connection reads them as constants.
FRESH: Final = "FRESH"
HEAD: Final = "HEAD"
ACTIVE: Final = "ACTIVE"
IDLE: Final = "IDLE"
TUNNEL: Final = "TUNNEL"
CLOSED: Final = "CLOSED"
STATES = (FRESH, HEAD, ACTIVE, IDLE, TUNNEL, CLOSED)

BYTES: Final = "BYTES"
START: Final = "START"
KEEP: Final = "KEEP"
CLOSE: Final = "CLOSE"
SWITCH: Final = "SWITCH"
REFUSE: Final = "REFUSE"
LOST: Final = "LOST"
EVENTS = (BYTES, START, KEEP, CLOSE, SWITCH, REFUSE, LOST)

TABLE: dict[tuple[str, str], str] = {
    (FRESH, BYTES): HEAD,
    (FRESH, REFUSE): CLOSED,
    (FRESH, CLOSE): CLOSED,  # a graceful stop, or the first-request grace ran out
    (HEAD, START): ACTIVE,
    (HEAD, REFUSE): CLOSED,
    (ACTIVE, KEEP): IDLE,
    (ACTIVE, CLOSE): CLOSED,
    (ACTIVE, SWITCH): TUNNEL,
    (ACTIVE, REFUSE): CLOSED,  # a pipelined request refused while one was served
    (IDLE, BYTES): HEAD,
    (IDLE, START): ACTIVE,  # a pipelined request parsed earlier
    (IDLE, CLOSE): CLOSED,
    (IDLE, REFUSE): CLOSED,
    (TUNNEL, CLOSE): CLOSED,
}
for _state in STATES:
    TABLE[(_state, LOST)] = CLOSED


def next_state(state: str, event: str) -> str:
    """The state after ``event`` in ``state``; raises ``StateError`` when not allowed."""
    found = TABLE.get((state, event))
    if found is None:  # (no KeyError to chain: the message says it all)
        raise StateError(f"{event} is not allowed in {state}")
    return found


DEADLINES: dict[str, str] = {FRESH: "header_timeout", HEAD: "header_timeout",
                             ACTIVE: "flow", IDLE: "keepalive_timeout"}


def deadline_of(state: str) -> str | None:
    """Which limit bounds ``state``: a ``Limits`` field name, "flow", or None."""
    return DEADLINES.get(state)
