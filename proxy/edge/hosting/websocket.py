"""An in-process ASGI app's ``websocket`` scope over an HTTP/1.1 upgrade.

Theory of operation
-------------------
A WebSocket upgrade routed to an in-process ASGI app becomes a ``WebSocketCall``. The
app first gets ``websocket.connect``; its ``websocket.accept`` makes the 101 answer
(``Sec-WebSocket-Accept``, the subprotocol it chose, its extra headers), which the flow
hands to the client connection (``Flow.hosted_switched``): from then on the connection's
bytes come here through the same ``Tunnel`` as out of process, with this call as the
app's end of it (``proxy.edge.websocket.AppEnd``). A ``websocket.close`` before
``accept`` is a 403, as the ASGI spec says.

The frames are this module's to read and write (``proxy.edge.wsframes``): the client's
messages become ``websocket.receive``, pings are answered, a close frame is answered
and becomes ``websocket.disconnect`` with its code; the app's ``websocket.send`` and
``websocket.close`` become frames. A protocol violation closes with the code the
decoder names (1002, 1007, 1009). Backpressure both ways: messages waiting for the
app beyond ``QUEUE_HIGH`` bytes pause reading from the client; while the client cannot
take more, ``send`` waits. When the connection ends, the app gets
``websocket.disconnect`` (1006 unless a close was exchanged) and ``CLOSE_GRACE``
seconds to return before its task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .. import wsframes as ws
from ..errors import ProxyError
from ..upstream import ResponseHead, Sink
from .asgi import AsgiApp, Message, failure

log = logging.getLogger("bastion.hosted")

QUEUE_HIGH = 1024 * 1024  # message bytes waiting for the app before the client pauses
QUEUE_LOW = 256 * 1024
CLOSE_GRACE = 5.0
MAX_MESSAGE = 16 * 1024 * 1024


class WsFlow(Protocol):
    """What a WebSocket call needs of its flow (``proxy.edge.flow.Flow``)."""

    def upstream_head(self, head: ResponseHead) -> None:
        """A refusal's head (not a 101)."""

    def upstream_end(self) -> None:
        """The refusal is complete."""

    def hosted_switched(self, headers: list[tuple[bytes, bytes]], end: WebSocketCall) -> None:
        """Send the 101 with ``headers`` and hand the connection's bytes to ``end``."""

    def hosted_failed(self, error: ProxyError) -> None:
        """The app failed before accepting."""


