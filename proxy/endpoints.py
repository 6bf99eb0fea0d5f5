"""The proxy's view of the apps: the latest ``AppState`` per app, and waiting for one.

Theory of operation
-------------------
The module publishes ``AppState`` snapshots; ``EndpointTable.update`` keeps the newest
per app and wakes everything waiting on that app. ``acquire`` is what a request calls:

* ready with endpoints: take the least busy one (fewest requests in flight here);
* offline: 503 with the offline page; backoff (rapid-fail) still in force: 503 with
  ``Retry-After``;
* otherwise ask the module (``NeedApp``) once, remember the version of the state it saw,
  and wait for updates. A ``failed`` or ``stopped`` state *newer* than that version
  means the start this request waited for failed: 502 with the module's reason. An
  older ``failed`` is history, and is why it asked.

The table never starts anything and never talks to sockets; it only sends messages.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from module.messages import AppState, Endpoint, EndpointFailed, NeedApp

from .errors import BadGateway, Unavailable

Send = Callable[[NeedApp | EndpointFailed], None]


@dataclass
class _AppView:
    state: AppState
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: dict[int, int] = field(default_factory=dict)  # pid -> requests
    served: dict[int, int] = field(default_factory=dict)  # pid -> requests, since start


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
        """Tell the module this endpoint could not be reached."""
        self._table.send(EndpointFailed(self.app, self.endpoint.pid, error))


class EndpointTable:
    """Latest state of each app, as a proxy worker knows it."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self._apps: dict[str, _AppView] = {}

    def update(self, state: AppState) -> None:
        """Take a snapshot from the module and wake the requests waiting on it."""
        view = self._apps.get(state.app)
        if view is None:
            self._apps[state.app] = _AppView(state)
            return
        if state.version < view.state.version:
            return  # out of order: keep the newer picture
        view.state = state
        live = {e.pid for e in state.endpoints}
        for pid in [p for p in view.in_flight if p not in live and view.in_flight[p] == 0]:
            del view.in_flight[pid]
        view.changed.set()
        view.changed = asyncio.Event()

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
        deadline = time.monotonic() + wait_limit
        asked_version: int | None = None
        while True:
            st = view.state
            if st.state == "ready" and st.endpoints:
                return self._take(app, view, st)
            if st.state == "offline":
                raise Unavailable(f"the app {app!r} is offline", app=app, body=st.offline_body)
            if st.state == "backoff" and st.retry_at is not None:
                wait = st.retry_at - time.time()
                if wait > 0:
                    raise Unavailable(
                        f"the app {app!r} failed too often and is resting",
                        app=app,
                        detail=f"{st.reason}\n{st.detail}".strip(),
                        retry_after=max(1, math.ceil(wait)),
                    )
            if asked_version is not None and st.version > asked_version:
                if st.state in ("failed", "stopped"):
                    raise BadGateway(
                        f"the app {app!r} failed to start: {st.reason}" if st.reason
                        else f"the app {app!r} is not running",
                        app=app,
                        detail=st.detail,
                    )
            if asked_version is None or st.state in ("failed", "stopped", "backoff"):
                if asked_version is None or st.version > asked_version:
                    asked_version = st.version
                    self.send(NeedApp(app))
                    if view.state.version != st.version:
                        continue  # the module answered at once (same event loop)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BadGateway(f"the app {app!r} did not become ready in time", app=app)
            event = view.changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                continue

    def _take(self, app: str, view: _AppView, st: AppState) -> Lease:
        endpoint = min(st.endpoints, key=lambda e: view.in_flight.get(e.pid, 0))
        view.in_flight[endpoint.pid] = view.in_flight.get(endpoint.pid, 0) + 1
        view.served[endpoint.pid] = view.served.get(endpoint.pid, 0) + 1
        return Lease(self, app, endpoint)

    def _release(self, app: str, pid: int) -> None:
        view = self._apps.get(app)
        if view is not None and pid in view.in_flight:
            view.in_flight[pid] = max(0, view.in_flight[pid] - 1)
