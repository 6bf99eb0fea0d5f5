"""The listening sockets of one worker, its client connections and its graceful stop.

Theory of operation
-------------------
Each bound socket is served by the event loop's own accept loop
(``loop.create_server``: uvloop accepts and runs TLS handshakes in C, with no task per
connection), making an ``H1Connection`` per client, or on a TLS listener with
``http2`` an ``AlpnSelector`` that picks HTTP/2 or HTTP/1.1 once the handshake chose.
HTTP/2 is served by the engine ``native.h2_engine`` names (``h2_server``): libnghttp2
(``h2native``) when built, else the ``h2`` library (``h2server``).

A listener with ``proxy_protocol`` is served by ``proxyaccept.ProxyAcceptor`` instead
(its connections start with a PROXY header, read before TLS); it stops and resumes
accepting the same way, and the protocols it makes take the header's client address.

``Connections`` counts this worker's open client connections against
``max_connections``. At the limit every server stops accepting (``Server.close``
closes only its duplicate of the socket: the listening socket stays open, so further
clients wait in the kernel's backlog, as with nginx's ``worker_connections``); when a
connection ends, accepting resumes on fresh duplicates.

A graceful stop (``ListenerSet.stop``) stops accepting, then drains: idle keep-alive
connections close at once (a client retries on a new connection, which another worker
generation accepts), a connection accepted just before the stop may still send its
first request (also one the event loop accepted but has not reported yet: see
``connections``), busy ones close after their answer (``Connection: close``), HTTP/2 ones
get GOAWAY; whatever is left at the grace time's end is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ..config.model import Config, Listener
from .connections import Connections, Drainable
from .h1 import H1Connection
from .h2server import H2Server
from .native import h2_engine
from .proxyaccept import MakeProtocol, ProxyAcceptor
from .site import Site

if TYPE_CHECKING:
    from .h2native import H2NativeServer

log = logging.getLogger("bastion.proxy")

HANDSHAKE_TIMEOUT = 10.0


def bind_socket(listener: Listener, backlog: int = 1024) -> socket.socket:
    """Bind and listen on ``listener``'s address (raises OSError with a clear message)."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.host, listener.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {listener.address}: {exc.strerror}") from exc
    return sock


class AlpnSelector(asyncio.Protocol):
    """The protocol of a TLS connection until its handshake is done: picks HTTP/2 or
    HTTP/1.1 by what ALPN chose, then hands the transport over to it
    (``set_protocol``): no layer stays in between. One that is dropped without a
    connection was a failed handshake (the event loop reports those to nobody): it is
    counted then (``failed``)."""

    __slots__ = ("_http1", "_http2", "_failed", "_made", "_client")

    def __init__(self, http1: MakeProtocol, http2: MakeProtocol | None,
                 failed: Callable[[], None] | None = None, client: tuple[str, int] | None = None) -> None:
        self._http1 = http1
        self._http2 = http2
        self._failed = failed
        self._made = False
        self._client = client  # from a PROXY header

    def __del__(self) -> None:
        if not self._made and self._failed is not None:
            self._failed()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        inner = self._http2(self._client) if alpn == "h2" and self._http2 is not None \
            else self._http1(self._client)
        transport.set_protocol(inner)
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - handed over first
        raise RuntimeError("ALPN selector got data after the handshake")


