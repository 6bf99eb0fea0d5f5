"""The proxy's view of the apps: latest ``AppState`` per app, waiting requests, usage.

Theory of operation
-------------------
The module publishes ``AppState`` snapshots; ``EndpointTable.update`` keeps the newest
per app. A request calls ``try_acquire`` (the fast path, no waiting) and, when that
gives nothing, ``acquire``:

* offline: 503 with the offline page; backoff (rapid-fail) still in force: 503 with
  ``Retry-After``;
* ready, no ``max_concurrency``, nobody of this worker waiting: the least busy process
  (fewest requests in flight from this worker), at once, without asking anybody;
* otherwise the request waits for a *slot* from the main process's slot granter
  (``proxy/slots.py``): ``SlotWanted`` with a ticket of its own; ``SlotGranted`` names
  the process, ``SlotRefused`` means ``max_queue`` requests of the whole Bastion
  already wait (503). The granter keeps the one FIFO queue and the in-flight counts
  for every worker, so ``max_concurrency`` and ``max_queue`` hold for the whole
  Bastion. Releasing the lease (or giving up waiting) sends ``SlotFreed``.

While it waits, the table settles the request from the app's states, as before: a
waiter that found the app not ready asks the module to start it (``NeedApp``) and
remembers the state's version. A ``failed`` state newer than that means the start it
waited for failed: 502 with the module's reason. A waiter that queued behind busy
processes of a ready app is not failed by a crash: the app is asked to start again.
Offline or backoff: 503 for every waiter. A waiter whose ``wait_limit`` passes gets 503
with ``Retry-After`` when the app is ready (it waited in the queue and never reached
the app, like HAProxy's ``timeout queue``), 502 when the app did not become ready.

The table counts requests served and in flight per process (its own) and reports them
to the module (``UsageReport``) at most every ``REPORT_EVERY`` seconds, when they
changed. It never starts anything and never touches sockets; it only sends messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bastion.module.messages import (
    AppState,
    Endpoint,
    EndpointFailed,
    FromProxy,
    NeedApp,
    ProcessUsage,
    RequestTimedOut,
    SlotFreed,
    SlotGranted,
    SlotRefused,
    SlotWanted,
    ToProxy,
    UsageReport,
)
from bastion.module.spec import AppSpec

from .errors import BadGateway, ProxyError, Unavailable

Send = Callable[[FromProxy], None]
REPORT_EVERY = 0.25
SUSPEND_FOR = 1.0  # a process that refused a connection gets no request for this long


@dataclass(frozen=True)
class QueueLimits:
    """Per-app limits on concurrency and waiting."""

    max_concurrency: int = 0  # requests one process serves at once; 0 = no limit
    max_queue: int = 100


def queue_limits(apps: Iterable[AppSpec]) -> dict[str, QueueLimits]:
    """Each app's ``max_concurrency`` and ``max_queue``, by name."""
    return {spec.name: QueueLimits(spec.settings.max_concurrency, spec.settings.max_queue)
            for spec in apps}


@dataclass
class _Waiter:
    future: asyncio.Future[Endpoint]
    ticket: int
    asked: int | None  # version at which it asked for a start; None: queued while ready
    saw_start: bool = False  # a start began after it asked: its failure is this one's


@dataclass
class _AppView:
    state: AppState
    limits: QueueLimits
    waiting: dict[int, _Waiter] = field(default_factory=dict)  # ticket -> waiter, FIFO
    in_flight: dict[int, int] = field(default_factory=dict)  # pid -> requests
    served: dict[int, int] = field(default_factory=dict)  # pid -> requests, since start
    suspended: dict[int, float] = field(default_factory=dict)  # pid -> until (monotonic)
    # requests waiting for the module to withdraw a process they found gone: (pid, future)
    watching: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)


