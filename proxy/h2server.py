"""HTTP/2 on TLS listeners (ALPN ``h2``), each stream forwarded as HTTP/1.1 to the app.

Theory of operation
-------------------
A TLS listener with ``http2: true`` offers ``h2`` and ``http/1.1`` by ALPN. Its protocol
factory makes an :class:`AlpnSelector` per connection. With asyncio's (and uvloop's)
TLS transports the application protocol's ``connection_made`` runs once the handshake
is done, so the selector reads ``ssl_object.selected_alpn_protocol()`` there and hands
every later callback either to aiohttp's ``RequestHandler`` (HTTP/1.1, unchanged) or to
an :class:`H2Protocol` (delegation rather than ``set_protocol``, so wrappers around it,
such as the connection counter, keep seeing the connection end).

:class:`H2Protocol` drives an ``h2.connection.H2Connection`` (sans-I/O). Each request
stream is checked and translated by :mod:`proxy.h2translate`, then served by a task
that goes the *same* way as HTTP/1.1: ``RequestHandler.leased`` (route, endpoint,
header rewrite), ``forwarding.exchange`` (the app over the keep-alive pool), the same
error pages (``RequestHandler.error_parts``), HSTS and access log.

Flow control is end to end. Received DATA is acknowledged (WINDOW_UPDATE) only when the
upload to the app has taken it, so a slow app slows the client; the connection window is
opened to ``CONNECTION_WINDOW`` so one stalled stream cannot block the others. Response
DATA is sent only within the peer's stream and connection windows (and while the TLS
transport is not paused), waiting for WINDOW_UPDATE, at most ``body_timeout`` each time.

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
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from yarl import URL

from .accesslog import LogEntry
from .errors import ProxyError, RequestRejected
from .forwarding import BodyTimeout, UpstreamBroken
from .h2translate import H1Request, Malformed, check_body_length, request_from_h2, response_to_h2

if TYPE_CHECKING:
    from .config import Limits
    from .server import RequestHandler

log = logging.getLogger("bastion.h2")

MAX_STREAMS = 100
STREAM_WINDOW = 65535  # the RFC default: per-stream upload buffering is bounded by it
CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_OUTBOUND = 4 * 1024 * 1024
BUDGET_WINDOW = 10.0
RESET_BUDGET = 200  # stream resets (received or sent) per window
CONTROL_BUDGET = 1000  # PING, SETTINGS, PRIORITY, unknown frames per window
EMPTY_DATA_BUDGET = 100  # DATA frames without payload nor END_STREAM per window


class _Budget:
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


class _StreamGone(Exception):
    """The client reset the stream or the connection went away."""


class _Stream:
    """One request stream: its request, its body queue and its task."""

    def __init__(self, stream_id: int, request: H1Request, ended: bool) -> None:
        self.id = stream_id
        self.request = request
        self.ended = ended  # the client finished sending (END_STREAM seen)
        self.gone = False  # reset by either side, or the connection is lost
        self.received = 0
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.readable = asyncio.Event()
        self.headers_sent = False
        self.too_large = False
        self.task: asyncio.Task[None] | None = None


class H2Protocol(asyncio.Protocol):
    """One HTTP/2 connection from a client."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=True,
                normalize_inbound_headers=False,
                validate_outbound_headers=True,
                normalize_outbound_headers=True,
            )
        )
        self.streams: dict[int, _Stream] = {}
        self.resets = _Budget(RESET_BUDGET)
        self.control = _Budget(CONTROL_BUDGET)
        self.empty_data = _Budget(EMPTY_DATA_BUDGET)
        self.client_ip = "127.0.0.1"
        self.client_cert: str | None = None
        self.closing = False  # GOAWAY sent: no new streams
        self.write_paused = False
        self._send_ready = asyncio.Event()
        self._stall: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0])
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            der = ssl_object.getpeercert(binary_form=True)
            self.client_cert = base64.b64encode(der).decode("ascii") if der else None
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
        self.server.connections.add(self)
        self._flush()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        for timer in (self._stall, self._idle):
            if timer is not None:
                timer.cancel()
        for stream in list(self.streams.values()):
            self._drop(stream)
        self._wake_senders()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._wake_senders()

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
            if stream is not None:
                stream.ended = True
                self._check_length(stream)
                stream.readable.set()
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
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        try:
            request = request_from_h2(event.headers or [], self.handler.scheme)
        except Malformed as exc:
            log.debug("h2 malformed request from %s: %s", self.client_ip, exc)
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = _Stream(stream_id, request, event.stream_ended is not None)
        self.streams[stream_id] = stream
        self._disarm_idle()
        stream.task = self._loop.create_task(self._serve(stream))

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        data = event.data or b""
        flow = event.flow_controlled_length or 0
        if not data and event.stream_ended is None and not self.empty_data.spend():
            self._calm("empty DATA frame flood")
            return
        stream = self.streams.get(stream_id)
        if stream is None or stream.gone:
            self._ack(stream_id, flow)
            return
        stream.received += len(data)
        if event.stream_ended is not None:
            stream.ended = True
        if not self._check_length(stream):
            self._ack(stream_id, flow)
            return
        max_body = self.limits.max_body_size
        if max_body and stream.received > max_body:
            stream.too_large = True
            self._ack(stream_id, flow)
        else:
            stream.chunks.append((data, flow))
        stream.readable.set()

    def _check_length(self, stream: _Stream) -> bool:
        try:
            check_body_length(stream.request.content_length, stream.received, stream.ended)
        except Malformed:
            self._reset(stream.id, ErrorCodes.PROTOCOL_ERROR)
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
    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)
            if self.transport.get_write_buffer_size() > MAX_OUTBOUND:
                log.info("h2 client %s does not read; connection aborted", self.client_ip)
                self.transport.abort()

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
        """Forget a stream that ended abnormally: stop its task, free its window."""
        if stream.gone:
            return
        stream.gone = True
        stream.readable.set()
        for _, flow in stream.chunks:
            self._ack(stream.id, flow)
        stream.chunks.clear()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _wake_senders(self) -> None:
        self._send_ready.set()
        self._send_ready = asyncio.Event()

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
        """Whether h2 holds part of a frame or of a header block (HEADERS+CONTINUATION)."""
        buffer = self.conn.incoming_buffer
        return bool(getattr(buffer, "_data", None)) or bool(getattr(buffer, "_headers_buffer", None))

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
            self._close()

    # -- a stream -------------------------------------------------------------------------
    async def _body(self, stream: _Stream) -> AsyncIterator[bytes]:
        """The request body for the app; each chunk acknowledged once the upload took it."""
        while True:
            if not stream.chunks and not stream.ended and not stream.gone \
                    and not stream.too_large:
                stream.readable.clear()
                try:
                    await asyncio.wait_for(stream.readable.wait(), self.limits.body_timeout)
                except TimeoutError as exc:
                    raise BodyTimeout() from exc
                continue
            if stream.gone:
                raise _StreamGone()
            if stream.too_large:
                raise RequestRejected(413, "the request body is larger than allowed")
            if stream.chunks:
                data, flow = stream.chunks.popleft()
                yield data
                self._ack(stream.id, flow)
                self._flush()
                continue
            return

    async def _serve(self, stream: _Stream) -> None:
        started = time.monotonic()
        request = stream.request
        status, sent, app, pid = 500, 0, "-", 0
        try:
            status, sent, app, pid = await self._forward(stream)
        except ProxyError as error:
            status, app = error.status, error.app or "-"
            if not stream.headers_sent and not stream.gone:
                sent = await self._error_page(stream, error)
            else:
                self._reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        except (_StreamGone, asyncio.CancelledError):
            status = 499 if not stream.headers_sent else status
        except UpstreamBroken:
            self._reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        except Exception:  # noqa: BLE001 - one stream must not take the connection down
            log.exception("h2 stream %d failed", stream.id)
            if not stream.headers_sent and not stream.gone:
                sent = await self._error_page(stream, ProxyError("internal error"))
            else:
                self._reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        finally:
            if not stream.gone and not stream.ended:
                # Answered before the client finished its body (RFC 9113 8.1).
                self._reset(stream.id, ErrorCodes.NO_ERROR)
            self._drop(stream)
            self.streams.pop(stream.id, None)
            self._flush()
            headers = dict(request.headers)
            self.handler.finished(
                LogEntry(self.client_ip, request.method, request.target, "HTTP/2.0",
                         headers.get("referer", "-"), headers.get("user-agent", "-")),
                status, sent, app, pid, time.monotonic() - started,
            )
            if not self.streams:
                if self.closing:
                    self._close()
                else:
                    self._arm_idle()

    async def _forward(self, stream: _Stream) -> tuple[int, int, str, int]:
        from .server import Front  # server imports this module

        request = stream.request
        limits = self.limits
        if (limits.max_body_size and request.content_length is not None
                and request.content_length > limits.max_body_size):
            raise RequestRejected(413, "the request body is larger than allowed")
        path = "*" if request.target == "*" else URL(request.target, encoded=True).path
        front = Front(request.method, request.target, request.authority, path,
                      request.headers, self.client_ip, self.client_cert)
        has_body = not stream.ended or stream.received > 0 or bool(stream.chunks)
        body = self._body(stream) if has_body else None
        length = request.content_length if has_body else None
        async with self.handler.connected(front, body, length) as (leased, upstream):
            if stream.gone:
                raise _StreamGone()
            fields = [*upstream.headers, *self.handler.response_headers]
            length = upstream.content_length
            if upstream.bodyless and request.method != "HEAD":
                length = None
            self.conn.send_headers(stream.id, response_to_h2(upstream.status, fields, length),
                                   end_stream=upstream.bodyless)
            stream.headers_sent = True
            self._flush()
            sent = 0
            if not upstream.bodyless:
                async for chunk in upstream.body():
                    await self._send(stream, chunk)
                    sent += len(chunk)
                self._end(stream)
            return upstream.status, sent, leased.app, leased.pid

    async def _error_page(self, stream: _Stream, error: ProxyError) -> int:
        headers, body = self.handler.error_parts(error)
        try:
            self.conn.send_headers(stream.id, response_to_h2(error.status, headers, len(body)),
                                   end_stream=False)
            stream.headers_sent = True
            self._flush()
            await self._send(stream, body)
            self._end(stream)
        except (_StreamGone, h2.exceptions.ProtocolError, asyncio.CancelledError):
            return 0
        return len(body)

    def _end(self, stream: _Stream) -> None:
        if stream.gone:
            raise _StreamGone()
        self.conn.end_stream(stream.id)
        self._flush()

    async def _send(self, stream: _Stream, data: bytes) -> None:
        """Send ``data`` on ``stream`` within the flow-control windows."""
        view = memoryview(data)
        while view:
            if stream.gone or self.transport is None or self.transport.is_closing():
                raise _StreamGone()
            try:
                window = self.conn.local_flow_control_window(stream.id)
            except (h2.exceptions.ProtocolError, KeyError):
                raise _StreamGone() from None
            if window <= 0 or self.write_paused:
                ready = self._send_ready
                try:
                    await asyncio.wait_for(ready.wait(), self.limits.body_timeout)
                except TimeoutError:
                    self._reset(stream.id, ErrorCodes.CANCEL)
                    raise _StreamGone() from None
                continue
            size = min(window, len(view), self.conn.max_outbound_frame_size)
            try:
                self.conn.send_data(stream.id, view[:size].tobytes())
            except h2.exceptions.ProtocolError:
                raise _StreamGone() from None
            view = view[size:]
            self._flush()


class H2Server:
    """The HTTP/2 connections of one listener (for a graceful stop)."""

    def __init__(self, handler: RequestHandler, limits: Limits) -> None:
        self.handler = handler
        self.limits = limits
        self.connections: set[H2Protocol] = set()

    def __call__(self) -> H2Protocol:
        return H2Protocol(self)

    async def shutdown(self, grace: float) -> None:
        """GOAWAY to every connection, wait up to ``grace`` for their streams, close."""
        for conn in list(self.connections):
            conn.goaway()
        deadline = time.monotonic() + grace
        while any(c.streams for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()


class AlpnSelector(asyncio.Protocol):
    """Picks HTTP/2 or HTTP/1.1 once the TLS handshake chose a protocol; delegates."""

    def __init__(self, http1: Callable[[], asyncio.BaseProtocol],
                 http2: Callable[[], asyncio.BaseProtocol]) -> None:
        self._http1 = http1
        self._http2 = http2
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        inner = cast(asyncio.Protocol, self._http2() if alpn == "h2" else self._http1())
        self.inner = inner
        inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
