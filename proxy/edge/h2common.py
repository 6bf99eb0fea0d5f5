"""What the two HTTP/2 engines share: limits, budgets, and the connection's bookkeeping.

Theory of operation
-------------------
Bastion speaks HTTP/2 with one of two engines (:func:`proxy.edge.native.h2_engine`):
:mod:`proxy.edge.h2native` (libnghttp2 through ``_ng2``, the default) and
:mod:`proxy.edge.h2server` (the pure-Python ``h2`` library, the fallback). They differ
only in how frames are read and written. Everything else lives here, once:

- the limits (``MAX_STREAMS``, windows, ``MAX_OUTBOUND``) and the flood budgets
  (:class:`Budget`, per ``BUDGET_WINDOW``), the same for both engines;
- :class:`H2Stream`, the state every request stream keeps (the flow, what was received,
  whether the request body is paused, the flow's deadline timer, buffers held until
  sent) and the parts of the flow's ``Downstream`` that do not touch frames;
- :class:`H2Base`, one client connection without its engine: the client's address
  (from the socket or a PROXY header) and certificate, the open/closed bookkeeping with
  the listener and ``Connections``, write backpressure (reading stops while the
  transport's buffer is full), the idle and incomplete-frame timers, GOAWAY for a
  flood or a stall, and the start of a request stream as a ``Flow``;
- :func:`goaway_all`, a graceful stop's GOAWAY to the connections of one listener.

An engine subclasses these and provides the hooks: ``_flush`` (write what the engine
has), ``_writable`` (the transport takes writes again), ``_setup`` (the engine's first
frames at ``connection_made``), ``_lose_streams`` (the connection is gone), ``_end``
(GOAWAY with an error, now), ``_ack`` (open the windows for DATA taken), ``reset`` and
``goaway``; its stream class provides ``abort`` and ``_lost``.

Compiled with mypyc with ``h2native`` (``proxy.edge.native.MODULES``); the interpreted
``h2server`` subclasses the compiled classes, hence ``allow_interpreted_subclasses``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from typing import TYPE_CHECKING, Protocol, cast

from mypy_extensions import mypyc_attr

from .buffers import Held
from .codec import decoded_path
from .flow import Flow, Request
from .h2translate import H1Request, Malformed, check_body_length, request_from_h2
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

# Error codes (RFC 9113 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
ENHANCE_YOUR_CALM = 0xB


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


@mypyc_attr(allow_interpreted_subclasses=True)
class H2Stream:
    """One request stream: the flow's ``Downstream``, apart from sending frames."""

    __slots__ = ("id", "content_length", "ended", "gone", "received", "flow", "paused",
                 "unacked", "blocked", "timer", "holding")

    def __init__(self, stream_id: int, content_length: int | None, ended: bool) -> None:
        self.id = stream_id
        self.content_length = content_length
        self.ended = ended  # the client finished sending (END_STREAM seen)
        self.gone = False  # closed or reset by either side, or the connection is lost
        self.received = 0
        self.flow: Flow | None = None
        self.paused = False  # the flow asked to stop the request body
        self.unacked = 0  # flow-controlled bytes held back while paused
        self.blocked = False  # the app's side is paused until the response drains
        self.timer: asyncio.TimerHandle | None = None
        self.holding: list[Held] = []  # buffered bytes of a finished flow not yet sent

    # -- the engine's part (the rest of ``Downstream``) -----------------------------------
    def respond(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int | None, bodyless: bool, body: list[bytes], end: bool) -> None:
        raise NotImplementedError

    def respond_body(self, body: list[bytes], end: bool) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def resume_request(self) -> None:
        raise NotImplementedError

    def rearm(self) -> None:
        raise NotImplementedError

    def flow_done(self, flow: Flow) -> None:
        raise NotImplementedError

    def hold(self, held: Held) -> None:
        raise NotImplementedError

    def _lost(self) -> None:
        """The stream is over for the client: nothing more is sent, the flow stops."""
        raise NotImplementedError

    # -- Downstream -------------------------------------------------------------------
    def sendfile_transport(self) -> asyncio.Transport | None:
        return None  # frames: never the raw socket

    def pause_request(self) -> None:
        self.paused = True

    def switch(self, head: bytes, rest: bytes, conn: AppEnd) -> None:
        conn.abort()  # never asked for over HTTP/2
        self.abort()

    # -- helpers for the engines -----------------------------------------------------------
    def _head(self, proto: H2Base, headers: list[tuple[bytes, bytes]], length: int | None,
              bodyless: bool) -> tuple[list[tuple[str, str]], int | None]:
        """The response's fields (with the site's) and content length, as sent."""
        if proto.site.node.draining:
            # The node drains: GOAWAY before this answer, so the client knows before the
            # answer ends that its next request needs a new connection (through the
            # balancer, to another node); this stream is still served.
            proto.goaway()
        fields = [(n.decode("latin-1"), v.decode("latin-1"))
                  for n, v in (*headers, *proto.site.response_headers)]
        if bodyless and proto.request_method(self) != "HEAD":
            length = None
        return fields, length

    def _rearm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow the flow's deadline."""
        self._cancel_timer()
        flow = self.flow
        if flow is not None and flow.deadline is not None:
            self.timer = loop.call_later(max(0.0, flow.deadline - time.monotonic()),
                                         flow.expire)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _let_go(self) -> None:
        """Release the buffers held until sent."""
        holding, self.holding = self.holding, []
        for held in holding:
            held.release()


