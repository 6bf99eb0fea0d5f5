"""HTTP/2 on the native engine: libnghttp2 through our extension ``_ng2``.

Theory of operation
-------------------
Same role as :mod:`proxy.edge.h2server` (TLS listeners, ALPN ``h2``; each stream a
``Flow`` to the app over HTTP/1.1), with framing, HPACK, flow control and stream state
in compiled code (``_ng2.c``, a small C extension over an nghttp2 server session). Which
engine serves is decided once per process by :func:`proxy.edge.native.h2_engine`.

Per read from the client, ``Session.receive`` returns the events of that read: one per
complete request head (checked and translated by :mod:`proxy.edge.h2translate`, the same
checks as with ``h2``), body chunk, end of stream, reset, closed stream, control frame.
A stream answers through :class:`_Stream` (the flow's ``Downstream``): ``respond``
submits the head, body pieces go to the stream's queue in the session (``write``), and
nghttp2 sends DATA as the peer's windows allow. Output is collected and written once
per loop iteration (``call_soon``), so several streams that finish together go out in
one write. A stream with more than ``STREAM_BUFFER`` bytes waiting pauses the app's side
of its flow until the queue drains; received DATA is acknowledged (``consume``) at once
unless the flow paused the request body, then when it resumes (end-to-end backpressure).

The bounds are those of ``h2server``: the same budgets per ``BUDGET_WINDOW`` for stream
resets (received, or sent for any error: nghttp2's own resets count too), control frames
(PING, SETTINGS, PRIORITY, unknown) and empty DATA frames, each ending the connection
with GOAWAY ENHANCE_YOUR_CALM; ``MAX_STREAMS`` concurrent streams; header lists up to
``limits.max_header_size``; at most 64 CONTINUATION frames per header block; an
incomplete frame or header block for ``header_timeout`` closes the connection; reading
stops while the transport's write buffer is full, and a write buffer beyond
``MAX_OUTBOUND`` aborts the connection; idle connections end after
``keepalive_timeout``; a graceful stop sends GOAWAY and lets open streams finish. On
top, nghttp2 checks RFC 9113's framing and message rules itself, and ends a connection
that lets more than ``MAX_OUTBOUND_ACK`` PING/SETTINGS acknowledgements queue up.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

from . import _ng2
from .buffers import Held
from .codec import decoded_path
from .flow import Flow, Request
from .h2server import (
    CONNECTION_WINDOW,
    CONTROL_BUDGET,
    EMPTY_DATA_BUDGET,
    MAX_OUTBOUND,
    MAX_STREAMS,
    RESET_BUDGET,
    STREAM_WINDOW,
    Budget,
)
from .h2translate import Malformed, check_body_length, request_from_h2, response_to_h2
from .websocket import AppEnd

if TYPE_CHECKING:
    from .connections import Connections
    from .site import Site

log = logging.getLogger("bastion.h2")

STREAM_BUFFER = 64 * 1024  # response bytes queued per stream before the app's side pauses
SEND_LIMIT = 256 * 1024  # bytes taken from the session per write
MAX_OUTBOUND_ACK = 10 * CONTROL_BUDGET  # beyond the budget: the budget speaks first

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
ENHANCE_YOUR_CALM = 0xB

EV_REQUEST = _ng2.EV_REQUEST
EV_DATA = _ng2.EV_DATA
EV_END = _ng2.EV_END
EV_RESET = _ng2.EV_RESET
EV_RESET_SENT = _ng2.EV_RESET_SENT
EV_CLOSED = _ng2.EV_CLOSED
EV_CONTROL = _ng2.EV_CONTROL
EV_EMPTY_DATA = _ng2.EV_EMPTY_DATA
EV_GOAWAY = _ng2.EV_GOAWAY


class _Stream:
    """One request stream: the flow's ``Downstream`` on a native HTTP/2 connection."""

    __slots__ = ("proto", "id", "content_length", "ended", "gone", "received", "flow",
                 "paused", "unacked", "has_body", "blocked", "timer", "holding")

    def __init__(self, proto: H2NativeProtocol, stream_id: int, content_length: int | None,
                 ended: bool) -> None:
        self.proto = proto
        self.id = stream_id
        self.content_length = content_length
        self.ended = ended  # the client finished sending (END_STREAM seen)
        self.gone = False  # closed or reset: nothing more is sent
        self.received = 0
        self.flow: Flow | None = None
        self.paused = False  # the flow asked to stop the request body
        self.unacked = 0  # DATA bytes held back while paused
        self.has_body = False  # the response head was submitted with a body to follow
        self.blocked = False  # the app's side is paused until the queue drains
        self.timer: asyncio.TimerHandle | None = None
        self.holding: list[Held] = []  # buffered bytes of a finished flow still queued

    # -- Downstream -------------------------------------------------------------------
    def respond(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int | None, bodyless: bool, body: list[bytes], end: bool) -> None:
        proto = self.proto
        if self.gone:
            return
        if proto.site.node.draining:
            # The node drains: GOAWAY before this answer, so the client knows before the
            # answer ends that its next request needs a new connection (through the
            # balancer, to another node); this stream is still served.
            proto.goaway()
        fields = [(n.decode("latin-1"), v.decode("latin-1"))
                  for n, v in (*headers, *proto.site.response_headers)]
        if bodyless and proto.request_method(self) != "HEAD":
            length = None
        closed = bodyless and end
        self.has_body = not closed
        if not proto.session.respond(self.id, response_to_h2(status, fields, length),
                                     not closed):
            self._lost()
            return
        if closed:
            proto.want_flush()
            return
        self.respond_body([] if bodyless else body, end)

    def respond_body(self, body: list[bytes], end: bool) -> None:
        if self.gone or not self.has_body:
            return
        proto = self.proto
        waiting = proto.session.write(self.id, body, end)
        if waiting < 0:
            self._lost()
            return
        if waiting > STREAM_BUFFER and not self.blocked and self.flow is not None:
            self.blocked = True
            proto.blocked.add(self)
            self.flow.pause_response()
        proto.want_flush()

    def sendfile_transport(self) -> asyncio.Transport | None:
        return None  # frames: never the raw socket

    def hold(self, held: Held) -> None:
        # Released when the stream closes: its last bytes have left the session.
        if self.gone or self.proto.session.pending(self.id) <= 0:
            held.release()
        else:
            self.holding.append(held)

    def abort(self) -> None:
        self.proto.reset(self.id, INTERNAL_ERROR)
        self._lost()

    def pause_request(self) -> None:
        self.paused = True

    def resume_request(self) -> None:
        self.paused = False
        if self.unacked:
            self.proto.session.consume(self.id, self.unacked)
            self.unacked = 0
            self.proto.want_flush()

    def rearm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        flow = self.flow
        if flow is not None and flow.deadline is not None:
            self.timer = self.proto.loop.call_later(
                max(0.0, flow.deadline - time.monotonic()), flow.expire)

    def switch(self, head: bytes, rest: bytes, conn: AppEnd) -> None:
        conn.abort()  # never asked for over HTTP/2
        self.abort()

    def flow_done(self, flow: Flow) -> None:
        # The session resets the stream with NO_ERROR once its END_STREAM is out if
        # the client has not finished its body (RFC 9113 8.1); it closes the stream.
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- the session's side -------------------------------------------------------------
    def drained(self) -> None:
        """The queue went below ``STREAM_BUFFER``: the app's side goes on."""
        self.blocked = False
        if self.flow is not None and not self.flow.done:
            self.flow.resume_response()

    def _lost(self) -> None:
        self.gone = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.proto.blocked.discard(self)
        if self.holding:
            holding, self.holding = self.holding, []
            for held in holding:
                held.release()
        flow = self.flow
        if flow is not None and not flow.done:
            flow.client_gone()


