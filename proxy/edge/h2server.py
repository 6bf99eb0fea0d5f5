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
task is made per stream.

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
import base64
import contextlib
import logging
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from .buffers import Held
from .codec import decoded_path
from .flow import Flow, Request
from .h2translate import Malformed, check_body_length, request_from_h2, response_to_h2
from .websocket import AppEnd

if TYPE_CHECKING:
    from .connections import Connections
    from .site import Site

log = logging.getLogger("bastion.h2")

MAX_STREAMS = 100
STREAM_WINDOW = 65535  # the RFC default: per-stream upload buffering is bounded by it
CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_OUTBOUND = 4 * 1024 * 1024
BUDGET_WINDOW = 10.0
RESET_BUDGET = 200  # stream resets (received or sent) per window
CONTROL_BUDGET = 1000  # PING, SETTINGS, PRIORITY, unknown frames per window
EMPTY_DATA_BUDGET = 100  # DATA frames without payload nor END_STREAM per window
# After a graceful GOAWAY, the connection stays open this long (or until the client
# closes it): a request the client sent before it read the GOAWAY is refused with
# REFUSED_STREAM, which it may safely retry on a new connection, instead of being cut
# by a closed socket (whose reset could also destroy the GOAWAY on its way).
GOAWAY_LINGER = 1.0