@mypyc_attr(allow_interpreted_subclasses=True)
class H2Base(asyncio.Protocol):
    """One HTTP/2 connection from a client, apart from its engine."""

    def __init__(self, server: Listener, client: tuple[str, int] | None = None) -> None:
        self.server = server
        self.site = server.site
        self.limits = server.site.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
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
        self._stall: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None

    # -- the engine's part ---------------------------------------------------------------
    def _setup(self) -> None:
        """The engine's start, once the client is known (before its first write)."""

    def _flush(self) -> None:
        """Write what the engine has for the client."""
        raise NotImplementedError

    def _writable(self) -> None:
        """The transport takes writes again."""
        raise NotImplementedError

    def _lose_streams(self) -> None:
        """The connection is gone: every stream is lost."""
        raise NotImplementedError

    def _end(self, code: int) -> None:
        """Queue a GOAWAY with the error ``code``: no stream goes on."""
        raise NotImplementedError

    def _ack(self, stream_id: int, size: int) -> None:
        """Open the windows again for ``size`` bytes of DATA."""
        raise NotImplementedError

    def reset(self, stream_id: int, code: int) -> None:
        """Reset a stream."""
        raise NotImplementedError

    def goaway(self) -> None:
        """Graceful end: no new streams; close once the open ones are done."""
        raise NotImplementedError

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
        self._setup()
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
        self._lose_streams()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._writable()

    def drain(self) -> None:
        """A graceful stop: GOAWAY, then close once the open streams are done."""
        self.goaway()

    def eof_received(self) -> bool | None:
        return None

    # -- streams --------------------------------------------------------------------------
    def _request_head(self, stream_id: int,
                      fields: list[tuple[bytes, bytes]]) -> H1Request | None:
        """A new stream's request, checked and translated; None when it was refused."""
        if self.closing:
            self.reset(stream_id, REFUSED_STREAM)
            return None
        try:
            return request_from_h2(fields, self.site.scheme)
        except Malformed as exc:
            log.debug("h2 malformed request from %s: %s", self.client_ip, exc)
            self.reset(stream_id, PROTOCOL_ERROR)
            return None

    def _start(self, stream: H2Stream, h1: H1Request) -> None:
        """Open ``stream`` for ``h1`` and start its flow."""
        self.streams[stream.id] = stream
        self._disarm_idle()
        ended = stream.ended
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

    def request_method(self, stream: H2Stream) -> str:
        """The method of ``stream``'s request."""
        flow = stream.flow
        return flow.request.method if flow is not None else "GET"

    def _check_length(self, stream: H2Stream) -> bool:
        try:
            check_body_length(stream.content_length, stream.received, stream.ended)
        except Malformed:
            self.reset(stream.id, PROTOCOL_ERROR)
            self._drop(stream)
            return False
        return True

    def _drop(self, stream: H2Stream) -> None:
        """Forget a stream that ended abnormally: stop its flow, free its window."""
        if stream.unacked:
            self._ack(stream.id, stream.unacked)
            stream.unacked = 0
        stream._lost()
        stream.flow = None  # (no stream <-> flow cycle left behind)
        self.streams.pop(stream.id, None)

    # -- bounds -----------------------------------------------------------------------------
    def _spend(self, budget: Budget, why: str) -> None:
        """One more event against ``budget``; beyond it, the connection ends."""
        if not budget.spend():
            self._calm(why)

    def _calm(self, why: str) -> None:
        log.info("h2 client %s: %s; GOAWAY", self.client_ip, why)
        self.closing = True
        self._end(ENHANCE_YOUR_CALM)
        self._flush()
        self._close()

    def _arm_stall(self) -> None:
        """Bytes that complete no frame (a slow header block or frame): bounded."""
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.header_timeout, self._stalled)

    def _clear_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        log.info("h2 client %s: incomplete frame for %ss; closing", self.client_ip,
                 self.limits.header_timeout)
        self.closing = True
        self._end(PROTOCOL_ERROR)
        self._flush()
        self._close()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle = self.loop.call_later(self.limits.keepalive_timeout, self.goaway)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Listener(Protocol):
    """The HTTP/2 connections of one listener (``H2NativeServer``, ``H2Server``)."""

    site: Site
    connections: Connections
    open: set[H2Base]


def goaway_all(conns: set[H2Base]) -> None:
    """GOAWAY to every connection of ``conns`` (a graceful stop); each closes when its
    streams are done."""
    for conn in list(conns):
        conn.goaway()