class _Served:
    """One listening socket and the server accepting on (a duplicate of) it."""

    def __init__(self, sock: socket.socket, factory: MakeProtocol,
                 context: ssl.SSLContext | None) -> None:
        self.sock = sock

        def direct() -> asyncio.Protocol:  # the peer is the client
            return factory(None)

        self.factory = direct
        self.context = context
        self.server: asyncio.AbstractServer | None = None
        self.stopped = False

    async def start(self) -> None:
        if self.server is not None or self.stopped or self.sock.fileno() < 0:
            return
        dup = self.sock.dup()
        dup.setblocking(False)
        loop = asyncio.get_running_loop()
        if self.context is not None:
            self.server = await loop.create_server(
                self.factory, sock=dup, backlog=1024, ssl=self.context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        else:
            self.server = await loop.create_server(self.factory, sock=dup, backlog=1024)

    def pause(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def _nothing() -> None:
    return None


def h2_server(site: Site, connections: Connections) -> H2Server | H2NativeServer:
    """The HTTP/2 side of a TLS listener, on this process's engine."""
    if h2_engine() == "ng2":
        from .h2native import H2NativeServer
        return H2NativeServer(site, connections)
    return H2Server(site, connections)


class ListenerSet:
    """The running listeners of one worker."""

    def __init__(self) -> None:
        self._served: list[_Served | ProxyAcceptor] = []
        self._h2: list[H2Server | H2NativeServer] = []
        self.connections = Connections(0, self._full)
        self._resume: asyncio.Task[None] | None = None

    async def start(
        self,
        sockets: list[tuple[Listener, socket.socket, ssl.SSLContext | None]],
        sites: dict[str, Site],
        config: Config,
    ) -> None:
        """Serve each bound socket with its site."""
        self.connections.limit = config.limits.max_connections
        connections = self.connections
        metrics = next((site.metrics for site in sites.values()), None)
        counted = metrics.tls_handshake_failed if metrics is not None else _nothing

        def failed() -> None:
            connections.gone()
            counted()

        for listener, sock, context in sockets:
            site = sites[listener.address]

            def http1(client: tuple[str, int] | None = None, site: Site = site) -> asyncio.Protocol:
                return H1Connection(site, connections, client)

            def accepted(client: tuple[str, int] | None = None, site: Site = site) -> asyncio.Protocol:
                connections.arrive()
                return H1Connection(site, connections, client)

            factory: MakeProtocol = accepted
            if context is not None:
                h2: MakeProtocol | None = None
                if listener.http2:
                    server = h2_server(site, connections)
                    self._h2.append(server)
                    h2 = server

                def selector(client: tuple[str, int] | None = None, h1: MakeProtocol = http1,
                             h2: MakeProtocol | None = h2) -> asyncio.Protocol:
                    connections.arrive()
                    return AlpnSelector(h1, h2, failed, client)

                factory = selector
            served: _Served | ProxyAcceptor
            if listener.proxy_protocol:
                served = ProxyAcceptor(sock, factory, context, site.trusted, connections,
                                       site.metrics, config.limits.header_timeout)
            else:
                served = _Served(sock, factory, context)
            self._served.append(served)
            await served.start()

    def _full(self, full: bool) -> None:
        if full:
            for served in self._served:
                served.pause()
        elif self._resume is None:
            self._resume = asyncio.get_running_loop().create_task(self._resume_all())

    async def _resume_all(self) -> None:
        try:
            for served in self._served:
                await served.start()
        finally:
            self._resume = None

    def goaway_http2(self) -> None:
        """GOAWAY to every HTTP/2 connection (the node drains): each closes once its
        streams are done, and its client opens a new connection, through the balancer."""
        for h2_server in self._h2:
            h2_server.goaway_all()

    def open_connections(self) -> int:
        """Client connections open now on these listeners."""
        return len(self.connections.open)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish up to ``grace``, then close."""
        for served in self._served:
            served.stopped = True
            served.pause()
            with contextlib.suppress(OSError):
                served.sock.close()
        if self._resume is not None:
            self._resume.cancel()
        self.connections.draining = True
        for h2_server in self._h2:
            h2_server.goaway_all()
        deadline = time.monotonic() + grace
        drained: set[Drainable] = set()
        while True:
            open_now = list(self.connections.open)
            if self.connections.settled or time.monotonic() >= deadline:
                break
            for conn in open_now:
                if conn not in drained:
                    drained.add(conn)
                    conn.drain()
            await asyncio.sleep(0.05)
        if open_now:
            log.warning("stop: %d connection(s) still open after %gs; closing them",
                        len(open_now), grace)
            for conn in open_now:
                close_now = getattr(conn, "close_now", None)
                if close_now is not None:  # a PROXY header still on its way
                    close_now()
                    continue
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    cast(asyncio.BaseTransport, transport).close()
        await asyncio.sleep(0)
