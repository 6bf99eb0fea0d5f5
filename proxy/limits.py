"""Per-connection limits of the HTTP/1.1 edge, on top of aiohttp's low-level server.

Theory of operation
-------------------
aiohttp's ``web.Server`` makes one ``web_protocol.RequestHandler`` per connection. It
has a keep-alive idle timer but no timer for a slow request head, maps every parse error
to 400, and accepts as many connections as the kernel hands it. Here:

- ``EdgeProtocol`` (a ``RequestHandler``) runs a *head timer*: started when a connection
  is made and when the first byte of a further request arrives, cancelled when the
  parser completes a head. When it fires, the client gets 408 and the connection closes
  (slowloris). It also counts the bytes of an unfinished head (431 beyond the limit, so
  a client cannot make the parser buffer a head of many small lines) and replaces
  aiohttp's parse-error answer (``handle_error``) with the edge's own page and status:
  414 for a request line too long, 431 for a header line too long or too many headers,
  else 400. The connection always closes after a parse error. ``reject`` (given by the
  listener's ``RequestHandler``) renders the page and writes the access log line.
- ``EdgeServer`` is a ``web.Server`` that makes ``EdgeProtocol``s.
- ``Acceptor`` replaces ``loop.create_server``: it accepts from the bound socket itself,
  so that at ``max_connections`` open connections of this worker (``ConnectionGate``) it
  simply stops calling ``accept``: further clients wait in the kernel's backlog.
  Every protocol is wrapped in ``_Counted``, which releases its slot when the
  connection is lost (or its TLS handshake fails).
- ``limited_body`` streams a request body to the app with ``body_timeout`` between
  reads and ``max_body_size`` in total; ``BodyState`` records why it stopped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from aiohttp import http_exceptions, web, web_protocol
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.streams import StreamReader

from . import strict
from .errors import RequestRejected

log = logging.getLogger("bastion.proxy")

HEAD_SLACK = 8192 + 1024  # request line and line ends, beyond max_header_size


class Rejecter(Protocol):
    """Renders a refusal page and logs it: ``(status, message, peer) -> Response``."""

    def __call__(self, status: int, message: str, peer: object,
                 request: web.BaseRequest | None) -> web.Response: ...


def parse_error_status(exc: BaseException | None, head: bytes, max_line: int) -> int:
    """The status for an aiohttp parse error, given the first bytes of the head."""
    if isinstance(exc, http_exceptions.LineTooLong):
        end = head.find(b"\n")
        return 414 if end < 0 or end > max_line else 431
    if isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in str(exc):
        return 431
    if isinstance(exc, http_exceptions.BadStatusLine) and b"HTTP/" in head[:max_line]:
        line = head.split(b"\n", 1)[0]
        if b" HTTP/2" in line or b" HTTP/3" in line:
            return 505
    return 400


def raw_response(response: web.Response) -> bytes:
    """A complete HTTP/1.1 response with ``Connection: close``, as bytes."""
    body = response.body if isinstance(response.body, bytes) else b""
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    for name, value in response.headers.items():
        if name.lower() not in ("content-length", "connection"):
            lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def answer_as_http11(request: web.BaseRequest, always: bool = False) -> None:
    """Make aiohttp write an ``HTTP/1.1`` status line for a refused request whose own
    version is unusable (HTTP/0.9, 2.0, or aiohttp's placeholder for a parse error)."""
    if always or request.version not in (HttpVersion10, HttpVersion11):
        request._version = HttpVersion11  # aiohttp answers in the request's version


class EdgeProtocol(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol with a head timer and the edge's error pages."""

    def __init__(self, manager: EdgeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_prefix = b""
        self._last_payload: StreamReader | None = None
        self._in_head = False
        self._line_checked = False
        self.draining = False

    # -- graceful stop ------------------------------------------------------------
    def drain(self) -> None:
        """A graceful stop: close now if idle, else after the request being received
        or served (its response says ``Connection: close``)."""
        self.draining = True
        if self._request_in_progress:
            self.close()  # serving: closed once its response is out
        elif not (self._in_head and self._idle()):
            # Idle (even with an unread body left from an answered request): closed at
            # once. ``close()`` alone would end aiohttp's loop but leave the socket open.
            self.force_close()
            if self.transport is not None:
                self.transport.close()
        # In the middle of a request head: left to finish it; the handler closes the
        # connection after that request (``request_started``).

    def request_started(self) -> None:
        """Called by the handler: a draining connection closes after this request."""
        if self.draining:
            self.close()

    # -- head timer ---------------------------------------------------------------
    def _start_head_timer(self) -> None:
        if self._head_timer is None and self._edge.header_timeout > 0:
            self._head_timer = self._loop.call_later(self._edge.header_timeout,
                                                     self._head_timeout)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _idle(self) -> bool:
        """No request in flight and the last body fully read: bytes now start a head."""
        payload = self._last_payload
        return (not self._request_in_progress and not self._messages
                and (payload is None or payload.is_eof()))

    def _refuse_now(self, status: int, message: str) -> None:
        self._stop_head_timer()
        transport = self.transport
        if transport is None or self._request_in_progress:
            return
        response = self._edge.reject(status, message, transport.get_extra_info("peername"),
                                     None)
        transport.write(raw_response(response))
        self.force_close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._idle() and not self._force_close:
            self._refuse_now(408, "the request head did not arrive in time")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_timer()

    def _process_keepalive(self) -> None:
        if self._head_timer is not None:
            # A head is due (new connection, or bytes of the next request): the head
            # timer answers 408; aiohttp's idle timer would close silently.
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        idle = self._idle()
        if idle and data:
            if not self._in_head:  # the first bytes of a new request head
                self._in_head = True
                self._head_bytes = 0
                self._head_prefix = b""
                self._line_checked = False
            self._start_head_timer()
            self._head_bytes += len(data)
            if len(self._head_prefix) < self.max_line_size + 2:
                self._head_prefix += data[: self.max_line_size + 2]
            if not self._line_checked and b"\n" in self._head_prefix.lstrip(b"\r\n"):
                self._line_checked = True
                line = self._head_prefix.lstrip(b"\r\n").split(b"\n", 1)[0]
                try:
                    strict.check_request_line(line.removesuffix(b"\r"))
                except strict.StrictError as exc:
                    self._refuse_now(exc.status, exc.message)
                    return
        before = len(self._messages)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._in_head = False
            self._stop_head_timer()
            if len(self._messages) > before:
                self._last_payload = self._messages[-1][1]
        elif idle and self._head_bytes > self._edge.max_header_size + HEAD_SLACK:
            self._refuse_now(431, "request header block too large")

    # -- errors -------------------------------------------------------------------
    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        answer_as_http11(request, always=True)
        if isinstance(exc, http_exceptions.HttpProcessingError):
            status = parse_error_status(exc, self._head_prefix, self.max_line_size)
            text = "malformed request" if status == 400 else (message or "malformed request")
            response = self._edge.reject(status, text, self.peername, None)
        else:
            if exc is not None:
                log.error("error handling a request: %r", exc, exc_info=exc)
            response = self._edge.reject(status, "internal error", self.peername, request)
        response.force_close()
        return response


class EdgeServer(web.Server):
    """A ``web.Server`` whose connections are ``EdgeProtocol``s."""

    def __init__(self, handler: Any, *, reject: Rejecter, header_timeout: float,
                 max_header_size: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.reject = reject
        self.header_timeout = header_timeout
        self.max_header_size = max_header_size

    def __call__(self) -> EdgeProtocol:
        return EdgeProtocol(self, loop=self._loop, **self._kwargs)


# -- connections ----------------------------------------------------------------------
class ConnectionGate:
    """Open connections of one worker against ``max_connections``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._free = asyncio.Event()
        self._free.set()

    def enter(self) -> None:
        self.open += 1
        if self.limit and self.open >= self.limit:
            self._free.clear()

    def leave(self) -> None:
        self.open -= 1
        if not self.limit or self.open < self.limit:
            self._free.set()

    async def wait(self) -> None:
        """Until a connection may be accepted."""
        await self._free.wait()


class _Counted(asyncio.Protocol):
    """Wraps a connection's protocol and gives its gate slot back once, when it ends."""

    def __init__(self, inner: asyncio.Protocol, gate: ConnectionGate) -> None:
        self.inner = inner
        self._gate: ConnectionGate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.leave()
            self._gate = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.release()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Acceptor(asyncio.AbstractServer):
    """Accepts connections on a bound socket while ``gate`` has room."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol],
                 context: ssl.SSLContext | None, gate: ConnectionGate,
                 handshake_timeout: float = 10.0) -> None:
        self._sock = sock
        self._factory = factory
        self._context = context
        self._gate = gate
        self._handshake_timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = self._loop.create_task(self._run())
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    async def _run(self) -> None:
        try:
            while True:
                await self._gate.wait()
                try:
                    conn, _ = await self._loop.sock_accept(self._sock)
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("accept: %s; pausing 100 ms", exc.strerror)
                        await asyncio.sleep(0.1)
                        continue
                    if self._sock.fileno() < 0:
                        return
                    log.debug("accept failed: %s", exc)
                    continue
                conn.setblocking(False)
                self._gate.enter()
                counted = _Counted(self._factory(), self._gate)
                task = self._loop.create_task(self._connect(conn, counted))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
        finally:
            self._closed.set()

    async def _connect(self, conn: socket.socket, counted: _Counted) -> None:
        try:
            if self._context is not None:
                await self._loop.connect_accepted_socket(
                    lambda: counted, conn, ssl=self._context,
                    ssl_handshake_timeout=self._handshake_timeout)
            else:
                await self._loop.connect_accepted_socket(lambda: counted, conn)
        except BaseException as exc:  # noqa: BLE001 - a failed handshake frees its slot
            counted.release()
            conn.close()
            if not isinstance(exc, Exception):
                raise

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._sock.close()
        # A task cancelled before its first step never runs its ``finally``: closed now.
        self._closed.set()

    def is_serving(self) -> bool:
        return self._task is not None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def wait_closed(self) -> None:
        if self._task is not None:
            return
        await self._closed.wait()

    async def wait_handshakes(self, limit: float) -> None:
        """Let connections accepted before ``close`` finish their TLS handshake."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=limit)


# -- request bodies ----------------------------------------------------------------------
class BodyTooLarge(RequestRejected):
    """The client's body went beyond ``max_body_size`` (413)."""

    def __init__(self) -> None:
        super().__init__(413, "the request body is larger than allowed")


class BodyStalled(RequestRejected):
    """Nothing of the client's body arrived within ``body_timeout`` (408)."""

    def __init__(self) -> None:
        super().__init__(408, "the client stopped sending its body")


class BodyState:
    """Why a streamed request body stopped, for the status after the upstream failed."""

    def __init__(self) -> None:
        self.failure: RequestRejected | None = None
        self.received = 0
        self.complete = False  # the whole body was prefetched


PREFETCH = 64 * 1024


async def _read(content: StreamReader, body_timeout: float, state: BodyState) -> bytes:
    failure: RequestRejected
    try:
        return await asyncio.wait_for(content.readany(), body_timeout)
    except TimeoutError:
        failure = BodyStalled()
    except (asyncio.CancelledError, RequestRejected):
        raise
    except Exception:  # noqa: BLE001 - aiohttp's payload errors: broken framing
        failure = RequestRejected(400, "malformed request body")
    state.failure = failure
    raise failure


async def prefetch_body(content: StreamReader, body_timeout: float, max_size: int,
                        state: BodyState, limit: int = PREFETCH) -> list[bytes]:
    """The first ``limit`` bytes of a body (or all of it), read before the app is asked.

    A body whose framing breaks early, that is too large or that never comes is refused
    (400, 413, 408) before any app sees the request, like nginx's request buffering
    does for whole bodies; only a larger body streams, from then on unbuffered.
    """
    chunks: list[bytes] = []
    while state.received < limit:
        chunk = await _read(content, body_timeout, state)
        if not chunk:
            state.complete = True
            break
        state.received += len(chunk)
        if max_size and state.received > max_size:
            state.failure = BodyTooLarge()
            raise state.failure
        chunks.append(chunk)
    return chunks


async def limited_body(content: StreamReader, body_timeout: float, max_size: int,
                       state: BodyState, first: list[bytes] | None = None
                       ) -> AsyncIterator[bytes]:
    """A request body chunk by chunk, within ``body_timeout`` and ``max_size`` (0: none),
    starting with the prefetched ``first`` chunks."""
    for chunk in first or ():
        yield chunk
    while not state.complete:
        chunk = await _read(content, body_timeout, state)
        if not chunk:
            return
        state.received += len(chunk)
        if max_size and state.received > max_size:
            state.failure = BodyTooLarge()
            raise state.failure
        yield chunk