class Budget:
    """Counts events per fixed window; ``spend`` is False once over the limit."""

    def __init__(self, limit: int, window: float = BUDGET_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.start = time.monotonic()
        self.count = 0

    def spend(self, n: int = 1) -> bool:
        now = time.monotonic()
        if now - self.start > self.window:
            self.start, self.count = now, 0
        self.count += n
        return self.count <= self.limit


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


class _Stream:
    """One request stream: the flow's ``Downstream`` on an HTTP/2 connection."""

    def __init__(self, proto: H2Protocol, stream_id: int, content_length: int | None,
                 ended: bool) -> None:
        self.proto = proto
        self.id = stream_id
        self.content_length = content_length
        self.ended = ended  # the client finished sending (END_STREAM seen)
        self.gone = False  # reset by either side, or the connection is lost
        self.received = 0
        self.flow: Flow | None = None
        self.paused = False  # the flow asked to stop the request body
        self.unacked = 0  # flow-controlled bytes held back while paused
        self.outbox: deque[bytes] = deque()
        self.end_pending = False  # END_STREAM after the outbox
        self.blocked = False  # the outbox waits for the window (the app's reading paused)
        self.finished = False  # the flow is done
        self.timer: asyncio.TimerHandle | None = None
        self.holding: list[Held] = []  # buffered bytes of a finished flow in the outbox

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

    def sendfile_transport(self) -> asyncio.Transport | None:
        return None  # frames: never the raw socket

    def abort(self) -> None:
        self.proto.reset(self.id, ErrorCodes.INTERNAL_ERROR)
        self._lost()

    def pause_request(self) -> None:
        self.paused = True

    def resume_request(self) -> None:
        self.paused = False
        if self.unacked:
            self.proto.ack(self.id, self.unacked)
            self.unacked = 0
            self.proto.flush()

    def rearm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        flow = self.flow
        if flow is not None and flow.deadline is not None:
            self.timer = self.proto.loop.call_later(
                max(0.0, flow.deadline - time.monotonic()), flow.expire)

    def hold(self, held: Held) -> None:
        if self.gone or not self.outbox:
            held.release()
        else:
            self.holding.append(held)

    def _let_go(self) -> None:
        holding = self.holding
        self.holding = []
        for held in holding:
            held.release()

    def switch(self, head: bytes, rest: bytes, conn: AppEnd) -> None:
        conn.abort()  # never asked for over HTTP/2
        self.abort()

    def flow_done(self, flow: Flow) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.gone and not self.ended:
            # Answered before the client finished its body (RFC 9113 8.1).
            self.proto.reset(self.id, ErrorCodes.NO_ERROR)
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


class H2Protocol(asyncio.Protocol):
    """One HTTP/2 connection from a client."""

    def __init__(self, server: H2Server, client: tuple[str, int] | None = None) -> None:
        self.server = server
        self.site = server.site
        self.limits = server.site.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
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
        self.streams: dict[int, _Stream] = {}
        self.resets = Budget(RESET_BUDGET)
        self.control = Budget(CONTROL_BUDGET)
        self.empty_data = Budget(EMPTY_DATA_BUDGET)
        self.client_ip = "127.0.0.1"
        self.client_port = 0
        self._client = client  # from a PROXY header: the client behind the balancer
        self.client_cert: str | None = None
        self.closing = False  # GOAWAY sent: no new streams
        self.write_paused = False
        self._trusted = False
        self._frames = FrameTracker()
        self._stall: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

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
        self.server.open.add(self)
        self.server.connections.opened(self)
        self._flush()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)
        self.server.connections.closed(self)
        self.closing = True
        for timer in (self._stall, self._idle, self._linger):
            if timer is not None:
                timer.cancel()
        for stream in list(self.streams.values()):
            self._drop(stream)
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._wake_senders()

    def drain(self) -> None:
        """A graceful stop: GOAWAY, then close once the open streams are done."""
        self.goaway()

    def eof_received(self) -> bool | None:
        return None

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
        if self._stall is None and self._incomplete():
            # Bytes that complete no frame (a slow header block or frame): bounded.
            self._stall = self._loop.call_later(self.limits.header_timeout, self._stalled)
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
                self._spend_control()
            self._wake_senders()
        elif isinstance(event, h2.events.PingReceived | h2.events.PriorityUpdated
                        | h2.events.UnknownFrameReceived):
            self._spend_control()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closing = True
            if not self.streams:
                self._flush()
                self._close()

    def _spend_control(self) -> None:
        if not self.control.spend():
            self._calm("control frame flood")

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        if self.closing:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        try:
            h1 = request_from_h2(event.headers or [], self.site.scheme)
        except Malformed as exc:
            log.debug("h2 malformed request from %s: %s", self.client_ip, exc)
            self.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        ended = event.stream_ended is not None
        stream = _Stream(self, stream_id, h1.content_length, ended)
        self.streams[stream_id] = stream
        self._disarm_idle()
        target = h1.target
        path = decoded_path(target)
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in h1.headers]
        has_body = not ended and h1.content_length != 0
        request = Request(h1.method, target, h1.authority, path, headers, self.client_ip,
                          self.client_cert, h1.content_length if has_body else None,
                          has_body, "HTTP/2.0", trusted=self._trusted,
                          client_port=self.client_port)
        flow = Flow(self.site, request, stream)
        stream.flow = flow
        flow.start()
        if ended and not flow.done:
            flow.feed_end()

    def request_method(self, stream: _Stream) -> str:
        """The method of ``stream``'s request."""
        flow = stream.flow
        return flow.request.method if flow is not None else "GET"

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

    def _check_length(self, stream: _Stream) -> bool:
        try:
            check_body_length(stream.content_length, stream.received, stream.ended)
        except Malformed:
            self.reset(stream.id, ErrorCodes.PROTOCOL_ERROR)
            self._drop(stream)
            return False
        return True

    def _on_reset(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._drop(stream)
        if not self.resets.spend():
            self._calm("stream reset flood")

    # -- helpers --------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what h2 has for the client."""
        self._flush()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        """Reset a stream (counted against the reset budget unless NO_ERROR)."""
        self._reset(stream_id, code)

    def ack(self, stream_id: int, flow: int) -> None:
        """Open the windows again for ``flow`` bytes of DATA."""
        self._ack(stream_id, flow)

    def forget(self, stream: _Stream) -> None:
        """A stream is over on both sides."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
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
            self._linger = self._loop.call_later(GOAWAY_LINGER, self._close)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _calm(self, why: str) -> None:
        log.info("h2 client %s: %s; GOAWAY", self.client_ip, why)
        self.closing = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._flush()
        self._close()

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(stream_id, code)
        if code != ErrorCodes.NO_ERROR and not self.resets.spend():
            self._calm("stream reset flood")

    def _ack(self, stream_id: int, flow: int) -> None:
        if flow and self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.acknowledge_received_data(flow, stream_id)

    def _drop(self, stream: _Stream) -> None:
        """Forget a stream that ended abnormally: stop its flow, free its window."""
        if stream.unacked:
            self._ack(stream.id, stream.unacked)
            stream.unacked = 0
        stream._lost()
        self.streams.pop(stream.id, None)

    def _wake_senders(self) -> None:
        for stream in list(self.streams.values()):
            if stream.outbox or stream.end_pending:
                stream.pump()

    def _stalled(self) -> None:
        self._stall = None
        log.info("h2 client %s: incomplete frame for %ss; closing", self.client_ip,
                 self.limits.header_timeout)
        self.closing = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
        self._flush()
        self._close()

    def _incomplete(self) -> bool:
        """Whether the client left part of a frame or of a header block pending."""
        return self._frames.incomplete

    def _clear_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle = self._loop.call_later(self.limits.keepalive_timeout, self.goaway)

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
            # Written by hand: after h2's close_connection() no stream could finish.
            self._flush()
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.conn.highest_inbound_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close_soon()


class H2Server:
    """The HTTP/2 connections of one listener."""

    def __init__(self, site: Site, connections: Connections) -> None:
        self.site = site
        self.connections = connections
        self.open: set[H2Protocol] = set()

    def __call__(self, client: tuple[str, int] | None = None) -> H2Protocol:
        return H2Protocol(self, client)

    def goaway_all(self) -> None:
        """GOAWAY to every connection (a graceful stop); each closes when its streams
        are done."""
        for conn in list(self.open):
            conn.goaway()

