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

What does not depend on the frames (the client's address, timers, budgets, the stream's
state, the start of its flow) is shared with ``h2server`` in :mod:`proxy.edge.h2common`.
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

import logging
from typing import TYPE_CHECKING, Any

from . import _ng2
from .buffers import Held
from .flow import Flow
from .h2common import (
    CONNECTION_WINDOW,
    CONTROL_BUDGET,
    INTERNAL_ERROR,
    MAX_OUTBOUND,
    MAX_STREAMS,
    NO_ERROR,
    STREAM_WINDOW,
    H2Base,
    H2Stream,
    goaway_all,
)
from .h2translate import response_to_h2

if TYPE_CHECKING:
    from .connections import Connections
    from .site import Site

log = logging.getLogger("bastion.h2")

STREAM_BUFFER = 64 * 1024  # response bytes queued per stream before the app's side pauses
SEND_LIMIT = 256 * 1024  # bytes taken from the session per write
MAX_OUTBOUND_ACK = 10 * CONTROL_BUDGET  # beyond the budget: the budget speaks first

EV_REQUEST = _ng2.EV_REQUEST
EV_DATA = _ng2.EV_DATA
EV_END = _ng2.EV_END
EV_RESET = _ng2.EV_RESET
EV_RESET_SENT = _ng2.EV_RESET_SENT
EV_CLOSED = _ng2.EV_CLOSED
EV_CONTROL = _ng2.EV_CONTROL
EV_EMPTY_DATA = _ng2.EV_EMPTY_DATA
EV_GOAWAY = _ng2.EV_GOAWAY


class _Stream(H2Stream):
    """One request stream: the flow's ``Downstream`` on a native HTTP/2 connection."""

    __slots__ = ("proto", "has_body")

    def __init__(self, proto: H2NativeProtocol, stream_id: int, content_length: int | None,
                 ended: bool) -> None:
        super().__init__(stream_id, content_length, ended)
        self.proto = proto
        self.has_body = False  # the response head was submitted with a body to follow

    # -- Downstream -------------------------------------------------------------------
    def respond(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int | None, bodyless: bool, body: list[bytes], end: bool) -> None:
        proto = self.proto
        if self.gone:
            return
        fields, length = self._head(proto, headers, length, bodyless)
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

    def hold(self, held: Held) -> None:
        # Released when the stream closes: its last bytes have left the session.
        if self.gone or self.proto.session.pending(self.id) <= 0:
            held.release()
        else:
            self.holding.append(held)

    def abort(self) -> None:
        self.proto.reset(self.id, INTERNAL_ERROR)
        self._lost()

    def resume_request(self) -> None:
        self.paused = False
        if self.unacked:
            self.proto.session.consume(self.id, self.unacked)
            self.unacked = 0
            self.proto.want_flush()

    def rearm(self) -> None:
        self._rearm(self.proto.loop)

    def flow_done(self, flow: Flow) -> None:
        # The session resets the stream with NO_ERROR once its END_STREAM is out if
        # the client has not finished its body (RFC 9113 8.1); it closes the stream.
        self._cancel_timer()

    # -- the session's side -------------------------------------------------------------
    def drained(self) -> None:
        """The queue went below ``STREAM_BUFFER``: the app's side goes on."""
        self.blocked = False
        if self.flow is not None and not self.flow.done:
            self.flow.resume_response()

    def _lost(self) -> None:
        self.gone = True
        self._cancel_timer()
        self.proto.blocked.discard(self)
        if self.holding:
            self._let_go()
        flow = self.flow
        if flow is not None and not flow.done:
            flow.client_gone()


class H2NativeProtocol(H2Base):
    """One HTTP/2 connection from a client, on the native engine."""

    def __init__(self, server: H2NativeServer, client: tuple[str, int] | None = None) -> None:
        super().__init__(server, client)
        self.session = _ng2.Session(
            max_streams=MAX_STREAMS, max_header_list=self.limits.max_header_size,
            initial_window=STREAM_WINDOW, connection_window=CONNECTION_WINDOW,
            max_outbound_ack=MAX_OUTBOUND_ACK)
        self.blocked: set[_Stream] = set()
        self._flush_soon = False

    # -- connection ---------------------------------------------------------------------
    def _lose_streams(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream._lost()

    def _writable(self) -> None:
        self.want_flush()

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
            self._arm_stall()
        else:
            self._clear_stall()
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
                self._spend(self.control, "control frame flood")
            elif kind == EV_EMPTY_DATA:
                self._spend(self.empty_data, "empty DATA frame flood")
            elif kind == EV_RESET or kind == EV_RESET_SENT:
                self._spend(self.resets, "stream reset flood")
            elif kind == EV_GOAWAY:
                self.closing = True
                if not self.streams:
                    self._flush()
                    self._close()

    def _on_request(self, stream_id: int, fields: list[tuple[bytes, bytes]],
                    ended: bool) -> None:
        h1 = self._request_head(stream_id, fields)
        if h1 is not None:
            self._start(_Stream(self, stream_id, h1.content_length, ended), h1)

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

    def _on_closed(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.unacked:
            self.session.consume(stream_id, stream.unacked)
            stream.unacked = 0
        stream._lost()
        # The stream and its flow point at each other: let go of the flow, so both are
        # freed now by their counts, not later by the cycle collector (which cost about
        # a fifth of a worker's time under h2load -m10).
        stream.flow = None
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

    def _ack(self, stream_id: int, size: int) -> None:
        self.session.consume(stream_id, size)

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

    def _end(self, code: int) -> None:
        self.session.goaway(code, True)

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
        self.open: set[H2Base] = set()

    def __call__(self, client: tuple[str, int] | None = None) -> H2NativeProtocol:
        return H2NativeProtocol(self, client)

    def goaway_all(self) -> None:
        """GOAWAY to every connection (a graceful stop); each closes when its streams
        are done."""
        goaway_all(self.open)