class Lease:
    """An endpoint taken for one request; ``release`` when the request is done."""

    __slots__ = ("_released", "_table", "app", "endpoint", "ticket")

    def __init__(self, table: EndpointTable, app: str, endpoint: Endpoint,
                 ticket: int | None = None) -> None:
        self._table = table
        self.app = app
        self.endpoint = endpoint
        self.ticket = ticket  # the granter's slot it holds; None: taken by this worker
        self._released = False

    def release(self) -> None:
        """Give the endpoint back (idempotent)."""
        if not self._released:
            self._released = True
            self._table._release(self.app, self.endpoint.pid, self.ticket)

    def failed(self, error: str) -> None:
        """This endpoint could not be reached: avoid it for a moment, tell the module."""
        self._table.suspend(self.app, self.endpoint.pid)
        self._table.send(EndpointFailed(self.app, self.endpoint.pid, error))

    def timed_out(self) -> None:
        """This endpoint did not answer within request_timeout (504): tell the module,
        which replaces a process that does so several times in a row."""
        self._table.send(RequestTimedOut(self.app, self.endpoint.pid))


class EndpointTable:
    """Latest state of each app, as one proxy worker knows it."""

    def __init__(self, send: Send, limits: dict[str, QueueLimits] | None = None,
                 worker: int = 0) -> None:
        self.send = send
        self.worker = worker
        self._limits = limits or {}
        self._apps: dict[str, _AppView] = {}
        self._dirty: set[str] = set()
        self._reporter: asyncio.Task[None] | None = None
        self._tickets = itertools.count(1)

    # -- from the main process ------------------------------------------------------
    def deliver(self, message: ToProxy) -> None:
        """Any message for the proxy: a state snapshot, or the answer to a slot."""
        if isinstance(message, AppState):
            self.update(message)
        elif isinstance(message, SlotGranted):
            self._granted(message)
        else:
            self._refused(message)

    def update(self, state: AppState) -> None:
        """Take a snapshot from the module, settle or re-ask for the waiting requests."""
        view = self._apps.get(state.app)
        if view is None:
            self._apps[state.app] = _AppView(state, self._limits.get(state.app, QueueLimits()))
            return
        if state.version < view.state.version:
            return  # out of order: keep the newer picture
        view.state = state
        live = {e.pid for e in state.endpoints}
        if view.watching:
            for pid, future in [w for w in view.watching if w[0] not in live]:
                view.watching.remove((pid, future))
                if not future.done():
                    future.set_result(None)
        for pid in [p for p, n in view.in_flight.items() if p not in live and n == 0]:
            del view.in_flight[pid]
            view.served.pop(pid, None)
        refusal = _refusal(state)
        if refusal is not None:
            if state.state == "backoff":
                self._settle_failure(view, state, ask=False)  # their own start failed: 502
            for waiter in list(view.waiting.values()):
                self._drop(view, waiter, refusal)
        elif state.state == "failed":
            self._settle_failure(view, state)
        elif state.state == "starting":
            for waiter in view.waiting.values():
                if waiter.asked is not None:
                    waiter.saw_start = True
        elif state.state == "stopped" and view.waiting:
            for waiter in view.waiting.values():
                waiter.asked = state.version
            self.send(NeedApp(state.app))

    def _settle_failure(self, view: _AppView, state: AppState, ask: bool = True) -> None:
        """502 for waiters whose start failed; the others ask for a new start."""
        error = BadGateway(
            f"the app {state.app!r} failed to start",
            app=state.app, detail=f"{state.reason}\n\n{state.detail}".strip(),
        )
        again = False
        for waiter in list(view.waiting.values()):
            if waiter.saw_start and waiter.asked is not None and waiter.asked < state.version:
                self._drop(view, waiter, error)
            else:
                waiter.asked = state.version
                waiter.saw_start = False
                again = True
        if again and ask:
            self.send(NeedApp(state.app))

    def _drop(self, view: _AppView, waiter: _Waiter, error: ProxyError) -> None:
        """End one waiter with ``error`` and withdraw its ticket."""
        if view.waiting.pop(waiter.ticket, None) is None:
            return  # answered meanwhile (a grant in the same loop)
        if not waiter.future.done():
            waiter.future.set_exception(error)
        self.send(SlotFreed(view.state.app, self.worker, waiter.ticket))

    def _granted(self, message: SlotGranted) -> None:
        view = self._apps.get(message.app)
        waiter = None if view is None else view.waiting.pop(message.ticket, None)
        if view is None or waiter is None:
            return  # it stopped waiting and sent SlotFreed already
        refusal = _refusal(view.state)
        if waiter.future.done() or refusal is not None:
            self.send(SlotFreed(message.app, self.worker, message.ticket))
            if not waiter.future.done() and refusal is not None:
                waiter.future.set_exception(refusal)
            return
        self._take(message.app, view, message.endpoint)
        waiter.future.set_result(message.endpoint)

    def _refused(self, message: SlotRefused) -> None:
        view = self._apps.get(message.app)
        waiter = None if view is None else view.waiting.pop(message.ticket, None)
        if waiter is not None and not waiter.future.done():
            why = (f"too many requests are waiting for the app {message.app!r}"
                   if message.reason == "queue full" else
                   f"the app {message.app!r} cannot take requests: {message.reason}")
            waiter.future.set_exception(
                Unavailable(why, app=message.app, retry_after=message.retry_after))

    # -- for requests ---------------------------------------------------------------
    def state(self, app: str) -> AppState | None:
        """The latest snapshot of ``app``."""
        view = self._apps.get(app)
        return None if view is None else view.state

    def counters(self, app: str) -> dict[int, tuple[int, int]]:
        """pid -> (in flight, served) for ``app``, as seen by this worker."""
        view = self._apps.get(app)
        if view is None:
            return {}
        pids = set(view.in_flight) | set(view.served)
        return {p: (view.in_flight.get(p, 0), view.served.get(p, 0)) for p in pids}

    def queued(self, app: str) -> int:
        """Requests of this worker waiting for ``app`` now."""
        view = self._apps.get(app)
        return len(view.waiting) if view is not None else 0

    def try_acquire(self, app: str) -> Lease | None:
        """An endpoint of ``app`` at once, or None when the request must wait (call
        ``acquire``): the app is not ready, has a ``max_concurrency`` (slots come from the
        main process) or requests of this worker wait for it. Raises what ``acquire``
        raises for an unknown, offline or resting (backoff) app."""
        view = self._apps.get(app)
        if view is None:
            raise BadGateway(f"the app {app!r} is not known to the process manager", app=app)
        if view.state.state != "ready" or view.waiting or view.limits.max_concurrency:
            refusal = _refusal(view.state)
            if refusal is not None:
                raise refusal
            return None
        endpoint = self._free(view)
        if endpoint is None:
            return None
        self._take(app, view, endpoint)
        return Lease(self, app, endpoint)

    async def acquire(self, app: str, wait_limit: float) -> Lease:
        """An endpoint of ``app`` for one request, starting the app if need be, waiting
        at most ``wait_limit`` seconds."""
        lease = self.try_acquire(app)
        if lease is not None:
            return lease
        view = self._apps[app]
        st = view.state
        waiter = _Waiter(asyncio.get_running_loop().create_future(), next(self._tickets), None)
        view.waiting[waiter.ticket] = waiter
        if st.state != "ready":
            waiter.asked = st.version
            waiter.saw_start = st.state == "starting"
        self.send(SlotWanted(app, self.worker, waiter.ticket))  # may be answered at once
        if st.state not in ("ready", "starting") and not waiter.future.done():
            self.send(NeedApp(app))  # may update (and even settle) at once
        if not waiter.future.done():
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), wait_limit)
            except TimeoutError:
                self._abandon(app, view, waiter)
                if view.state.state == "ready":
                    # It never reached the app: 503, come back (HAProxy's timeout queue).
                    raise Unavailable(f"the app {app!r} was busy: waited {wait_limit:g}s "
                                      "in its queue", app=app, retry_after=1) from None
                raise BadGateway(f"the app {app!r} did not become ready in time",
                                 app=app) from None
            except asyncio.CancelledError:
                self._abandon(app, view, waiter)
                raise
        return Lease(self, app, waiter.future.result(), waiter.ticket)

    def _abandon(self, app: str, view: _AppView, waiter: _Waiter) -> None:
        """The request stops waiting: withdraw its ticket, or give back what it got."""
        view.waiting.pop(waiter.ticket, None)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self._release(app, future.result().pid, waiter.ticket)
        else:
            self.send(SlotFreed(app, self.worker, waiter.ticket))

    async def withdrawn(self, app: str, pid: int, wait_limit: float) -> bool:
        """Wait until the module's state of ``app`` no longer lists ``pid`` (a process a
        request found gone, reported with ``Lease.failed``); False after ``wait_limit``."""
        view = self._apps.get(app)
        if view is None or all(e.pid != pid for e in view.state.endpoints):
            return True
        entry = (pid, asyncio.get_running_loop().create_future())
        view.watching.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), wait_limit)
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                view.watching.remove(entry)
        return True

    def suspend(self, app: str, pid: int) -> None:
        """Send ``pid`` nothing for ``SUSPEND_FOR`` seconds while others can serve (like
        nginx's ``fail_timeout``); the module's next state settles it for good."""
        view = self._apps.get(app)
        if view is not None:
            view.suspended[pid] = time.monotonic() + SUSPEND_FOR

    @staticmethod
    def _free(view: _AppView) -> Endpoint | None:
        """The least busy endpoint by this worker's count; one that refused a
        connection a moment ago only when there is no other."""
        endpoints = view.state.endpoints
        if len(endpoints) == 1 and not view.suspended:
            return endpoints[0]
        now = time.monotonic()
        best: Endpoint | None = None
        best_key = (True, 0)
        for endpoint in endpoints:
            key = (view.suspended.get(endpoint.pid, 0.0) > now,
                   view.in_flight.get(endpoint.pid, 0))
            if best is None or key < best_key:
                best, best_key = endpoint, key
        return best

    def _take(self, app: str, view: _AppView, endpoint: Endpoint) -> None:
        view.in_flight[endpoint.pid] = view.in_flight.get(endpoint.pid, 0) + 1
        view.served[endpoint.pid] = view.served.get(endpoint.pid, 0) + 1
        self._touch(app)

    def _release(self, app: str, pid: int, ticket: int | None) -> None:
        view = self._apps.get(app)
        if view is not None and pid in view.in_flight:
            view.in_flight[pid] = max(0, view.in_flight[pid] - 1)
            self._touch(app)
        if ticket is not None:
            self.send(SlotFreed(app, self.worker, ticket))  # may grant at once

    # -- usage reports --------------------------------------------------------------
    def _touch(self, app: str) -> None:
        self._dirty.add(app)
        if self._reporter is None or self._reporter.done():
            with contextlib.suppress(RuntimeError):
                self._reporter = asyncio.get_running_loop().create_task(self._report_soon())

    async def _report_soon(self) -> None:
        await asyncio.sleep(REPORT_EVERY)
        self.flush_reports()

    def flush_reports(self) -> None:
        """Send a ``UsageReport`` for every app whose counters changed."""
        dirty, self._dirty = self._dirty, set()
        for app in dirty:
            view = self._apps.get(app)
            if view is None:
                continue
            usage = tuple(
                ProcessUsage(pid, view.served.get(pid, 0), view.in_flight.get(pid, 0))
                for pid in sorted(set(view.served) | set(view.in_flight))
            )
            self.send(UsageReport(app, self.worker, usage))


def _refusal(state: AppState) -> ProxyError | None:
    """The 503 for an app that refuses requests now, or None."""
    if state.state == "offline":
        return Unavailable(state.reason or f"the app {state.app!r} is offline",
                           app=state.app, body=state.offline_body)
    if state.state == "backoff" and state.retry_at is not None:
        wait = state.retry_at - time.monotonic()  # CLOCK_MONOTONIC: system-wide
        if wait > 0:
            return Unavailable(
                f"the app {state.app!r} failed too often and is resting",
                app=state.app,
                detail=f"{state.reason}\n{state.detail}".strip(),
                retry_after=max(1, math.ceil(wait)),
            )
    return None
