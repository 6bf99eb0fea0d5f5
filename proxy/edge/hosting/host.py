"""The in-process apps of one proxy worker: loading, refusing, calling, reporting.

Theory of operation
-------------------
A worker process makes one ``Host`` for the ``hosting_model: in_process`` apps of its
configuration. ``start`` (after the worker dropped its privileges and began listening)
begins loading each app in the background: the import runs in a thread of its own
(``loader``; a slow import never holds up the worker's event loop, its other apps or its
proxying), then the WSGI thread pool is made or the ASGI lifespan startup runs, and the
module is told what came of it (``HostedReport``: loaded, or failed with the
traceback). A request for an app still loading waits for that load (``loading``), as a
request for an out-of-process app waits for its process to start. A load is bounded
by the app's own ``startup_time_limit``, import and lifespan startup together: past it
the load has failed (an import thread still running is waited for by the next attempt,
never started twice; a lifespan startup is cancelled). One app failing leaves the
others serving.

The module stays the authority over whether an app may be called at all: the flow asks
``refusal`` first, which applies the module's latest ``AppState`` (offline, stopped by
the administrator, rapid-fail backoff: 503 as for an out-of-process app) before this
worker's own record (a failed import: 502 with the reason, the traceback on the page
only with ``detailed_errors``). A failed app is imported again by the next request (which waits
for that attempt; ``loading``), at most once per ``RETRY_EVERY`` seconds, as an
out-of-process app is started again by the next request; each failure counts in the module's rapid-fail window, which
eventually answers 503 with ``Retry-After`` for everybody.

``call`` builds the scope (``scope``) and starts an ``AsgiCall`` or ``WsgiCall`` for the
flow. With a ``health_check``, a loaded app is also called every ``interval`` with a
``GET`` of its health path (under its path base) through the same calls, in-process, with
no socket (``_HealthProbe`` is the flow's side); a check fails by the module's rule for an
app process (``module.health.verdict``: status >= 500) or when no answer begins within
``timeout``. Failures, and the first pass after them, go to the module
(``HealthReport``), which counts them and replaces this worker when they are too many. The worker's requests served and in flight per app go to the module as a
``UsageReport`` for this worker's pid (``bastion status``, ``max_requests``) at most
every ``REPORT_EVERY`` seconds, when they changed. ``stop`` runs the lifespan shutdown
and lets the thread pools finish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from bastion.module.health import verdict
from bastion.module.messages import (
    FromProxy,
    HealthReport,
    HostedReport,
    ProcessUsage,
    UsageReport,
)
from bastion.module.spec import AppSpec, HealthCheck

from ..errors import BadGateway, ProxyError, Unavailable
from ..flow import normalised_path
from ..upstream import ResponseHead
from . import scope as scopes
from .asgi import AsgiCall, Lifespan
from .loader import LoadFailed, load
from .websocket import WebSocketCall
from .wsgi import WsgiCall

if TYPE_CHECKING:
    from ..endpoints import EndpointTable
    from ..flow import Flow, HostedCall

log = logging.getLogger("bastion.hosted")

Send = Callable[[FromProxy], None]
RETRY_EVERY = 0.5  # a failed import is tried again at most this often per worker
REPORT_EVERY = 0.25
QUEUE_MARGIN = 5.0  # a request waits for a slot startup_time_limit + this, as out of process


def _expire(future: asyncio.Future[ProxyError | None], error: ProxyError) -> None:
    if not future.done():
        future.set_result(error)


async def _abandon(lifespan: Lifespan) -> None:
    """End the lifespan task of a startup that failed or took too long (at once: the
    shutdown's limit 0 cancels it if it still runs)."""
    await lifespan.shutdown(0)


class _HealthProbe:
    """The flow's side of one health check call: it only wants the status."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answered: asyncio.Future[str | None] = loop.create_future()

    def _settle(self, outcome: str | None) -> None:
        if not self.answered.done():
            self.answered.set_result(outcome)

    def upstream_head(self, head: ResponseHead) -> None:
        self._settle(verdict(head.status))

    def upstream_body(self, data: bytes) -> None:
        del data

    def upstream_end(self) -> None:
        self._settle("the app returned without a response")  # only before a head

    def upstream_writable(self, writable: bool) -> None:
        del writable

    def hosted_failed(self, error: ProxyError) -> None:
        self._settle(f"status {error.status}: {error}")


class _Waiter:
    """A request waiting for one of the app's ``max_concurrency`` slots in this worker."""

    __slots__ = ("future", "timer")

    def __init__(self, future: asyncio.Future[ProxyError | None],
                 timer: asyncio.TimerHandle) -> None:
        self.future = future
        self.timer = timer


class HostedApp:
    """One in-process app in this worker."""

    def __init__(self, spec: AppSpec) -> None:
        self.spec = spec
        self.target: Any = None  # the imported callable, once loaded
        self.reason = ""  # why it failed, when it did
        self.detail = ""
        self.tried_at = 0.0
        self.lifespan: Lifespan | None = None
        self.state: dict[str, Any] = {}  # the lifespan's state, copied into each scope
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.served = 0
        self.in_flight = 0
        self.loading: asyncio.Future[bool] | None = None  # an attempt under way
        self.importing: asyncio.Future[Any] | None = None  # its import thread's outcome
        # max_concurrency / max_queue, per worker process (one process hosting the app)
        self.limit = spec.settings.max_concurrency
        self.queue_limit = spec.settings.max_queue
        self.reserved = 0  # slots handed to waiters that have not called yet
        self.waiting: deque[_Waiter] = deque()
        self.checker: asyncio.Task[None] | None = None  # its health checks, when on

    @property
    def loaded(self) -> bool:
        """Imported (and its lifespan started, when it has one)."""
        return self.target is not None


class Host:
    """The in-process apps of one worker."""

    def __init__(self, specs: Iterable[AppSpec], table: EndpointTable, send: Send,
                 worker: int = 0) -> None:
        self.apps = {spec.name: HostedApp(spec) for spec in specs if spec.in_process}
        self.table = table
        self.send = send
        self.worker = worker
        self.pid = os.getpid()
        self._dirty: set[str] = set()
        self._reporter: asyncio.TimerHandle | None = None
        # The worker's event loop, found once: asyncio.get_running_loop() makes a
        # getpid() system call each time in CPython 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    def __bool__(self) -> bool:
        return bool(self.apps)

    # -- loading --------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading every app in the background (the worker listens already)."""
        self.pid = os.getpid()
        self._loop = asyncio.get_running_loop()
        for hosted in self.apps.values():
            if not hosted.loaded and hosted.loading is None:
                hosted.loading = asyncio.ensure_future(self._load(hosted))

    async def _load(self, hosted: HostedApp) -> bool:
        try:
            return await self._import(hosted)
        finally:
            hosted.loading = None

    def _import_thread(self, spec: AppSpec) -> asyncio.Future[Any]:
        """Import ``spec``'s app in a daemon thread of its own (one per attempt that
        needs one): the future gets the callable or ``LoadFailed``. The thread sees the
        worker's loop as its event loop, as a module imported on the loop's thread would."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        def run() -> None:
            asyncio.set_event_loop(loop)
            value: Any = None
            error: BaseException | None = None
            try:
                value = load(spec)
            except LoadFailed as exc:
                error = exc
            except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt in the thread
                error = LoadFailed(f"importing {spec.app} failed: {type(exc).__name__}")
            with contextlib.suppress(RuntimeError):  # the worker's loop is closed
                loop.call_soon_threadsafe(settle, value, error)

        threading.Thread(target=run, name=f"bastion-import-{spec.name}", daemon=True).start()
        return future

    async def _import(self, hosted: HostedApp) -> bool:
        spec = hosted.spec
        limit = spec.settings.startup_time_limit
        hosted.tried_at = time.monotonic()
        self.send(HostedReport(spec.name, self.worker, self.pid, "loading"))
        deadline = hosted.tried_at + limit
        if hosted.importing is None:
            hosted.importing = self._import_thread(spec)
        importing = hosted.importing
        try:
            target = await asyncio.wait_for(asyncio.shield(importing), limit)
        except TimeoutError:
            # The thread cannot be stopped: the next attempt waits for it again.
            self._failed(hosted, f"loading took longer than startup_time_limit "
                         f"({limit:g}s): importing {spec.app} had not finished", "")
            return False
        except LoadFailed as exc:
            hosted.importing = None
            self._failed(hosted, exc.reason, exc.detail)
            return False
        hosted.importing = None
        if spec.interface == "asgi":
            lifespan = Lifespan(spec.name, target, hosted.state)
            left = max(0.0, deadline - time.monotonic())
            try:
                # The deadline is the load's: the lifespan's own limit never comes first.
                error = await asyncio.wait_for(lifespan.startup(left + 1.0), left)
            except TimeoutError:
                await _abandon(lifespan)
                self._failed(hosted, f"loading took longer than startup_time_limit "
                             f"({limit:g}s): the lifespan startup had not completed", "")
                return False
            except asyncio.CancelledError:
                await _abandon(lifespan)  # the worker stops while the app starts
                raise
            if error is not None:
                await _abandon(lifespan)
                self._failed(hosted, f"lifespan startup failed: {error.splitlines()[0]}",
                             error)
                return False
            hosted.lifespan = lifespan
        elif hosted.pool is None:
            hosted.pool = concurrent.futures.ThreadPoolExecutor(
                spec.threads, thread_name_prefix=f"bastion-{spec.name}")
        hosted.target = target
        hosted.reason = hosted.detail = ""
        log.info("app %s (%s %s) loaded in worker pid %d", spec.name, spec.interface,
                 spec.app, self.pid)
        self.send(HostedReport(spec.name, self.worker, self.pid, "loaded"))
        gc.freeze()  # the app's modules live as long as the worker (see worker.py)
        check = spec.settings.health_check
        if check is not None and hosted.checker is None:
            hosted.checker = asyncio.ensure_future(self._check_health(hosted, check))
        return True

    # -- health checks --------------------------------------------------------------------
    async def _check_health(self, hosted: HostedApp, check: HealthCheck) -> None:
        """Every ``interval`` after the last check ended: call the health path; tell the
        module of failures and of the first pass after them."""
        name = hosted.spec.name
        failing = False
        while True:
            await asyncio.sleep(check.interval)
            state = self.table.state(name)
            if state is not None and state.state in ("offline", "draining", "stopped"):
                continue  # not serving: nothing to check (as an app process stopped)
            try:
                why = await self.probe(name, check)
            except Exception as exc:  # noqa: BLE001 - a broken check is a failed one
                why = f"the check failed: {type(exc).__name__}: {exc}"
            if why is None:
                if failing:
                    self.send(HealthReport(name, self.worker, self.pid, True))
                failing = False
                continue
            failing = True
            log.warning("app %s: health check %s failed in worker pid %d: %s", name,
                        check.path, self.pid, why)
            self.send(HealthReport(name, self.worker, self.pid, False, why))

    async def probe(self, app: str, check: HealthCheck) -> str | None:
        """One health check of ``app``: ``GET`` its health path through the hosting call
        path, in this worker; None when healthy, else why not."""
        hosted = self.apps[app]
        spec = hosted.spec
        if not hosted.loaded:
            return "the app is not loaded"
        loop = self._loop or asyncio.get_running_loop()
        target = spec.path_base + check.path
        path = urllib.parse.unquote(target.partition("?")[0])
        head = scopes.Head("GET", target, path,
                           [(b"host", b"localhost"), (b"user-agent", b"bastion-health-check"),
                            (b"accept", b"*/*")], "127.0.0.1", 0, "1.1", False)
        facts = scopes.Facts("http", "localhost", 80, spec.path_base)
        side = _HealthProbe(loop)
        call: AsgiCall | WsgiCall
        if spec.interface == "wsgi":
            assert hosted.pool is not None
            call = WsgiCall(app, hosted.target, scopes.wsgi_environ(head, facts), side, [],
                            True, hosted.pool, loop=loop)
        else:
            call = AsgiCall(app, hosted.target, scopes.http_scope(head, facts, hosted.state),
                            side, [], True, loop=loop)
        call.start()
        try:
            return await asyncio.wait_for(asyncio.shield(side.answered), check.timeout)
        except TimeoutError:
            return f"no answer within {check.timeout:g}s"
        finally:
            call.close(abort=not call.complete)

    def _failed(self, hosted: HostedApp, reason: str, detail: str) -> None:
        hosted.target = None
        hosted.reason = reason
        hosted.detail = detail
        log.error("app %s failed to load in worker pid %d: %s\n%s", hosted.spec.name,
                  self.pid, reason, detail)
        self.send(HostedReport(hosted.spec.name, self.worker, self.pid, "failed", reason,
                               detail))

    # -- serving --------------------------------------------------------------------------
    def refusal(self, app: str) -> ProxyError | None:
        """Why ``app`` cannot be called now (an error for the client), else None."""
        hosted = self.apps[app]
        state = self.table.state(app)
        if state is not None:
            if state.state == "offline":
                return Unavailable(state.reason or f"the app {app!r} is offline", app=app,
                                   body=state.offline_body)
            if state.state in ("draining", "stopped"):
                return Unavailable(f"the app {app!r} is stopping", app=app, retry_after=1)
            if state.state == "backoff" and state.retry_at is not None:
                wait = state.retry_at - time.monotonic()
                if wait > 0:
                    return Unavailable(f"the app {app!r} failed too often and is resting",
                                       app=app, detail=f"{state.reason}\n{state.detail}".strip(),
                                       retry_after=max(1, int(wait + 0.999)))
        if hosted.loaded or hosted.loading is not None:
            return None
        if time.monotonic() - hosted.tried_at < RETRY_EVERY:
            return self.failure(app)
        return None

    def failure(self, app: str) -> ProxyError:
        """The 502 of an app that failed to load in this worker."""
        hosted = self.apps[app]
        return BadGateway(f"the app {app!r} failed to load: {hosted.reason}", app=app,
                          detail=hosted.detail)

    def loading(self, app: str) -> asyncio.Future[bool] | None:
        """None when ``app`` is loaded; else the attempt to load it (started now, or the
        one under way), which a request waits for as for an app process's start."""
        hosted = self.apps[app]
        if hosted.loaded:
            return None
        if hosted.loading is None:
            hosted.loading = asyncio.ensure_future(self._load(hosted))
        return hosted.loading

    def websockets(self, app: str) -> bool:
        """Whether ``app`` takes WebSocket upgrades itself (an ASGI app)."""
        return self.apps[app].spec.interface == "asgi"

    # -- max_concurrency and max_queue (per worker) ---------------------------------------
    def admit(self, app: str) -> asyncio.Future[ProxyError | None] | None:
        """None when a request of ``app`` may be called now; else a future it waits on
        for a slot (None: granted, else the 503 to answer). ``Unavailable`` (503) when
        ``max_queue`` requests of this worker wait already."""
        hosted = self.apps[app]
        if not hosted.limit:
            return None
        if not hosted.waiting and hosted.in_flight + hosted.reserved < hosted.limit:
            return None
        live = sum(1 for w in hosted.waiting if not w.future.done())
        if live >= hosted.queue_limit:
            raise Unavailable(f"the app {app!r} is busy: {live} requests wait already",
                              app=app, retry_after=1)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ProxyError | None] = loop.create_future()
        limit = hosted.spec.settings.startup_time_limit + QUEUE_MARGIN
        timer = loop.call_later(limit, _expire, future, Unavailable(
            f"the app {app!r} was busy for {limit:g}s", app=app, retry_after=1))
        hosted.waiting.append(_Waiter(future, timer))
        return future

    def unreserve(self, app: str) -> None:
        """A granted slot's request ended before it called the app: the slot goes on."""
        hosted = self.apps[app]
        hosted.reserved -= 1
        self._grant(hosted)

    def _grant(self, hosted: HostedApp) -> None:
        while hosted.waiting and hosted.in_flight + hosted.reserved < hosted.limit:
            waiter = hosted.waiting.popleft()
            waiter.timer.cancel()
            if not waiter.future.done():
                hosted.reserved += 1
                waiter.future.set_result(None)

    def queued(self, app: str) -> int:
        """Requests of ``app`` waiting for a slot in this worker."""
        return sum(1 for w in self.apps[app].waiting if not w.future.done())

    def call(self, app: str, flow: Flow, pending: list[bytes], body_end: bool,
             reserved: bool = False) -> HostedCall:
        """Start ``flow``'s request in ``app`` (which ``refusal`` let through; with
        ``reserved`` it holds a slot ``admit`` granted)."""
        hosted = self.apps[app]
        if reserved:
            hosted.reserved -= 1
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        spec = hosted.spec
        request = flow.request
        site = flow.site
        version = request.version[5:]
        head = scopes.Head(request.method, request.target, normalised_path(request.path),
                           request.headers,
                           request.client_ip, request.client_port,
                           "2" if version == "2.0" else version, request.trusted)
        facts = scopes.Facts(site.scheme, scopes.host_name(request.host), site.port,
                             spec.path_base)
        hosted.in_flight += 1
        self._changed(app)

        def done() -> None:
            hosted.in_flight -= 1
            hosted.served += 1
            self._changed(app)
            if hosted.waiting:
                self._grant(hosted)

        if request.upgrade:
            key = next((v for n, v in request.headers
                        if n.lower() == b"sec-websocket-key"), b"")
            return WebSocketCall(app, hosted.target,
                                 scopes.websocket_scope(head, facts, hosted.state), flow,
                                 key, done, loop)
        if spec.interface == "wsgi":
            assert hosted.pool is not None
            return WsgiCall(app, hosted.target, scopes.wsgi_environ(head, facts), flow,
                            pending, body_end, hosted.pool, done, loop)
        return AsgiCall(app, hosted.target, scopes.http_scope(head, facts, hosted.state),
                        flow, pending, body_end, done=done, loop=loop)

    # -- usage reports ----------------------------------------------------------------------
    def _changed(self, app: str) -> None:
        self._dirty.add(app)
        if self._reporter is None:
            self._reporter = (self._loop or asyncio.get_running_loop()).call_later(
                REPORT_EVERY, self.flush)

    def flush(self) -> None:
        """Send the usage of every app whose counters changed."""
        self._reporter = None
        dirty, self._dirty = self._dirty, set()
        for app in dirty:
            hosted = self.apps[app]
            self.send(UsageReport(app, self.worker, (
                ProcessUsage(self.pid, hosted.served, hosted.in_flight),)))

    def in_flight(self, app: str) -> int:
        """Requests of ``app`` this worker is serving now."""
        return self.apps[app].in_flight

    # -- stopping -------------------------------------------------------------------------
    async def stop(self) -> None:
        """Lifespan shutdown of every ASGI app, all at once, each bounded by its own
        ``shutdown_time_limit`` (then its lifespan task is cancelled); the WSGI pools
        finish their threads."""
        if self._reporter is not None:
            self._reporter.cancel()
        self.flush()
        for hosted in self.apps.values():
            if hosted.loading is not None:
                hosted.loading.cancel()  # a load under way is abandoned
            if hosted.checker is not None:
                hosted.checker.cancel()
        await asyncio.gather(*(self._shut_down(h) for h in self.apps.values()))

    async def _shut_down(self, hosted: HostedApp) -> None:
        if hosted.lifespan is not None:
            error = await hosted.lifespan.shutdown(hosted.spec.settings.shutdown_time_limit)
            if error is not None:
                log.error("app %s: %s", hosted.spec.name, error)
        if hosted.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, hosted.pool.shutdown)
