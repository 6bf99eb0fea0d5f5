"""One ASGI request (and the lifespan) of an in-process app, wired to its flow.

Theory of operation
-------------------
``AsgiCall`` runs the app's coroutine for one ``http`` scope as a task of the worker's
event loop, the way uvicorn does. The flow is the other side: it feeds the request body
(``feed`` / ``feed_end``), says when the client cannot take more (``pause`` /
``resume``), and closes the call when the exchange is over (``close``).

* ``receive`` hands out the body pieces in order (``http.request``), then, once the
  response is complete or the client is gone, ``http.disconnect``. Body bytes buffered
  beyond ``BODY_HIGH`` pause reading from the client (the flow's
  ``upstream_writable(False)``) until the app has taken them below ``BODY_LOW``.
* ``send`` turns ``http.response.start`` / ``http.response.body`` into the flow's
  ``upstream_head`` / ``upstream_body`` / ``upstream_end``, exactly what an upstream
  connection calls, so framing, small-answer batching, HTTP/2 and the access log are the
  same as out of process. While the client's buffer is full, ``send`` waits: the app
  produces no faster than the client reads.
* An exception before the response began is a 500 (``AppFailed``: the traceback in the
  log, on the page only with ``detailed_errors``); after it, the client connection is cut
  as for a broken upstream. A ``close(abort=True)`` (``request_timeout``, the client
  went away, any failure) cancels the app's task; a normal end lets it run on (work the
  app does after its last body message, such as Starlette's background tasks).

``Lifespan`` runs the ``lifespan`` scope once per worker: startup before the worker
takes requests, shutdown at its stop. An app that raises on the lifespan scope before
starting up does not support it, which is fine (uvicorn's ``lifespan: auto``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from ..errors import AppFailed, ProxyError
from ..upstream import ResponseHead

log = logging.getLogger("bastion.hosted")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

BODY_HIGH = 256 * 1024  # request body bytes buffered before the client is paused
BODY_LOW = 64 * 1024


class FlowSide(Protocol):
    """What a hosted call needs of its flow (``proxy.edge.flow.Flow``)."""

    def upstream_head(self, head: ResponseHead) -> None:
        """The response head."""

    def upstream_body(self, data: bytes) -> None:
        """A piece of the response body."""

    def upstream_end(self) -> None:
        """The response is complete."""

    def upstream_writable(self, writable: bool) -> None:
        """The app can (not) take more of the request body."""

    def hosted_failed(self, error: ProxyError) -> None:
        """The app failed: an error page before the head, a cut connection after it."""


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The value of a well-formed ``Content-Length`` among ``headers``, else None."""
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


def failure(app: str, exc: BaseException) -> AppFailed:
    """The 500 for an app that raised ``exc`` before its response began."""
    text = "".join(traceback.format_exception(exc))
    return AppFailed(f"the app {app!r} raised {type(exc).__name__}", app=app, detail=text)


