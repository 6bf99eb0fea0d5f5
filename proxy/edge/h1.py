"""The HTTP/1.1 edge: one ``asyncio.Protocol`` per client connection, llhttp underneath.

Theory of operation
-------------------
``H1Connection`` feeds what the client sends to llhttp's request parser (``httptools``,
strict: no lenient flags). Its callbacks only record: the request line and fields of
the head being parsed, then the body. When a head is complete it is checked
(``proxy.edge.strict``: version, method, target, Host, framing, header sizes), then
becomes a ``Request`` for a ``Flow`` (``proxy.edge.flow``), which does the rest; this
class is the flow's ``Downstream``: it frames the answer (``Content-Length``, chunked,
or close-delimited for HTTP/1.0) and writes each head with whatever body is ready in
one ``write``.

The connection's states and what moves them are a table in ``proxy.edge.h1state``
(pure, tested alone): ``FRESH`` (accepted, no byte yet), ``HEAD`` (a request head is
arriving), ``ACTIVE`` (a request is being served), ``IDLE`` (kept alive between
requests), ``TUNNEL`` (a WebSocket after its 101) and ``CLOSED``. Each state has at most
one deadline, and a connection has one timer, re-armed only when a deadline moves
earlier: ``header_timeout`` in ``FRESH`` and ``HEAD`` (408), ``keepalive_timeout`` in
``IDLE`` (a silent close), and in ``ACTIVE`` the flow's own (body stall 408, app
timeout 504).

Refusals before any flow (a malformed or oversized head, 400/405/413/414/431/501/505,
or a head that does not arrive in time, 408) write the edge's page with
``Connection: close`` and close; no app sees them. A pipelined request waits (parsed,
its body buffered, reading paused) until the answer before it is out. A graceful stop
(``drain``) closes idle connections at once, lets a fresh one send its first request,
and answers the request in progress with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from . import h1state as st
from . import strict
from .accesslog import LogEntry
from .buffers import Held
from .codec import decoded_path, response_head, status_line
from .errors import RequestRejected
from .flow import BodyTooLarge, Flow, Request
from .headers import is_upgrade
from .websocket import AppEnd, Tunnel

if TYPE_CHECKING:
    from .connections import Connections
    from .site import Site

log = logging.getLogger("bastion.proxy")

HEAD_SLACK = 8192 + 1024  # request line and line ends, beyond max_header_size
MAX_HEADERS = 100  # header fields in one request head (431 beyond)
FIRST_REQUEST_GRACE = 2.0  # at a stop, for a fresh connection's first request
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE_10 = b"Connection: keep-alive\r\n"


class _NoOne:
    """The protocol of a closed connection's parser: no callbacks at all."""


_NO_ONE = _NoOne()


class _Stop(Exception):
    """Raised in a parser callback to stop parsing."""


class _Incoming:
    """A request head parsed on this connection, and its body until a flow takes it."""

    __slots__ = ("request", "keep_alive", "http10", "complete", "body", "flow", "upgrade",
                 "expect")

    def __init__(self, request: Request, keep_alive: bool, http10: bool) -> None:
        self.request = request
        self.keep_alive = keep_alive
        self.http10 = http10
        self.complete = False
        self.body: list[bytes] = []
        self.flow: Flow | None = None
        self.upgrade = request.upgrade
        self.expect = False  # Expect: 100-continue, and no byte of the body yet


