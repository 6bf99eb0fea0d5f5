"""HTTP/2 on TLS listeners (ALPN ``h2``), each stream forwarded as HTTP/1.1 to the app.

Theory of operation
-------------------
A TLS listener with ``http2: true`` offers ``h2`` and ``http/1.1`` by ALPN. Its protocol
factory makes an :class:`AlpnSelector` per connection. With asyncio's (and uvloop's)
TLS transports the application protocol's ``connection_made`` runs once the handshake
is done, so the selector (``proxy.edge.listeners.AlpnSelector``) reads
``ssl_object.selected_alpn_protocol()`` there and hands the transport to either an
``H1Connection`` or an :class:`H2Protocol`.

:class:`H2Protocol` drives an ``h2.connection.H2Connection`` (sans-I/O). Each request
stream is checked and translated by :mod:`proxy.edge.h2translate`, then driven through
the *same* ``Flow`` as an HTTP/1.1 request (``proxy.edge.flow``: prefetch, route,
endpoint, header rewrite, the app over the keep-alive pool, the same error pages and
statuses, HSTS, access log); the stream (``_Stream``) is the flow's ``Downstream``. No
task is made per stream. What does not depend on the frames (the client's address,
timers, budgets, the stream's state, the start of its flow) is shared with the native
engine in :mod:`proxy.edge.h2common`; this module adds how ``h2`` reads and writes them.

Flow control is end to end. Received DATA is acknowledged (WINDOW_UPDATE) at once
unless the flow asked to pause the request body (the app cannot take more), then when
it resumes, so a slow app slows the client; the connection window is opened to
``CONNECTION_WINDOW`` so one stalled stream cannot block the others. Response DATA is
sent only within the peer's stream and connection windows (and while the TLS transport
is not paused); what does not fit waits in the stream's outbox, and reading from the
app pauses until WINDOW_UPDATE makes room.

Known attacks are bounded per connection: at most ``MAX_STREAMS`` concurrent streams
(h2 refuses more); header lists up to ``limits.max_header_size`` (h2's decoder, and h2
allows at most 64 CONTINUATION frames per block); a header block or frame that does not
complete within ``header_timeout`` closes the connection (slow CONTINUATION); stream
resets, received or sent (rapid reset, CVE-2023-44487), control frames (PING, SETTINGS,
PRIORITY, unknown: floods) and empty DATA frames each have a budget per
``BUDGET_WINDOW`` seconds, beyond which the connection ends with GOAWAY
ENHANCE_YOUR_CALM. Reading from a client stops while the transport's write buffer is
full (a client that does not read its PING/SETTINGS acks cannot make us buffer), and a
write buffer beyond ``MAX_OUTBOUND`` aborts the connection. An idle connection (no open
stream) ends with GOAWAY after ``keepalive_timeout``. A graceful stop
(:meth:`H2Server.shutdown`) sends GOAWAY, lets open streams finish within the grace
time, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from .buffers import Held
from .flow import Flow
from .h2common import (
    CONNECTION_WINDOW,
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

# After a graceful GOAWAY, the connection stays open this long (or until the client
# closes it): a request the client sent before it read the GOAWAY is refused with
# REFUSED_STREAM, which it may safely retry on a new connection, instead of being cut
# by a closed socket (whose reset could also destroy the GOAWAY on its way).
GOAWAY_LINGER = 1.0


class FrameTracker:
    """Follows frame boundaries in what a client sends (RFC 9113 4.1), without parsing
    frames: whether it stopped in the middle of a frame or of a header block (HEADERS
    or PUSH_PROMISE without END_HEADERS, until the CONTINUATION that has it)."""

    PREFACE = 24
    _HEADER_BLOCK_STARTS = (0x1, 0x5)  # HEADERS, PUSH_PROMISE
    _CONTINUATION = 0x9
    _END_HEADERS = 0x4

    def __init__(self) -> None:
        self._skip = self.PREFACE  # bytes left of the current frame (or the preface)
        self._head = b""  # a partial 9-byte frame header
        self._in_block = False

    @property
    def incomplete(self) -> bool:
        """The bytes so far end inside a frame or a header block."""
        return self._skip > 0 or bool(self._head) or self._in_block

    def feed(self, data: bytes) -> None:
        """Account for ``data``, the next bytes from the client."""
        pos, size = 0, len(data)
        while pos < size:
            if self._skip:
                take = min(self._skip, size - pos)
                self._skip -= take
                pos += take
                continue
            need = 9 - len(self._head)
            self._head += data[pos:pos + need]
            pos += min(need, size - pos)
            if len(self._head) < 9:
                return
            head, self._head = self._head, b""
            self._skip = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            if kind in self._HEADER_BLOCK_STARTS or kind == self._CONTINUATION:
                self._in_block = not flags & self._END_HEADERS


class _Stream(H2Stream):
    """One request stream: the flow's ``Downstream`` on an HTTP/2 connection."""

    def __init__(self, proto: H2Protocol, stream_id: int, content_length: int | None,
                 ended: bool) -> None:
        super().__init__(stream_id, content_length, ended)
        self.proto = proto
        self.outbox: deque[bytes] = deque()
        self.end_pending = False  # END_STREAM after the outbox
        self.finished = False  # the flow is done

    # -- Downstream -------------------------------------------------------------------
    def respond(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int | None, bodyless: bool, body: list[bytes], end: bool) -> None:
        proto = self.proto
        if self.gone:
            return
        fields, length = self._head(proto, headers, length, bodyless)
        try:
            proto.conn.send_headers(self.id, response_to_h2(status, fields, length),
                                    end_stream=bodyless and end)
        except h2.exceptions.ProtocolError:
            self._lost()
            return
        if bodyless:
            if not end:
                self.end_pending = False
            proto.flush()
            return
        self.respond_body(body, end)

    def respond_body(self, body: list[bytes], end: bool) -> None:
        if self.gone:
            return
        for piece in body:
            if piece:
                self.outbox.append(piece)
        if end:
            self.end_pending = True
        self.pump()

    def abort(self) -> None:
        self.proto.reset(self.id, INTERNAL_ERROR)
        self._lost()

    def resume_request(self) -> None:
        self.paused = False
        if self.unacked:
            self.proto.ack(self.id, self.unacked)
            self.unacked = 0
            self.proto.flush()

    def rearm(self) -> None:
        self._rearm(self.proto.loop)

    def hold(self, held: Held) -> None:
        if self.gone or not self.outbox:
            held.release()
        else:
            self.holding.append(held)

    def flow_done(self, flow: Flow) -> None:
        self.finished = True
        self._cancel_timer()
        if not self.gone and not self.ended:
            # Answered before the client finished its body (RFC 9113 8.1).
            self.proto.reset(self.id, NO_ERROR)
            self.gone = True
        self._maybe_close()

    # -- sending ----------------------------------------------------------------------
    def pump(self) -> None:
        """Send what the windows allow; pause the app's side while the rest waits."""
        proto = self.proto
        conn = proto.conn
        while self.outbox and not self.gone:
            if proto.write_paused:
                break
            try:
                window = conn.local_flow_control_window(self.id)
            except (h2.exceptions.ProtocolError, KeyError):
                self._lost()
                return
            if window <= 0:
                break
            data = self.outbox.popleft()
            size = min(window, len(data), conn.max_outbound_frame_size)
            if size < len(data):
                self.outbox.appendleft(data[size:])
                data = data[:size]
            try:
                conn.send_data(self.id, data)
            except h2.exceptions.ProtocolError:
                self._lost()
                return
        if self.gone:
            return
        if self.outbox:
            if not self.blocked and self.flow is not None:
                self.blocked = True
                self.flow.pause_response()
        else:
            if self.holding:
                self._let_go()
            if self.blocked and self.flow is not None:
                self.blocked = False
                self.flow.resume_response()
            if self.end_pending:
                self.end_pending = False
                with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                    conn.end_stream(self.id)
                if self.ended:
                    self.gone = True  # closed on both sides
        proto.flush()
        self._maybe_close()

    def _lost(self) -> None:
        if not self.gone:
            self.gone = True
        self.outbox.clear()
        flow = self.flow
        if flow is not None and not flow.done:
            flow.client_gone()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.holding and (self.gone or not self.outbox):
            self._let_go()
        if self.finished and (self.gone or not self.outbox and not self.end_pending):
            self.proto.forget(self)


