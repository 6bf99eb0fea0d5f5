"""The proxy's view of the apps: latest ``AppState`` per app, the request queue, usage.

Theory of operation
-------------------
The module publishes ``AppState`` snapshots; ``EndpointTable.update`` keeps the newest
per app. A request calls ``acquire``:

* offline: 503 with the offline page; backoff (rapid-fail) still in force: 503 with
  ``Retry-After``;
* ready, nobody queued, and a process below ``max_concurrency``: take the least busy one
  (fewest requests in flight from this worker);
* otherwise wait in the app's FIFO queue (at most ``max_queue`` waiters, else 503). A
  waiter that found the app not ready asks the module to start it (``NeedApp``) and
  remembers the state's version. A ``failed`` state newer than that means the start it
  waited for failed: 502 with the module's reason. A waiter that queued behind busy
  processes of a ready app is not failed by a crash: the app is asked to start again.

Releasing a lease or a new ready state hands free processes to waiters in arrival order.
The table counts requests served and in flight per process and reports them to the
module (``UsageReport``) at most every ``REPORT_EVERY`` seconds, when they changed. It
never starts anything and never touches sockets; it only sends messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from module.messages import (
    AppState,
    Endpoint,
    EndpointFailed,
    NeedApp,
    ProcessUsage,
    RequestTimedOut,
    ToModule,
    UsageReport,
)

from .errors import BadGateway, GatewayTimeout, ProxyError, Unavailable

Send = Callable[[ToModule], None]
REPORT_EVERY = 0.25
SUSPEND_FOR = 1.0  # a process that refused a connection gets no request for this long


@dataclass(frozen=True)
class QueueLimits:
    """Per-app limits on concurrency and waiting."""

    max_concurrency: int = 0  # requests one process serves at once; 0 = no limit
    max_queue: int = 100


@dataclass
class _Waiter:
    future: asyncio.Future[Endpoint]
    asked: int | None  # version at which it asked for a start; None: queued while ready
    saw_start: bool = False  # a start began after it asked: its failure is this one's


@dataclass
class _AppView:
    state: AppState
    limits: QueueLimits
    queue: deque[_Waiter] = field(default_factory=deque)
    in_flight: dict[int, int] = field(default_factory=dict)  # pid -> requests
    served: dict[int, int] = field(default_factory=dict)  # pid -> requests, since start
    suspended: dict[int, float] = field(default_factory=dict)  # pid -> until (monotonic)


class Lease:
    """An endpoint taken for one request; ``release`` when the request is done."""

    def __init__(self, table: EndpointTable, app: str, endpoint: Endpoint) -> None:
        self._table = table
        self.app = app
        self.endpoint = endpoint
        self._released = False

    def release(self) -> None:
        """Give the endpoint back (idempotent)."""
        if not self._released:
            self._released = True
            self._table._release(self.app, self.endpoint.pid)

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

    # -- from the module ------------------------------------------------------------
    def update(self, state: AppState) -> None:
        """Take a snapshot from the module, settle or serve the waiting requests."""
        view = self._apps.get(state.app)
        if view is None:
            self._apps[state.app] = _AppView(state, self._limits.get(state.app, QueueLimits()))
            return
        if state.version < view.state.version:
            return  # out of order: keep the newer picture
        view.state = state
        live = {e.pid for e in state.endpoints}
        for pid in [p for p, n in view.in_flight.items() if p not in live and n == 0]:
            del view.in_flight[pid]
            view.served.pop(pid, None)
        refusal = _refusal(state)
        if refusal is not None:
            if state.state == "backoff":
                self._settle_failure(view, state, ask=False)  # their own start failed: 502
            self._fail_all(view, refusal)
        elif state.state == "failed":
            self._settle_failure(view, state)
        elif state.state == "starting":
            for waiter in view.queue:
                if waiter.asked is not None:
                    waiter.saw_start = True
        elif state.state == "stopped" and view.queue:
            for waiter in view.queue:
                waiter.asked = state.version
            self.send(NeedApp(state.app))
        self._dispatch(view)

    def _settle_failure(self, view: _AppView, state: AppState, ask: bool = True) -> None:
        """502 for waiters whose start failed; the others ask for a new start."""
        error = BadGateway(
            f"the app {state.app!r} failed to start",
            app=state.app, detail=f"{state.reason}\n\n{state.detail}".strip(),
        )
        again = False
        for waiter in list(view.queue):
            if waiter.saw_start and waiter.asked is not None and waiter.asked < state.version:
                view.queue.remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(error)
            else:
                waiter.asked = state.version
                waiter.saw_start = False
                again = True
        if again and ask:
            self.send(NeedApp(state.app))

    @staticmethod
    def _fail_all(view: _AppView, error: ProxyError) -> None:
        while view.queue:
            waiter = view.queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)

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

    async def acquire(self, app: str, wait_limit: float) -> Lease:
        """An endpoint of ``app`` for one request, starting the app if need be."""
        view = self._apps.get(app)
        if view is None:
            raise BadGateway(f"the app {app!r} is not known to the process manager", app=app)
        st = view.state
        refusal = _refusal(st)
        if refusal is not None:
            raise refusal
        if st.state == "ready" and not view.queue:
            endpoint = self._free(view)
            if endpoint is not None:
                return self._lease(app, view, endpoint)
        if len(view.queue) >= view.limits.max_queue:
            raise Unavailable(f"too many requests are waiting for the app {app!r}",
                              app=app, retry_after=1)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), None)
        view.queue.append(waiter)
        if st.state != "ready":
            waiter.asked = st.version
            waiter.saw_start = st.state == "starting"
            if st.state != "starting":
                self.send(NeedApp(app))  # may update (and even settle) at once
        try:
            endpoint = await asyncio.wait_for(asyncio.shield(waiter.future), wait_limit)
        except TimeoutError:
            with contextlib.suppress(ValueError):
                view.queue.remove(waiter)
            if waiter.future.done() and not waiter.future.exception():
                self._release(app, waiter.future.result().pid)
            if view.state.state == "ready":
                raise GatewayTimeout(f"the app {app!r} was busy for {wait_limit:g}s",
                                     app=app) from None
            raise BadGateway(f"the app {app!r} did not become ready in time", app=app) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                view.queue.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled() \
                    and waiter.future.exception() is None:
                self._release(app, waiter.future.result().pid)
            raise
        return Lease(self, app, endpoint)

    def suspend(self, app: str, pid: int) -> None:
        """Send ``pid`` nothing for ``SUSPEND_FOR`` seconds while others can serve (like
        nginx's ``fail_timeout``); the module's next state settles it for good."""
        view = self._apps.get(app)
        if view is not None:
            view.suspended[pid] = time.monotonic() + SUSPEND_FOR

    def _free(self, view: _AppView) -> Endpoint | None:
        limit = view.limits.max_concurrency
        now = time.monotonic()
        best: Endpoint | None = None
        best_key = (True, 0)
        for endpoint in view.state.endpoints:
            load = view.in_flight.get(endpoint.pid, 0)
            if limit and load >= limit:
                continue
            key = (view.suspended.get(endpoint.pid, 0.0) > now, load)
            if best is None or key < best_key:
                best, best_key = endpoint, key
        return best

    def _take(self, app: str, view: _AppView, endpoint: Endpoint) -> None:
        view.in_flight[endpoint.pid] = view.in_flight.get(endpoint.pid, 0) + 1
        view.served[endpoint.pid] = view.served.get(endpoint.pid, 0) + 1
        self._touch(app)

    def _lease(self, app: str, view: _AppView, endpoint: Endpoint) -> Lease:
        self._take(app, view, endpoint)
        return Lease(self, app, endpoint)

    def _dispatch(self, view: _AppView) -> None:
        if view.state.state != "ready":
            return
        while view.queue:
            endpoint = self._free(view)
            if endpoint is None:
                return
            waiter = view.queue.popleft()
            if waiter.future.done():
                continue
            self._take(view.state.app, view, endpoint)
            waiter.future.set_result(endpoint)

    def _release(self, app: str, pid: int) -> None:
        view = self._apps.get(app)
        if view is None:
            return
        if pid in view.in_flight:
            view.in_flight[pid] = max(0, view.in_flight[pid] - 1)
        self._touch(app)
        self._dispatch(view)

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
