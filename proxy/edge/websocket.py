"""WebSocket upgrades tunnelled to the app: frames are never parsed nor rewritten.

Theory of operation
-------------------
An HTTP/1.1 ``GET`` with ``Upgrade: websocket`` and ``Connection: upgrade``
(``is_upgrade``) goes the same way as any request (``proxy.edge.flow``: route,
endpoint, header rewrite), except that the rewritten head keeps ``Connection: Upgrade``
and the client's ``Upgrade`` (the only case where they cross), and that it goes on a
new connection, never a pooled one. The app's answer is parsed by the same strict
response parser as any other: anything but ``101`` is relayed as an ordinary answer
and the client connection closes after it. On ``101`` the head goes to the client and
both connections become one byte pipe (``Tunnel``): what either side sends is written
to the other as it is, reading from one side pauses while the other cannot take more,
and when either side closes, the other is closed (a client's half-close is passed on).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from .upstream import ResponseHead, Sink, UpstreamError

if TYPE_CHECKING:
    from .flow import Flow


class AppEnd(Protocol):
    """The app's end of a tunnel: an ``UpstreamConnection`` to an app process, or an
    in-process app's WebSocket (``proxy.edge.hosting.websocket``)."""

    sink: Sink | None  # told what comes from the app

    def write(self, data: bytes) -> None:
        """Bytes from the client."""

    def write_eof(self) -> None:
        """The client will send nothing more."""

    def pause_reading(self) -> None:
        """The client cannot take more for now."""

    def resume_reading(self) -> None:
        """The client can take more again."""

    def close(self) -> None:
        """The tunnel is over."""

    def abort(self) -> None:
        """Drop it at once."""


class Tunnel:
    """The byte pipe between a client and an app after a 101; the app connection's sink."""

    def __init__(self, client: asyncio.Transport, app: AppEnd, flow: Flow) -> None:
        self.client = client
        self.app = app
        self.flow = flow
        self.sent = 0  # bytes from the app to the client
        self.received = 0  # bytes from the client to the app
        self._closed = False

    def start(self, early: bytes, rest: bytes) -> None:
        """Take over the app connection; pass on what either side sent already."""
        self.app.sink = self
        if early:
            self.from_client(early)
        if rest:
            self.upstream_body(rest)

    # the client side
    def from_client(self, data: bytes) -> None:
        self.received += len(data)
        self.app.write(data)

    def client_eof(self) -> None:
        self.app.write_eof()

    def client_paused(self, paused: bool) -> None:
        if paused:
            self.app.pause_reading()
        else:
            self.app.resume_reading()

    def client_closed(self) -> None:
        self._end()

    # the app side (upstream.Sink)
    def upstream_head(self, head: ResponseHead) -> None:  # pragma: no cover - not after 101
        pass

    def upstream_body(self, data: bytes) -> None:
        self.sent += len(data)
        self.client.write(data)

    def upstream_end(self) -> None:
        self._end()

    def upstream_failed(self, exc: UpstreamError) -> None:
        self._end()

    def upstream_switched(self, head: ResponseHead, rest: bytes) -> None:  # pragma: no cover
        pass

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.client.resume_reading()
        else:
            self.client.pause_reading()

    def _end(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.app.close()
        if not self.client.is_closing():
            self.client.close()
        self.flow.tunnel_closed(self.sent)