class H2Protocol(H2Base):
    """One HTTP/2 connection from a client."""

    def __init__(self, server: H2Server, client: tuple[str, int] | None = None) -> None:
        super().__init__(server, client)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                # Bastion checks every request head itself (h2translate), and builds
                # response heads lower-case and clean (response_to_h2): h2's own
                # validation would only repeat that, at a cost per request.
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._frames = FrameTracker()
        self._linger: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------
    def _setup(self) -> None:
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_size,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.conn.decoder.max_header_list_size = self.limits.max_header_size
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def _lose_streams(self) -> None:
        for stream in list(self.streams.values()):
            self._drop(stream)
        self.streams.clear()

    def _writable(self) -> None:
        self._wake_senders()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("h2 connection error from %s: %s", self.client_ip, exc)
            self._flush()
            self._close()
            return
        if events:
            self._clear_stall()
        self._frames.feed(data)
        if self._incomplete():
            self._arm_stall()
        for event in events:
            if self.transport.is_closing():
                return
            self._on_event(event)
        self._flush()

    # -- events -------------------------------------------------------------------------
    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.ended:
                stream.ended = True
                if self._check_length(stream) and stream.flow is not None:
                    stream.flow.feed_end()
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self._spend(self.control, "control frame flood")
            self._wake_senders()
        elif isinstance(event, h2.events.PingReceived | h2.events.PriorityUpdated
                        | h2.events.UnknownFrameReceived):
            self._spend(self.control, "control frame flood")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closing = True
            if not self.streams:
                self._flush()
                self._close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        h1 = self._request_head(stream_id, event.headers or [])
        if h1 is not None:
            ended = event.stream_ended is not None
            self._start(_Stream(self, stream_id, h1.content_length, ended), h1)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        data = event.data or b""
        flow_len = event.flow_controlled_length or 0
        if not data and event.stream_ended is None and not self.empty_data.spend():
            self._calm("empty DATA frame flood")
            return
        stream = self.streams.get(stream_id)
        if stream is None or stream.gone or stream.flow is None or stream.flow.done:
            self.ack(stream_id, flow_len)
            return
        stream.received += len(data)
        if event.stream_ended is not None:
            stream.ended = True
        if not self._check_length(stream):
            self.ack(stream_id, flow_len)
            return
        if stream.paused:
            stream.unacked += flow_len
        else:
            self.ack(stream_id, flow_len)
        stream.flow.feed(data)
        if stream.ended and not stream.flow.done:
            stream.flow.feed_end()

    def _on_reset(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._drop(stream)
        self._spend(self.resets, "stream reset flood")

    # -- helpers --------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what h2 has for the client."""
        self._flush()

    def reset(self, stream_id: int, code: int) -> None:
        """Reset a stream (counted against the reset budget unless NO_ERROR)."""
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(stream_id, code)
        if code != NO_ERROR:
            self._spend(self.resets, "stream reset flood")

    def ack(self, stream_id: int, flow: int) -> None:
        """Open the windows again for ``flow`` bytes of DATA."""
        self._ack(stream_id, flow)

    def forget(self, stream: _Stream) -> None:
        """A stream is over on both sides."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if stream.flow is not None and stream.flow.done:
            stream.flow = None  # no stream <-> flow cycle left for the cycle collector
        self._flush()
        if not self.streams:
            if self.closing:
                self._close_soon()
            else:
                self._arm_idle()

    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)
            if self.transport.get_write_buffer_size() > MAX_OUTBOUND:
                log.info("h2 client %s does not read; connection aborted", self.client_ip)
                self.transport.abort()

    def _close_soon(self) -> None:
        """GOAWAY went out and no stream is open: close after ``GOAWAY_LINGER``."""
        if self._linger is None and self.transport is not None \
                and not self.transport.is_closing():
            self._disarm_idle()
            self._linger = self.loop.call_later(GOAWAY_LINGER, self._close)

    def _end(self, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(code)

    def _ack(self, stream_id: int, size: int) -> None:
        if size and self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.acknowledge_received_data(size, stream_id)

    def _wake_senders(self) -> None:
        for stream in list(self.streams.values()):
            stream = cast(_Stream, stream)
            if stream.outbox or stream.end_pending:
                stream.pump()

    def _incomplete(self) -> bool:
        """Whether the client left part of a frame or of a header block pending."""
        return self._frames.incomplete

    def goaway(self) -> None:
        """Graceful end: no new streams; close once the open ones are done."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.closing:
            self.closing = True
            # Written by hand: after h2's close_connection() no stream could finish.
            self._flush()
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.conn.highest_inbound_stream_id
            frame.error_code = NO_ERROR
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close_soon()


class H2Server:
    """The HTTP/2 connections of one listener."""

    def __init__(self, site: Site, connections: Connections) -> None:
        self.site = site
        self.connections = connections
        self.open: set[H2Base] = set()

    def __call__(self, client: tuple[str, int] | None = None) -> H2Protocol:
        return H2Protocol(self, client)

    def goaway_all(self) -> None:
        """GOAWAY to every connection (a graceful stop); each closes when its streams
        are done."""
        goaway_all(self.open)