class H1Connection(asyncio.Protocol):
    """One HTTP/1.1 client connection."""

    def __init__(self, site: Site, connections: Connections, client: tuple[str, int] | None = None) -> None:
        self.site = site
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.state = st.FRESH
        self.draining = False
        self.client_ip = "127.0.0.1"
        self.client_port = 0
        self._client = client  # from a PROXY header: the client behind the balancer
        self._trusted = False
        self._client_cert: str | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._first: bytes | None = b""  # the request line so far; None once checked
        self._incoming: _Incoming | None = None  # the request being parsed
        self._queue: deque[_Incoming] = deque()  # parsed, waiting for their turn
        self._active: _Incoming | None = None  # the request being served
        self._refusal: RequestRejected | None = None
        self._deadline: float | None = None  # the connection's own (FRESH, HEAD, IDLE)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._read_paused = 0  # reasons reading is paused (flow, pipeline)
        self._chunked_out = False
        self._keep_alive = True
        self._tunnel: Tunnel | None = None
        self._in_message = False  # llhttp is inside a message (head or body)
        self._in_head = False  # a head is arriving
        self._trailers = False  # llhttp's fields now are chunked trailers
        self._last: _Incoming | None = None  # the last head parsed
        self._holding: list[Held] = []  # buffered answers' bytes still in the write buffer
        self._write_paused = False  # the transport's write buffer is above its high mark

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if self._client is not None:
            self.client_ip, self.client_port = self._client
        else:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                self.client_ip = str(peer[0])
                self.client_port = int(peer[1]) if len(peer) > 1 else 0
        self._trusted = self.site.trusted.contains(self.client_ip)
        if self.site.listener.tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if isinstance(ssl_object, ssl.SSLObject):
                der = ssl_object.getpeercert(binary_form=True)
                if der:
                    self._client_cert = base64.b64encode(der).decode("ascii")
        self.connections.opened(self)
        self._state_deadline()
        if self.connections.draining:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = st.next_state(self.state, st.LOST)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tunnel is not None:
            self._tunnel.client_closed()
        active = self._active
        if active is not None and active.flow is not None:
            active.flow.client_gone()
        self._active = None
        self._queue.clear()
        # The last request's flow points back at this connection: let go of it, so both
        # are freed by their counts, never left to the cycle collector.
        self._last = self._incoming = None
        # The parser holds this connection's callbacks: a parser of no one takes its
        # place, for the same reason.
        self._parser = httptools.HttpRequestParser(_NO_ONE)
        if self._holding:
            self._let_go()
        self.connections.closed(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == st.TUNNEL:
            if self._tunnel is not None:
                self._tunnel.from_client(data)
            return
        if state == st.CLOSED or self._refusal is not None:
            return
        if not self._in_message or self._first is not None:
            if not self._head_bytes(data):
                return
        elif self._in_head:
            self._head_size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgraded(data[offset:])
        except httptools.HttpParserCallbackError:
            # (read through a call: the callbacks set it, and the check above narrowed it)
            if self._pending_refusal() is not None:
                self._refused_while_parsing()
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
        if self._in_head and self._head_size > self.site.limits.max_header_size + HEAD_SLACK \
                and self.state != st.CLOSED:
            # A head that never ends: llhttp would buffer it without bound.
            self._refuse(RequestRejected(431, "request header block too large"))
            return
        if self.state != st.CLOSED:
            self._advance()

    def eof_received(self) -> bool | None:
        if self._tunnel is not None:
            self._tunnel.client_eof()
            return True
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._tunnel is not None:
            self._tunnel.client_paused(True)
            return
        active = self._active
        if active is not None and active.flow is not None:
            active.flow.pause_response()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._holding:
            self._let_go()
        if self._tunnel is not None:
            self._tunnel.client_paused(False)
            return
        active = self._active
        if active is not None and active.flow is not None:
            active.flow.resume_response()

    # -- the request head ---------------------------------------------------------------------
    def _head_bytes(self, data: bytes) -> bool:
        """Checks on the raw bytes of a head that llhttp is lenient about or would buffer
        without bound; False when the request was refused."""
        if not self._in_head:
            if data and (data[0] == 13 or data[0] == 10) and not data.lstrip(b"\r\n"):
                return True  # empty lines before a request line are allowed
            self._in_head = True
            self._first = b""
            self._head_size = 0
            if self.state != st.ACTIVE:  # (ACTIVE: a pipelined head)
                self.state = st.next_state(self.state, st.BYTES)
                self._state_deadline()
        self._head_size += len(data)
        first = self._first
        if first is not None:
            first += data
            start = 0
            size = len(first)
            while start < size and (first[start] == 13 or first[start] == 10):
                start += 1
            end = first.find(b"\n", start)
            if end < 0:
                if len(first) - start > strict.MAX_TARGET + 64:
                    self._refuse(RequestRejected(414, "request target too long"))
                    return False
                self._first = first
            else:
                self._first = None
                try:
                    strict.check_request_line(first[start:end].removesuffix(b"\r"))
                except strict.StrictError as exc:
                    self._refuse(RequestRejected(exc.status, exc.message))
                    return False
        return True

    # -- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if not self._in_head:
            # A head that begins after another message in the same read (pipelined):
            # bounded from here on like any other (its request line is not re-checked
            # raw, but it is re-serialised for the app, and its parts are checked).
            self._in_head = True
            self._first = None
            self._head_size = 0
            if self.state == st.IDLE:
                self.state = st.next_state(self.state, st.BYTES)
                self._state_deadline()
        self._in_message = True
        self._trailers = False
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > strict.MAX_TARGET + 64:
            self._refusal = RequestRejected(414, "request target too long")
            raise _Stop()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers:
            return  # chunked trailers are dropped (never forwarded)
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            self._refusal = RequestRejected(431, "too many header fields")
            raise _Stop()
        # llhttp drops the leading whitespace of a value, not the trailing (RFC 9110 5.5).
        headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._trailers = True
        parser = self._parser
        limits = self.site.limits
        method = parser.get_method().decode("ascii", "replace")
        version_text = parser.get_http_version()
        if version_text == "1.1":
            version = (1, 1)
        else:
            major, _, minor = version_text.partition(".")
            version = (int(major or 0), int(minor or 0))
        target = self._url.decode("latin-1")
        headers = self._headers
        try:
            verdict = strict.check_request(method, target, version, headers,
                                           max_header_size=limits.max_header_size,
                                           tokens_checked=True)
        except strict.StrictError as exc:
            self._refusal = RequestRejected(exc.status, exc.message)
            raise _Stop() from None
        if (limits.max_body_size and verdict.content_length is not None
                and verdict.content_length > limits.max_body_size):
            self._refusal = BodyTooLarge()
            raise _Stop()
        host = verdict.host
        if verdict.host_replaced:
            hb = host.encode("latin-1")
            headers = [(n, hb if n.lower() == b"host" else v) for n, v in headers]
        headers = strict.strip_h2c(headers)
        location = self.site.redirect_location(host, target if not verdict.absolute
                                               else verdict.target)
        if location is not None:
            self._refusal = _Redirect(location)
            raise _Stop()
        has_body = verdict.chunked or bool(verdict.content_length)
        request = Request(method, verdict.target, host, decoded_path(verdict.target), headers,
                          self.client_ip, self._client_cert, verdict.content_length,
                          has_body, f"HTTP/{version_text}",
                          upgrade=is_upgrade(method, headers), trusted=self._trusted,
                          client_port=self.client_port)
        keep_alive = parser.should_keep_alive() and not request.upgrade
        incoming = _Incoming(request, keep_alive, version == (1, 0))
        if has_body and version == (1, 1):
            incoming.expect = any(n.lower() == b"expect" and v.lower() == b"100-continue"
                                  for n, v in headers)
        self._incoming = self._last = incoming
        self._queue.append(incoming)
        if len(self._queue) > 1 or self._active is not None:
            self._pause_reading()  # pipelined: wait for the answers before it

    def on_body(self, body: bytes) -> None:
        incoming = self._incoming
        if incoming is None:
            return
        incoming.expect = False
        if incoming.flow is not None:
            incoming.flow.feed(body)
        else:
            incoming.body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        incoming = self._incoming
        if incoming is None:
            return
        incoming.complete = True
        self._incoming = None
        if incoming.flow is not None:
            incoming.flow.feed_end()

    # -- serving --------------------------------------------------------------------------------
    def _advance(self) -> None:
        """Start the next parsed request when nothing is being served."""
        if self._active is not None or not self._queue or self.state == st.CLOSED:
            return
        incoming = self._queue.popleft()
        self._active = incoming
        self.state = st.next_state(self.state, st.START)
        self._deadline = None
        self._chunked_out = False
        self._keep_alive = incoming.keep_alive and not self.draining
        flow = Flow(self.site, incoming.request, self)
        incoming.flow = flow
        flow.start()
        if incoming.body and not flow.done:
            body, incoming.body = incoming.body, []
            for chunk in body:
                flow.feed(chunk)
        if incoming.complete:
            flow.feed_end()
        elif incoming.expect and not flow.done and self.transport is not None:
            # The client waits for this before its body (RFC 9110 10.1.1), as nginx does.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head: what follows is kept for the
        tunnel; without a 101 the connection closes after the answer (nothing more can
        be parsed on it)."""
        self._in_message = False
        last = self._last
        if last is not None:
            last.keep_alive = False
            if last.upgrade and rest:
                last.body = [rest]
        self._pause_reading()

    # Downstream ------------------------------------------------------------------------------
    def respond(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int | None, bodyless: bool, body: list[bytes], end: bool) -> None:
        """The flow's answer head, with the body pieces so far."""
        transport = self.transport
        active = self._active
        if transport is None or active is None or self.state == st.CLOSED:
            return
        flow = active.flow
        if flow is not None and flow.refused:
            self._keep_alive = False
        if bodyless:
            framing = b"Content-Length: %d\r\n" % length \
                if length is not None and active.request.method == "HEAD" else b""
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif not active.http10:
            framing = b"Transfer-Encoding: chunked\r\n"
            self._chunked_out = True
        else:
            framing = b""
            self._keep_alive = False
        if end and not active.complete:
            self._keep_alive = False  # the rest of its body is never read
        if self.draining or self.site.node.draining:
            # A stop, or the node drains (``bastion drain``): the client moves on.
            self._keep_alive = False
        if not self._keep_alive:
            framing += _CLOSE
        elif active.http10:
            framing += _KEEP_ALIVE_10
        head = response_head(status, reason, headers, self.site.extra_head, framing)
        if self._chunked_out:
            pieces = [head]
            for piece in body:
                if piece:
                    pieces.append(b"%x\r\n%b\r\n" % (len(piece), piece))
            if end:
                pieces.append(b"0\r\n\r\n")
            transport.write(b"".join(pieces))
        elif body:
            transport.write(head + b"".join(body) if len(body) > 1 else head + body[0])
        else:
            transport.write(head)
        if self._write_paused and flow is not None and not end:
            # The answer before this one still fills the buffer: no pause_writing will
            # come, so this flow is told now.
            flow.pause_response()

    def respond_body(self, body: list[bytes], end: bool) -> None:
        """More of the answer's body."""
        transport = self.transport
        if transport is None or self.state == st.CLOSED:
            return
        if self._chunked_out:
            data = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in body if p)
            if end:
                data += b"0\r\n\r\n"
            if data:
                transport.write(data)
        else:
            for piece in body:
                transport.write(piece)

    def sendfile_transport(self) -> asyncio.Transport | None:
        """The transport ``os.sendfile`` may write under: a plain one, framed by length."""
        if self.site.listener.tls is not None or self._chunked_out:
            return None
        return self.transport

    def abort(self) -> None:
        """The answer broke off after its head: the client must see it is incomplete."""
        self._keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def pause_request(self) -> None:
        self._pause_reading()

    def resume_request(self) -> None:
        self._resume_reading()

    def hold(self, held: Held) -> None:
        """A finished answer's buffered bytes: given back when the write buffer drains."""
        transport = self.transport
        if transport is None or self.state == st.CLOSED \
                or not transport.get_write_buffer_size():
            held.release()
        else:
            self._holding.append(held)

    def _let_go(self) -> None:
        holding = self._holding
        self._holding = []
        for held in holding:
            held.release()

    def rearm(self) -> None:
        active = self._active
        if active is not None and active.flow is not None:
            self._arm(active.flow.deadline)

    def switch(self, head: bytes, rest: bytes, conn: AppEnd) -> None:
        """The app accepted a WebSocket upgrade: from now on, a byte pipe."""
        transport = self.transport
        active = self._active
        if transport is None or active is None or active.flow is None:
            conn.abort()
            return
        self.state = st.next_state(self.state, st.SWITCH)
        transport.write(head)
        tunnel = Tunnel(transport, conn, active.flow)
        self._tunnel = tunnel
        early = b"".join(active.body)
        active.body = []
        self._read_paused = 0
        transport.resume_reading()
        tunnel.start(early, rest)

    def flow_done(self, flow: Flow) -> None:
        """The exchange is over: close, or wait for the next request."""
        active = self._active
        if active is None or active.flow is not flow:
            return
        self._active = None
        transport = self.transport
        if transport is None or self.state == st.CLOSED:
            return
        if not self._keep_alive or not active.complete or self.state == st.TUNNEL:
            self.state = st.next_state(self.state, st.CLOSE)
            transport.close()
            return
        self.state = st.next_state(self.state, st.KEEP)
        if self._in_head:  # a pipelined head is on its way
            self.state = st.next_state(self.state, st.BYTES)
        self._state_deadline()
        if self._read_paused:
            self._read_paused = 0
            transport.resume_reading()
        if self._queue:
            self.loop.call_soon(self._advance)

    # -- refusals -------------------------------------------------------------------------------
    def _refuse(self, error: RequestRejected, entry: LogEntry | None = None) -> None:
        """Answer a request refused at the edge and close the connection."""
        transport = self.transport
        self.state = st.next_state(self.state, st.REFUSE)
        self._deadline = None
        if transport is None:
            return
        if isinstance(error, _Redirect):
            data = (status_line(308) + b"Location: " + error.location + b"\r\n"
                    + self.site.extra_head + b"Content-Length: 0\r\n" + _CLOSE + b"\r\n")
            sent = 0
            status = 308
        else:
            page = self.site.error_page(error)
            data = response_head(page.status, b"", page.headers, self.site.extra_head,
                                 b"Content-Length: %d\r\n" % len(page.body) + _CLOSE)
            data += page.body
            sent = len(page.body)
            status = page.status
        transport.write(data)
        transport.close()
        if entry is None:
            entry = LogEntry(self.client_ip, "-", "-", "-")
        self.site.finished(entry, status, sent, "-", 0, 0.0)

    def _pending_refusal(self) -> RequestRejected | None:
        return self._refusal

    def _refused_while_parsing(self) -> None:
        refusal = self._refusal
        assert refusal is not None
        active = self._active
        if active is not None and active.flow is not None:
            # A pipelined request was refused while one is served: the served one ends
            # with the connection.
            active.flow.client_gone()
            self._active = None
        method = self._parser.get_method().decode("ascii", "replace")
        entry = LogEntry(self.client_ip, method, self._url.decode("latin-1"),
                         f"HTTP/{self._parser.get_http_version()}")
        self._refuse(refusal, entry)

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        incoming = self._incoming
        if incoming is not None and incoming.flow is not None:
            # The body being streamed broke its framing.
            incoming.flow.feed_failed(RequestRejected(400, "malformed request body"))
            self._keep_alive = False
            self._incoming = None
            return
        if incoming is not None:
            self._queue.remove(incoming)
            self._incoming = None
        if self._active is not None:
            self._keep_alive = False  # garbage after a request: closed after its answer
            self._refusal = RequestRejected(400, "malformed request")
            return
        message = str(exc) or "malformed request"
        status = 431 if "header overflow" in message.lower() else 400
        self._refuse(RequestRejected(status, "malformed request"))

    # -- timer ----------------------------------------------------------------------------------
    def _state_deadline(self) -> None:
        """The deadline the state table gives the state the connection is in now."""
        delay = self.site.state_limits.get(self.state)
        if delay is not None:
            self._set_deadline(delay)

    def _set_deadline(self, delay: float) -> None:
        if delay <= 0:
            self._deadline = None
            return
        self._deadline = deadline = time.monotonic() + delay
        self._arm(deadline)

    def _arm(self, deadline: float | None) -> None:
        if deadline is None:
            return
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return  # fires first; re-armed then
            timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_later(max(0.0, deadline - time.monotonic()),
                                           self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        active = self._active
        if active is not None and active.flow is not None:
            flow = active.flow
            if flow.deadline is not None and now >= flow.deadline:
                flow.expire()
            if self._active is active and flow.deadline is not None:
                self._arm(flow.deadline)
                return
        deadline = self._deadline
        if deadline is None or self._active is not None:
            return
        if now < deadline:
            self._arm(deadline)
            return
        self._deadline = None
        if self.state in (st.FRESH, st.HEAD):
            self._refuse(RequestRejected(408, "the request head did not arrive in time"))
        elif self.state == st.IDLE and self.transport is not None:
            self.state = st.next_state(self.state, st.CLOSE)
            self.transport.close()

    # -- reading --------------------------------------------------------------------------------
    def _pause_reading(self) -> None:
        self._read_paused += 1
        if self._read_paused == 1 and self.transport is not None:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused -= 1
            if not self._read_paused and self.transport is not None \
                    and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- graceful stop --------------------------------------------------------------------------
    def drain(self) -> None:
        """A graceful stop: idle connections close now; a fresh one may still send its
        first request; the request in progress is answered with ``Connection: close``."""
        self.draining = True
        self._keep_alive = False
        transport = self.transport
        if transport is None or self.state == st.CLOSED:
            return
        if self.state == st.IDLE and not self._queue:
            self.state = st.next_state(self.state, st.CLOSE)
            transport.close()
        elif self.state == st.FRESH:
            self._set_deadline(min(FIRST_REQUEST_GRACE, self.site.limits.header_timeout
                                   or FIRST_REQUEST_GRACE))

    @property
    def idle(self) -> bool:
        """Nothing in progress on this connection."""
        return self.state in (st.FRESH, st.IDLE) and not self._queue


class _Redirect(RequestRejected):
    """``redirect_https``: 308 to the same target on the HTTPS listener."""

    def __init__(self, location: bytes) -> None:
        super().__init__(308, "redirect")
        self.location = location

