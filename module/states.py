"""The app lifecycle as a table: phases, events, the one transition function.

Theory of operation
-------------------
An app (``module.controller.AppController``) is always in exactly one *phase*. The phase
changes only through ``transition(phase, event, facts)``, which looks the pair up in
``TRANSITIONS``: an entry is either the next phase or a *guard*, a pure function of the
current phase and a few ``Facts`` (how many processes serve, how many are starting,
whether the rapid-fail window is full, whether app_offline.htm is present) that picks
the next phase. A pair not in the table is refused with ``IllegalTransition``; callers
that must tolerate a late event (a start finishing after the app went offline) ask
``allowed`` first. This is the shape of supervisor's ``process.py`` and h11's
``_state.py``: no I/O, no clock, no processes, so every row is tested with plain values
(``tests/test_states.py``).

What used to be flags next to the state are phases of their own:

* ``recycling``: ready, with an overlapped replacement under way (published ``ready``);
* ``held``: stopped by the administrator (``POST /apps/NAME/stop``; published
  ``offline``); it outranks app_offline.htm, whose body is data shown meanwhile;
* ``closing`` / ``closed``: Bastion is stopping the app for good (published ``draining``
  and then ``stopped``); nothing starts again.

The phases map onto the published ``module.messages.State`` by ``PUBLISHED``, so the
``AppState`` snapshots the proxy sees keep their seven states and meanings::

    stopped --start--> starting --up--> ready --failure--> failed --start--> starting
       |                  |               |  \\--recycle--> recycling --recycled--> ready
       +--rest--> backoff +--failure-->   +--idle--> stopped
    failure: others serve -> same phase; window full -> backoff; a start still under
             way -> starting; else failed
    any live --offline--> offline --online--> stopped
    any live --admin_stop--> held --admin_start--> stopped (or offline: file present)
    any --close--> closing --closed--> closed
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from .messages import State

Phase = Literal[
    "stopped", "starting", "ready", "recycling", "failed", "backoff",
    "offline", "held", "closing", "closed",
]
Event = Literal[
    "start",  # processes are being launched
    "up",  # a process listens (or the ready set changed): publish it
    "failure",  # a process crashed or a start failed (already counted)
    "rest",  # a start was asked for while the rapid-fail window is full
    "recycle",  # an overlapped restart begins
    "recycled",  # it ended (replaced, or gave up keeping the old process)
    "idle",  # nothing asked for the app for idle_timeout: stop it
    "offline",  # app_offline.htm appeared or changed
    "online",  # app_offline.htm went away
    "admin_stop",  # POST /apps/NAME/stop
    "admin_start",  # POST /apps/NAME/start
    "close",  # Bastion stops the app for good; processes are being stopped
    "closed",  # every process is gone
]

PHASES: Final[tuple[Phase, ...]] = (
    "stopped", "starting", "ready", "recycling", "failed", "backoff",
    "offline", "held", "closing", "closed",
)
EVENTS: Final[tuple[Event, ...]] = (
    "start", "up", "failure", "rest", "recycle", "recycled", "idle", "offline",
    "online", "admin_stop", "admin_start", "close", "closed",
)

PUBLISHED: Final[dict[Phase, State]] = {
    "stopped": "stopped",
    "starting": "starting",
    "ready": "ready",
    "recycling": "ready",
    "failed": "failed",
    "backoff": "backoff",
    "offline": "offline",
    "held": "offline",
    "closing": "draining",
    "closed": "stopped",
}

# Phases in which no process may be launched or kept: a process that becomes ready
# then is stopped at once by the controller.
NO_PROCESSES: Final[frozenset[Phase]] = frozenset({"offline", "held", "closing", "closed"})


@dataclass(frozen=True)
class Facts:
    """What a guard may look at, as the controller sees it after the event happened."""

    serving: int = 0  # ready processes taking requests
    launching: int = 0  # processes started and not yet ready
    resting: bool = False  # the rapid-fail window is full now
    offline_file: bool = False  # app_offline.htm is present


class IllegalTransition(Exception):
    """``event`` may not happen in ``phase``."""

    def __init__(self, phase: Phase, event: Event) -> None:
        super().__init__(f"event {event!r} is not allowed in phase {phase!r}")
        self.phase = phase
        self.event = event


Guard = Callable[[Phase, Facts], Phase]


def _after_failure(phase: Phase, facts: Facts) -> Phase:
    """A crash or failed start: keep serving if others do, else rest, wait or fail."""
    if facts.serving:
        return phase if phase in ("ready", "recycling") else "ready"
    if facts.resting:
        return "backoff"
    if facts.launching:
        return "starting"
    return "failed"


def _after_admin_start(phase: Phase, facts: Facts) -> Phase:
    """Released by the administrator: app_offline.htm, if present, still holds it."""
    return "offline" if facts.offline_file else "stopped"


# Every live phase may be taken offline, stopped by the administrator or closed.
_ALWAYS: Final[dict[Event, Phase | Guard]] = {
    "offline": "offline",
    "admin_stop": "held",
    "close": "closing",
    "closed": "closed",
}

TRANSITIONS: Final[dict[Phase, dict[Event, Phase | Guard]]] = {
    "stopped": {
        "start": "starting", "rest": "backoff", "failure": _after_failure, **_ALWAYS,
    },
    "starting": {
        "up": "ready", "failure": _after_failure, **_ALWAYS,
    },
    "ready": {
        "up": "ready", "failure": _after_failure, "recycle": "recycling", "idle": "stopped", **_ALWAYS,
    },
    "recycling": {
        "up": "recycling", "failure": _after_failure, "recycled": "ready", "idle": "stopped", **_ALWAYS,
    },
    "failed": {
        "start": "starting", "up": "ready", "rest": "backoff",
        "failure": _after_failure, **_ALWAYS,
    },
    "backoff": {
        "start": "starting", "up": "ready", "rest": "backoff",
        "failure": _after_failure, **_ALWAYS,
    },
    "offline": {
        "failure": "offline", "online": "stopped", **_ALWAYS,
    },
    "held": {
        "failure": "held", "offline": "held", "online": "held", "admin_stop": "held",
        "admin_start": _after_admin_start, "close": "closing", "closed": "closed",
    },
    # Late results of starts and crashes are absorbed once Bastion is stopping the app.
    "closing": {"failure": "closing", "close": "closing", "closed": "closed"},
    "closed": {"failure": "closed", "closed": "closed"},
}


def allowed(phase: Phase, event: Event) -> bool:
    """True when ``event`` may happen in ``phase``."""
    return event in TRANSITIONS[phase]


def transition(phase: Phase, event: Event, facts: Facts | None = None) -> Phase:
    """The phase after ``event`` in ``phase``; ``IllegalTransition`` when not allowed."""
    target = TRANSITIONS[phase].get(event)
    if target is None:
        raise IllegalTransition(phase, event)
    if callable(target):
        return target(phase, facts or Facts())
    return target