class WebSocketCall:
    """One WebSocket session of an in-process ASGI app; the app's end of the tunnel."""

    def __init__(self, name: str, app: AsgiApp, scope: dict[str, Any], flow: WsFlow,
                 key: bytes, done: Callable[[], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.name = name
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self.flow = flow
        self.sink: Sink | None = None  # set by the Tunnel after the 101
        self._app = app
        self._scope = scope
        self._key = key
        self._decoder = ws.Decoder(MAX_MESSAGE)
        self._queue: deque[Message] = deque([{"type": "websocket.connect"}])
        self._queued = 0
        self._paused_client = False
        self._wake: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused_out = False
        self.accepted = False
        self.refused = False
        self._close_sent = False
        self.ended = False  # the connection is over (disconnect delivered or queued)
        self._done = done
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Call the app with the ``websocket`` scope."""
        self.task = self._loop.create_task(self._run())

    # -- the flow's side before the 101 (a HostedCall) ------------------------------------
    def feed(self, data: bytes) -> None:
        """No body comes with an upgrade request; frames come through ``write``."""
        self.write(data)

    def feed_end(self) -> None:
        """Nothing to do: the upgrade request has no body."""

    def pause(self) -> None:
        """The client cannot take more (before the 101)."""
        self.pause_reading()

    def resume(self) -> None:
        """The client can take more again (before the 101)."""
        self.resume_reading()

    def close(self, abort: bool = False) -> None:
        """The exchange or the tunnel is over: the app is told, then given a grace."""
        del abort
        self._ended(ws.ABNORMAL)

    # -- the tunnel's side (AppEnd) -----------------------------------------------------
    def write(self, data: bytes) -> None:
        """Bytes from the client: frames."""
        if self.ended or self._decoder.closed:
            return
        try:
            events = self._decoder.feed(data)
        except ws.FrameError as exc:
            log.info("app %s: websocket closed, %s", self.name, exc.reason)
            self._send_close(exc.code, exc.reason)
            self._disconnect(exc.code)
            self._end_tunnel()
            return
        for event in events:
            if isinstance(event, ws.Message):
                if isinstance(event.data, str):
                    self._push({"type": "websocket.receive", "text": event.data},
                               len(event.data))
                else:
                    self._push({"type": "websocket.receive", "bytes": event.data},
                               len(event.data))
            elif isinstance(event, ws.Ping):
                self._frame(ws.encode(ws.PONG, event.payload))
            elif isinstance(event, ws.Close):
                code = event.code if event.code != ws.NO_STATUS else ws.NORMAL
                self._send_close(event.code, "")
                self._disconnect(code)
                self._end_tunnel()

    def write_eof(self) -> None:
        """The client half-closed without a close frame."""
        self._ended(ws.ABNORMAL)

    def pause_reading(self) -> None:
        """The client's buffer is full: the app's sends wait."""
        self._paused_out = True

    def resume_reading(self) -> None:
        """The client takes more again."""
        self._paused_out = False
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def abort(self) -> None:
        """Drop at once."""
        self._ended(ws.ABNORMAL)

    # -- internals ----------------------------------------------------------------------
    def _push(self, message: Message, size: int) -> None:
        self._queue.append(message)
        self._queued += size
        if self._queued > QUEUE_HIGH and not self._paused_client and self.sink is not None:
            self._paused_client = True
            self.sink.upstream_writable(False)
        self._wakeup()

    def _wakeup(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _disconnect(self, code: int) -> None:
        if not self.ended:
            self.ended = True
            self._queue.append({"type": "websocket.disconnect", "code": code})
            self._wakeup()
            self.resume_reading()

    def _ended(self, code: int) -> None:
        self._disconnect(code)
        if self.task is not None and not self.task.done():
            self._loop.call_later(CLOSE_GRACE, self._cancel)

    def _cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _frame(self, data: bytes) -> None:
        if self.sink is not None and not self._close_sent:
            self.sink.upstream_body(data)

    def _send_close(self, code: int, reason: str) -> None:
        if not self._close_sent and self.sink is not None:
            self.sink.upstream_body(ws.encode_close(code, reason))
            self._close_sent = True

    def _end_tunnel(self) -> None:
        sink = self.sink
        if sink is not None:
            sink.upstream_end()

    # -- for the app --------------------------------------------------------------------
    async def receive(self) -> Message:
        """ASGI ``receive``."""
        while not self._queue:
            self._wake = self._loop.create_future()
            await self._wake
            self._wake = None
        message = self._queue.popleft()
        if message["type"] == "websocket.receive":
            self._queued -= len(message.get("text") or message.get("bytes") or b"")
            if self._paused_client and self._queued <= QUEUE_LOW and self.sink is not None:
                self._paused_client = False
                self.sink.upstream_writable(True)
        return message

    async def send(self, message: Message) -> None:
        """ASGI ``send``."""
        kind = message["type"]
        if kind == "websocket.accept":
            if self.accepted or self.refused:
                raise RuntimeError("websocket.accept after the handshake was answered")
            self.accepted = True
            headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                       (b"Sec-WebSocket-Accept", ws.accept_key(self._key))]
            if message.get("subprotocol"):
                headers.append((b"Sec-WebSocket-Protocol",
                                str(message["subprotocol"]).encode("latin-1")))
            for name, value in message.get("headers", ()):
                if bytes(name).lower() not in (b"sec-websocket-accept", b"upgrade",
                                               b"connection", b"sec-websocket-protocol"):
                    headers.append((bytes(name), bytes(value)))
            self.flow.hosted_switched(headers, self)
            return
        if kind == "websocket.close" and not self.accepted:
            if not self.refused:
                self.refused = True
                self.flow.upstream_head(ResponseHead(
                    403, b"", [(b"content-length", b"0")], 0, False, 1))
                self.flow.upstream_end()
            return
        if kind not in ("websocket.send", "websocket.close"):
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.accepted:
            raise RuntimeError(f"{kind} before websocket.accept")
        if self.ended or self._close_sent:
            return  # the connection is gone or closing: nothing more goes out
        if kind == "websocket.close":
            self._send_close(int(message.get("code") or ws.NORMAL),
                             str(message.get("reason") or ""))
            self._disconnect(int(message.get("code") or ws.NORMAL))
            self._end_tunnel()
            return
        text = message.get("text")
        if text is not None:
            self._frame(ws.encode(ws.TEXT, str(text).encode("utf-8")))
        else:
            self._frame(ws.encode(ws.BINARY, bytes(message.get("bytes") or b"")))
        while self._paused_out and not self.ended:
            self._writable = self._loop.create_future()
            await self._writable
            self._writable = None

    async def _run(self) -> None:
        try:
            await self._app(self._scope, self.receive, self.send)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - the app's own failure
            if not self.accepted and not self.refused:
                error = failure(self.name, exc)
                log.error("app %s: %s", self.name, error.detail.rstrip())
                self.flow.hosted_failed(error)
            else:
                log.error("app %s: websocket handler raised %r", self.name, exc)
                self._send_close(ws.INTERNAL_ERROR, "")
                self._disconnect(ws.INTERNAL_ERROR)
                self._end_tunnel()
            return
        finally:
            if self._done is not None:
                self._done()
        if not self.accepted and not self.refused:
            self.refused = True
            self.flow.upstream_head(ResponseHead(403, b"", [(b"content-length", b"0")], 0,
                                                 False, 1))
            self.flow.upstream_end()
        elif self.accepted and not self._close_sent and not self.ended:
            self._send_close(ws.NORMAL, "")
            self._disconnect(ws.NORMAL)
            self._end_tunnel()