class AsgiCall:
    """One request of an in-process ASGI app."""

    def __init__(self, name: str, app: AsgiApp, scope: dict[str, Any], flow: FlowSide,
                 pending: list[bytes], body_end: bool,
                 ready: asyncio.Future[None] | None = None,
                 done: Callable[[], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.name = name
        # The worker's loop, given by the host: asyncio.get_running_loop() costs a
        # getpid() system call in CPython 3.11, a measurable part of a small request.
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self.flow = flow
        self._app = app
        self._scope = scope
        self._body: deque[bytes] = deque(p for p in pending if p)
        self._size = sum(len(p) for p in self._body)
        self._end = body_end
        self._final = False  # the last http.request went out
        self._wake: asyncio.Future[None] | None = None
        self._paused_in = False  # we paused reading the client's body
        self._paused_out = False  # the client cannot take more of the answer
        self._writable: asyncio.Future[None] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._started = False
        self._head_sent = False
        self.complete = False
        self.gone = False
        self._ready = ready
        self._done = done
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Call the app (after the flow holds this call: it may answer at once)."""
        # Always a task (no eager first step): anyio's cancel scopes, which Starlette
        # uses, need asyncio.current_task() from the app's first line on.
        # asyncio.Task directly, named after the app: loop.create_task() would format a
        # "Task-N" name for every request.
        self.task = asyncio.Task(self._run(), loop=self._loop, name=self.name)

    # -- from the flow ------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """More of the request body."""
        self._body.append(data)
        self._size += len(data)
        if self._size > BODY_HIGH and not self._paused_in:
            self._paused_in = True
            self.flow.upstream_writable(False)
        self._wakeup()

    def feed_end(self) -> None:
        """The request body is complete."""
        self._end = True
        self._wakeup()

    def pause(self) -> None:
        """The client's buffer is full: ``send`` waits."""
        self._paused_out = True

    def resume(self) -> None:
        """The client takes more again."""
        self._paused_out = False
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def close(self, abort: bool) -> None:
        """The exchange is over; ``abort`` cancels the app's task."""
        self.gone = True
        self._wakeup()
        self.resume()
        if abort and self.task is not None and not self.task.done():
            self.task.cancel()

    # -- for the app --------------------------------------------------------------------
    def _wakeup(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def receive(self) -> Message:
        """ASGI ``receive``."""
        while True:
            if self._body and not self.gone:
                data = self._body.popleft()
                self._size -= len(data)
                if self._paused_in and self._size <= BODY_LOW:
                    self._paused_in = False
                    self.flow.upstream_writable(True)
                more = bool(self._body) or not self._end
                self._final = not more
                return {"type": "http.request", "body": data, "more_body": more}
            if self._end and not self._final and not self.gone:
                self._final = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.gone or self.complete:
                return {"type": "http.disconnect"}
            self._wake = self._loop.create_future()
            await self._wake
            self._wake = None

    async def send(self, message: Message) -> None:
        """ASGI ``send``."""
        kind = message["type"]
        if kind == "http.response.start":
            if self._started:
                raise RuntimeError("http.response.start sent twice")
            self._started = True
            status = message["status"]
            self._status = status if type(status) is int else int(status)
            # Most apps give bytes already: converting those would only copy the call.
            self._headers = [(n if type(n) is bytes else bytes(n),
                              v if type(v) is bytes else bytes(v))
                             for n, v in message.get("headers", ())]
            return
        if kind != "http.response.body":
            if kind.startswith("http.response."):
                return  # an extension we did not offer (trailers, push): nothing to do
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self._started:
            raise RuntimeError("http.response.body before http.response.start")
        if self.complete:
            raise RuntimeError("http.response.body after the response was complete")
        if self.gone:
            return  # the client is gone; the app may finish quietly
        body = message.get("body", b"")
        more = bool(message.get("more_body", False))
        flow = self.flow
        if not self._head_sent:
            self._head_sent = True
            flow.upstream_head(ResponseHead(self._status, b"", self._headers,
                                            content_length(self._headers), False, 1))
        if body:
            flow.upstream_body(body if type(body) is bytes else bytes(body))
        if not more:
            self.complete = True
            flow.upstream_end()
            return
        while self._paused_out and not self.gone:
            self._writable = self._loop.create_future()
            await self._writable
            self._writable = None

    async def _run(self) -> None:
        try:
            if self._ready is not None:
                await asyncio.shield(self._ready)
            await self._app(self._scope, self.receive, self.send)
        except asyncio.CancelledError:
            return  # by close(abort=True): the flow is over
        except Exception as exc:  # noqa: BLE001 - the app's own failure
            if self.complete or self.gone:
                log.error("app %s raised after its response: %s", self.name,
                          "".join(traceback.format_exception(exc)).rstrip())
            else:
                error = failure(self.name, exc)
                log.error("app %s: %s", self.name, error.detail.rstrip())
                self.flow.hosted_failed(error)
            return
        finally:
            if self._done is not None:
                self._done()
        if not self.complete and not self.gone:
            if self._head_sent:
                message = f"the app {self.name!r} ended its response before its end"
            else:
                message = f"the app {self.name!r} returned without a complete response"
            self.flow.hosted_failed(AppFailed(message, app=self.name))


class Lifespan:
    """The ``lifespan`` scope of one app in one worker."""

    def __init__(self, name: str, app: AsgiApp, state: dict[str, Any]) -> None:
        self.name = name
        self._app = app
        self._state = state
        self._shutdown = asyncio.Event()
        self._started: asyncio.Future[str | None] | None = None
        self._stopped: asyncio.Future[str | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.supported = True

    async def startup(self, limit: float) -> str | None:
        """Run the startup; an error message when it failed (None: fine or unsupported)."""
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._stopped = loop.create_future()
        self._task = loop.create_task(self._main())
        try:
            return await asyncio.wait_for(asyncio.shield(self._started), limit)
        except TimeoutError:
            return f"lifespan startup did not complete within {limit:g}s"

    async def shutdown(self, limit: float) -> str | None:
        """Run the shutdown (after a startup that succeeded); an error message or None."""
        if self._task is None or self._task.done() or not self.supported:
            return None
        assert self._stopped is not None
        self._shutdown.set()
        try:
            return await asyncio.wait_for(asyncio.shield(self._stopped), limit)
        except TimeoutError:
            self._task.cancel()
            return f"lifespan shutdown did not complete within {limit:g}s"

    async def _receive(self) -> Message:
        assert self._started is not None
        if not self._started.done():
            return {"type": "lifespan.startup"}
        await self._shutdown.wait()
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: Message) -> None:
        assert self._started is not None and self._stopped is not None
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            _settle(self._started, None)
        elif kind == "lifespan.startup.failed":
            _settle(self._started, message.get("message") or "lifespan startup failed")
        elif kind == "lifespan.shutdown.complete":
            _settle(self._stopped, None)
        elif kind == "lifespan.shutdown.failed":
            _settle(self._stopped, message.get("message") or "lifespan shutdown failed")

    async def _main(self) -> None:
        assert self._started is not None and self._stopped is not None
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self._state}
        try:
            await self._app(scope, self._receive, self._send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the app's own failure
            if not self._started.done():
                self.supported = False
                log.info("app %s: the lifespan protocol appears unsupported (%s: %s)",
                         self.name, type(exc).__name__, exc)
                _settle(self._started, None)
            else:
                text = "".join(traceback.format_exception(exc)).rstrip()
                _settle(self._stopped, f"lifespan raised: {text}")
        finally:
            if not self._started.done():
                self.supported = False
                _settle(self._started, None)
            _settle(self._stopped, None)


def _settle(future: asyncio.Future[str | None], value: str | None) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):
        future.set_result(value)