class H2NativeProtocol(asyncio.Protocol):
    """One HTTP/2 connection from a client, on the native engine."""

    def __init__(self, server: H2NativeServer, client: tuple[str, int] | None = None) -> None:
        self.server = server
        self.site = server.site
        self.limits = server.site.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session = _ng2.Session(
            max_streams=MAX_STREAMS, max_header_list=self.limits.max_header_size,
            initial_window=STREAM_WINDOW, connection_window=CONNECTION_WINDOW,
            max_outbound_ack=MAX_OUTBOUND_ACK)
        self.streams: dict[int, _Stream] = {}
        self.blocked: set[_Stream] = set()
        self.resets = Budget(RESET_BUDGET)
        self.control = Budget(CONTROL_BUDGET)
        self.empty_data = Budget(EMPTY_DATA_BUDGET)
        self.client_ip = "127.0.0.1"
        self.client_port = 0  # for an in-process app's scope
        self._client = client  # from a PROXY header: the client behind the balancer
        self.client_cert: str | None = None
        self.closing = False  # GOAWAY sent or received: no new streams
        self.write_paused = False
        self._trusted = False
        self._flush_soon = False
        self._stall: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if self._client is not None:
            self.client_ip, self.client_port = self._client
        elif isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0])
            self.client_port = int(peer[1]) if len(peer) > 1 else 0
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            der = ssl_object.getpeercert(binary_form=True)
            self.client_cert = base64.b64encode(der).decode("ascii") if der else None
        self._trusted = self.site.trusted.contains(self.client_ip)
        self.server.open.add(self)
        self.server.connections.opened(self)
        self._flush()  # our SETTINGS
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)
        self.server.connections.closed(self)
        self.closing = True
        for timer in (self._stall, self._idle):
            if timer is not None:
                timer.cancel()
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream._lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self.want_flush()

    def drain(self) -> None:
        """A graceful stop: GOAWAY, then close once the open streams are done."""
        self.goaway()

    def eof_received(self) -> bool | None:
        return None

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            events = self.session.receive(data)
        except _ng2.Error as exc:
            code = exc.args[1] if len(exc.args) > 1 else 0
            if code == _ng2.ERR_FLOODED:
                self._calm("PING/SETTINGS acknowledgements not read")
                return
            log.debug("h2 connection error from %s: %s", self.client_ip, exc.args[0])
            self._flush()
            self._close()
            return
        if self.session.incomplete:
            if self._stall is None:
                # Bytes that complete no frame (a slow header block or frame): bounded.
                self._stall = self.loop.call_later(self.limits.header_timeout,
                                                   self._stalled)
        elif self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if events is not None:
            self._on_events(events)
        self.want_flush()

    # -- events -------------------------------------------------------------------------
    def _on_events(self, events: list[tuple[Any, ...]]) -> None:
        transport = self.transport
        assert transport is not None
        for event in events:
            if transport.is_closing():
                return
            kind = event[0]
            if kind == EV_REQUEST:
                self._on_request(event[1], event[2], event[3])
            elif kind == EV_DATA:
                self._on_data(event[1], event[2])
            elif kind == EV_END:
                self._on_end(event[1])
            elif kind == EV_CLOSED:
                self._on_closed(event[1])
            elif kind == EV_CONTROL:
                if not self.control.spend():
                    self._calm("control frame flood")
            elif kind == EV_EMPTY_DATA:
                if not self.empty_data.spend():
                    self._calm("empty DATA frame flood")
            elif kind == EV_RESET or kind == EV_RESET_SENT:
                if not self.resets.spend():
                    self._calm("stream reset flood")
            elif kind == EV_GOAWAY:
                self.closing = True
                if not self.streams:
                    self._flush()
                    self._close()

    def _on_request(self, stream_id: int, fields: list[tuple[bytes, bytes]],
                    ended: bool) -> None:
        if self.closing:
            self.reset(stream_id, REFUSED_STREAM)
            return
        try:
            h1 = request_from_h2(fields, self.site.scheme)
        except Malformed as exc:
            log.debug("h2 malformed request from %s: %s", self.client_ip, exc)
            self.reset(stream_id, PROTOCOL_ERROR)
            return
        stream = _Stream(self, stream_id, h1.content_length, ended)
        self.streams[stream_id] = stream
        self._disarm_idle()
        target = h1.target
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in h1.headers]
        has_body = not ended and h1.content_length != 0
        request = Request(h1.method, target, h1.authority, decoded_path(target), headers,
                          self.client_ip, self.client_cert,
                          h1.content_length if has_body else None, has_body, "HTTP/2.0",
                          trusted=self._trusted, client_port=self.client_port)
        flow = Flow(self.site, request, stream)
        stream.flow = flow
        flow.start()
        if ended and not flow.done:
            flow.feed_end()

    def request_method(self, stream: _Stream) -> str:
        """The method of ``stream``'s request."""
        flow = stream.flow
        return flow.request.method if flow is not None else "GET"

    def _on_data(self, stream_id: int, data: bytes) -> None:
        size = len(data)
        stream = self.streams.get(stream_id)
        if stream is None or stream.gone or stream.flow is None or stream.flow.done:
            self.session.consume(stream_id, size)
            return
        stream.received += size
        if not self._check_length(stream):
            self.session.consume(stream_id, size)
            return
        if stream.paused:
            stream.unacked += size
        else:
            self.session.consume(stream_id, size)
        stream.flow.feed(data)

    def _on_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended:
            return
        stream.ended = True
        if self._check_length(stream) and stream.flow is not None and not stream.flow.done:
            stream.flow.feed_end()

    def _check_length(self, stream: _Stream) -> bool:
        try:
            check_body_length(stream.content_length, stream.received, stream.ended)
        except Malformed:
            self.reset(stream.id, PROTOCOL_ERROR)
            self._drop(stream)
            return False
        return True

    def _on_closed(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.unacked:
            self.session.consume(stream_id, stream.unacked)
            stream.unacked = 0
        stream._lost()
        if not self.streams:
            if self.closing:
                self.want_flush()
            else:
                self._arm_idle()

    # -- helpers --------------------------------------------------------------------------
    def reset(self, stream_id: int, code: int) -> None:
        """Reset a stream (a sent reset other than NO_ERROR counts against the budget
        when nghttp2 sends it)."""
        self.session.reset(stream_id, code)
        self.want_flush()

    def _drop(self, stream: _Stream) -> None:
        """Forget a stream that ended abnormally: stop its flow, free its window."""
        if stream.unacked:
            self.session.consume(stream.id, stream.unacked)
            stream.unacked = 0
        stream._lost()
        self.streams.pop(stream.id, None)

    def want_flush(self) -> None:
        """Write what the session has for the client, once in this loop iteration."""
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        session = self.session
        while not self.write_paused:
            try:
                data = session.send(SEND_LIMIT)
            except _ng2.Error as exc:
                log.debug("h2 session error for %s: %s", self.client_ip, exc.args[0])
                transport.abort()
                return
            if not data:
                break
            transport.write(data)
            if transport.get_write_buffer_size() > MAX_OUTBOUND:
                log.info("h2 client %s does not read; connection aborted", self.client_ip)
                transport.abort()
                return
        events = session.events()
        if events is not None:
            self._on_events(events)
        if self.blocked:
            for stream in [s for s in self.blocked if session.pending(s.id) <= STREAM_BUFFER]:
                self.blocked.discard(stream)
                stream.drained()
        if transport.is_closing():
            return
        if not session.want_read() and not session.want_write():
            self._close()  # a GOAWAY ended it
        elif self.closing and not self.streams and not session.want_write():
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _calm(self, why: str) -> None:
        log.info("h2 client %s: %s; GOAWAY", self.client_ip, why)
        self.closing = True
        self.session.goaway(ENHANCE_YOUR_CALM, True)
        self._flush()
        self._close()

    def _stalled(self) -> None:
        self._stall = None
        log.info("h2 client %s: incomplete frame for %ss; closing", self.client_ip,
                 self.limits.header_timeout)
        self.closing = True
        self.session.goaway(PROTOCOL_ERROR, True)
        self._flush()
        self._close()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle = self.loop.call_later(self.limits.keepalive_timeout, self.goaway)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def goaway(self) -> None:
        """Graceful end: no new streams; close once the open ones are done."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.closing:
            self.closing = True
            self.session.goaway(NO_ERROR, False)
        self._flush()


class H2NativeServer:
    """The HTTP/2 connections of one listener, on the native engine."""

    def __init__(self, site: Site, connections: Connections) -> None:
        self.site = site
        self.connections = connections
        self.open: set[H2NativeProtocol] = set()

    def __call__(self, client: tuple[str, int] | None = None) -> H2NativeProtocol:
        return H2NativeProtocol(self, client)

    def goaway_all(self) -> None:
        """GOAWAY to every connection (a graceful stop); each closes when its streams
        are done."""
        for conn in list(self.open):
            conn.goaway()
