"""The slot granter: ``max_concurrency`` and ``max_queue`` for the whole Bastion.

Theory of operation
-------------------
Each proxy worker (a process of its own with ``workers: N``) sees only its own requests.
So that a limit holds for the whole Bastion, the main process keeps one ``SlotGranter``
and every request that cannot be served by its worker alone asks it for a *slot*: a
place on one app process. A worker sends ``SlotWanted(app, worker, ticket)``; the
granter answers that worker with ``SlotGranted(..., endpoint)`` or ``SlotRefused`` (the
queue is full: 503); the worker sends ``SlotFreed`` when the request is done or stops
waiting (timed out, cancelled, its start failed), whichever it was.

A worker asks whenever the app has a ``max_concurrency`` (each such request costs one
round trip to the main process; with ``workers: 1`` it is a function call in the same
loop), and whenever the app is not ready (the request waits for a start anyway). A
ready app without a limit is served by the worker alone (least busy of its own
requests): the fast path costs nothing here.

Per app the granter keeps:

* the endpoints of the newest ``AppState`` (it is told every state after the workers);
* requests in flight per process (granted, not yet freed), for the whole Bastion;
* one FIFO queue of waiting tickets, in the order the wants reached the main process.

A want is granted at once when the app is ready, nobody waits before it and a process
is below ``max_concurrency`` (any process when there is no limit); otherwise it waits,
unless ``max_queue`` tickets already wait: then it is refused. Each free slot (a
request freed, a new ready state, a new limit) goes to the head of the queue. The
process chosen is the least busy one below the limit, a process that refused a
connection a moment ago (``EndpointFailed``) last. A ticket on a process that is gone
from the state still counts until it is freed (the request is still running there).

What the granter does not do: it never fails a waiting request. The worker knows the
app's state too and settles its own waiters (502 for a start that failed, 503 for
offline / backoff, 503 when it waited longer than its wait limit) and frees their
tickets. A worker that dies cannot free its tickets: the main process calls
``worker_gone`` and its queued tickets are dropped and its slots given back; anything
that still arrives from that worker afterwards is ignored, so nothing leaks.

Everything here is pure: methods take a message and return the answers to send as
``(worker, message)`` pairs; time comes from the ``clock`` given (``time.monotonic``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.module.messages import (
    AppState,
    Endpoint,
    SlotFreed,
    SlotGranted,
    SlotRefused,
    SlotWanted,
)

from ..edge.endpoints import SUSPEND_FOR, QueueLimits

Answer = tuple[int, SlotGranted | SlotRefused]  # (worker, message to that worker)
Ticket = tuple[int, int]  # (worker, ticket)


@dataclass
class _App:
    limits: QueueLimits
    ready: bool = False
    endpoints: tuple[Endpoint, ...] = ()
    version: int = -1
    queue: OrderedDict[Ticket, None] = field(default_factory=OrderedDict)  # FIFO
    granted: dict[Ticket, int] = field(default_factory=dict)  # ticket -> pid
    in_flight: dict[int, int] = field(default_factory=dict)  # pid -> granted tickets
    suspended: dict[int, float] = field(default_factory=dict)  # pid -> until (clock)


class SlotGranter:
    """Grants request slots on app processes for every worker of one Bastion."""

    def __init__(self, limits: dict[str, QueueLimits] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._apps: dict[str, _App] = {}
        self._gone: set[int] = set()
        self.configure(limits or {})

    # -- configuration and states -------------------------------------------------------
    def configure(self, limits: dict[str, QueueLimits]) -> list[Answer]:
        """Take the limits of a (new) configuration; apps not in it are forgotten once
        nothing of theirs is waiting or in flight. A raised limit frees slots."""
        answers: list[Answer] = []
        for name, app_limits in limits.items():
            app = self._apps.get(name)
            if app is None:
                self._apps[name] = _App(app_limits)
            else:
                app.limits = app_limits
                answers += self._dispatch(name, app)
        for name in [n for n in self._apps if n not in limits]:
            app = self._apps[name]
            if not app.queue and not app.granted:
                del self._apps[name]
        return answers

    def update(self, state: AppState) -> list[Answer]:
        """A new ``AppState`` (told to the workers first): who may get slots now."""
        app = self._apps.get(state.app)
        if app is None:
            app = self._apps[state.app] = _App(QueueLimits())
        if state.version < app.version:
            return []
        app.version = state.version
        app.ready = state.state == "ready"
        app.endpoints = state.endpoints
        live = {e.pid for e in state.endpoints}
        for pid in [p for p, n in app.in_flight.items() if n == 0 and p not in live]:
            del app.in_flight[pid]
        for pid in [p for p in app.suspended if p not in live]:
            del app.suspended[pid]
        return self._dispatch(state.app, app)

    def endpoint_failed(self, app_name: str, pid: int) -> None:
        """A worker could not reach ``pid``: choose it last for ``SUSPEND_FOR`` seconds."""
        app = self._apps.get(app_name)
        if app is not None:
            app.suspended[pid] = self._clock() + SUSPEND_FOR

    # -- from the workers ---------------------------------------------------------------
    def handle(self, message: SlotWanted | SlotFreed) -> list[Answer]:
        """A worker's ``SlotWanted`` or ``SlotFreed``."""
        if isinstance(message, SlotWanted):
            return self.want(message)
        return self.free(message)

    def want(self, message: SlotWanted) -> list[Answer]:
        """Grant at once, queue, or refuse (queue full)."""
        if message.worker in self._gone:
            return []
        ticket = (message.worker, message.ticket)
        app = self._apps.get(message.app)
        if app is None:
            return [(message.worker, SlotRefused(message.app, message.worker,
                                                 message.ticket, 1, "unknown app"))]
        if ticket in app.queue or ticket in app.granted:
            return []  # a duplicate: already being answered
        if not app.queue:
            endpoint = self._free_endpoint(app)
            if endpoint is not None:
                return [self._grant(message.app, app, ticket, endpoint)]
        if len(app.queue) >= app.limits.max_queue:
            return [(message.worker, SlotRefused(message.app, message.worker,
                                                 message.ticket, 1, "queue full"))]
        app.queue[ticket] = None
        return []

    def free(self, message: SlotFreed) -> list[Answer]:
        """A ticket is done: withdraw it from the queue, or give its slot to the next."""
        app = self._apps.get(message.app)
        if app is None:
            return []
        ticket = (message.worker, message.ticket)
        if ticket in app.queue:
            del app.queue[ticket]
            return []  # it was waiting: nothing else changes
        pid = app.granted.pop(ticket, None)
        if pid is None:
            return []  # unknown or already freed: idempotent
        self._release(app, pid)
        return self._dispatch(message.app, app)

    def worker_gone(self, worker: int) -> list[Answer]:
        """``worker`` died or was stopped: drop what it queued, free what it held."""
        self._gone.add(worker)
        answers: list[Answer] = []
        for name, app in list(self._apps.items()):
            for ticket in [t for t in app.queue if t[0] == worker]:
                del app.queue[ticket]
            held = [t for t in app.granted if t[0] == worker]
            for ticket in held:
                self._release(app, app.granted.pop(ticket))
            if held:
                answers += self._dispatch(name, app)
        return answers

    # -- observing ------------------------------------------------------------------
    def in_flight(self, app_name: str) -> dict[int, int]:
        """pid -> granted slots of ``app_name`` now (whole Bastion)."""
        app = self._apps.get(app_name)
        return {} if app is None else {p: n for p, n in app.in_flight.items() if n}

    def waiting(self, app_name: str) -> list[Ticket]:
        """The queued ``(worker, ticket)`` of ``app_name``, first first."""
        app = self._apps.get(app_name)
        return [] if app is None else list(app.queue)

    # -- inside ---------------------------------------------------------------------
    def _free_endpoint(self, app: _App) -> Endpoint | None:
        """The least busy ready process below the limit (suspended ones last), or None."""
        if not app.ready:
            return None
        limit = app.limits.max_concurrency
        now = self._clock()
        best: Endpoint | None = None
        best_key = (True, 0)
        for endpoint in app.endpoints:
            load = app.in_flight.get(endpoint.pid, 0)
            if limit and load >= limit:
                continue
            key = (app.suspended.get(endpoint.pid, 0.0) > now, load)
            if best is None or key < best_key:
                best, best_key = endpoint, key
        return best

    def _grant(self, name: str, app: _App, ticket: Ticket, endpoint: Endpoint) -> Answer:
        app.granted[ticket] = endpoint.pid
        app.in_flight[endpoint.pid] = app.in_flight.get(endpoint.pid, 0) + 1
        worker, number = ticket
        return worker, SlotGranted(name, worker, number, endpoint)

    @staticmethod
    def _release(app: _App, pid: int) -> None:
        left = app.in_flight.get(pid, 0) - 1
        if left > 0:
            app.in_flight[pid] = left
        elif pid in {e.pid for e in app.endpoints}:
            app.in_flight[pid] = 0
        else:
            app.in_flight.pop(pid, None)

    def _dispatch(self, name: str, app: _App) -> list[Answer]:
        answers: list[Answer] = []
        while app.queue:
            endpoint = self._free_endpoint(app)
            if endpoint is None:
                break
            ticket, _ = app.queue.popitem(last=False)
            answers.append(self._grant(name, app, ticket, endpoint))
        return answers

