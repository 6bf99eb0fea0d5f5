"""Listeners with ``proxy_protocol``: accept, read the PROXY header, then serve.

Theory of operation
-------------------
On such a listener every connection comes from a load balancer and starts with a PROXY
header (``proxy.edge.proxyproto``), before TLS. The event loop's own server cannot read
bytes before its TLS handshake, so these listeners are served here instead:

1. ``ProxyAcceptor`` watches the listening socket (``loop.add_reader``) and accepts
   without a task. A peer outside ``trusted_proxies`` is closed at once: only a balancer
   may say who the client is.
2. ``PendingHeader`` reads the header with exact reads that never take a byte past it:
   the first ``MIN_LENGTH`` bytes always belong to it, a v2 header says its length, and
   a v1 line is peeked (``MSG_PEEK``) and taken up to its LF. A header that is
   malformed, too long, or incomplete after ``header_timeout`` closes the connection.
   Connections waiting for their header count in ``max_connections``, and a graceful
   stop waits for them (shortened to ``STOP_GRACE``) as for open ones; from the header
   until its protocol opens, the connection counts as arriving (``connections``).
3. The socket then goes to the loop (``loop.connect_accepted_socket``, with the TLS
   context on a TLS listener, so the handshake starts right after the header) with a
   protocol made for the header's client address: the HTTP/1.1 and HTTP/2 protocols use
   it as they use a direct client's (``X-Forwarded-For``, the access log, the trust in
   ``X-Forwarded-*``). A v2 ``LOCAL`` header (the balancer's health check) or v1
   ``UNKNOWN`` is served as a direct connection from the balancer.

Every refused connection is counted by reason (``bastion_proxy_protocol_refused_total``)
and logged, at most once per ``LOG_EVERY`` seconds with the number held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable

from .connections import Connections
from .metrics import Metrics
from .proxyproto import (
    MIN_LENGTH,
    V1_MAX,
    V1_PREFIX,
    V2_FIXED,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    check_prefix,
    expected_length,
    parse,
)
from .trust import TrustedProxies

log = logging.getLogger("bastion.proxy")

ACCEPT_BATCH = 64  # connections accepted per readiness of the listening socket
LOG_EVERY = 10.0
STOP_GRACE = 2.0  # at a stop, for a header still on its way
HANDSHAKE_TIMEOUT = 10.0

# A protocol for a client connection; the argument is the client address and port the
# header gave (None: the peer itself is the client).
MakeProtocol = Callable[[tuple[str, int] | None], asyncio.Protocol]


class _RefusalLog:
    """Logs refused connections, at most once per ``LOG_EVERY`` seconds."""

    def __init__(self) -> None:
        self._last = -LOG_EVERY
        self._held = 0

    def refused(self, peer: str, why: str) -> None:
        now = time.monotonic()
        if now - self._last < LOG_EVERY:
            self._held += 1
            return
        held = f" ({self._held} more refused since the last message)" if self._held else ""
        log.warning("PROXY protocol: connection from %s refused: %s%s", peer, why, held)
        self._last = now
        self._held = 0


_refusals = _RefusalLog()


class ProxyAcceptor:
    """Accepts on one listening socket whose connections start with a PROXY header."""

    def __init__(self, sock: socket.socket, make: MakeProtocol,
                 context: ssl.SSLContext | None, trusted: TrustedProxies,
                 connections: Connections, metrics: Metrics | None,
                 header_timeout: float) -> None:
        self.sock = sock
        self.make = make
        self.context = context
        self.trusted = trusted
        self.connections = connections
        self.metrics = metrics
        self.header_timeout = header_timeout if header_timeout > 0 else 30.0
        self.stopped = False
        self._watching = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Accept (again); nothing once stopped."""
        if self._watching or self.stopped or self.sock.fileno() < 0:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._accept)
        self._watching = True

    def pause(self) -> None:
        """Stop accepting: clients wait in the kernel's backlog."""
        if self._watching and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._watching = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._watching:
                return
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ECONNABORTED: the next readiness retries
                log.warning("accept on a PROXY protocol listener failed: %s", exc)
                return
            peer = str(address[0]) if isinstance(address, tuple) and address else "?"
            if not self.trusted.contains(peer):
                self.refuse(conn, peer, "untrusted", "not in trusted_proxies")
                continue
            conn.setblocking(False)
            PendingHeader(self, conn, peer)

    def refuse(self, conn: socket.socket, peer: str, reason: str, why: str) -> None:
        """Close ``conn``; count and log why."""
        with contextlib.suppress(OSError):
            conn.close()
        if self.metrics is not None:
            self.metrics.proxy_protocol_refused(reason)
        _refusals.refused(peer, why)

    def serve(self, conn: socket.socket, header: ProxyHeader) -> None:
        """The header is in: the loop serves the connection from here on."""
        client = header.source
        loop = self._loop
        assert loop is not None
        # Arriving until its protocol has it (a graceful stop waits for it meanwhile).
        self.connections.arrive()
        loop.create_task(self._connect(loop, conn, client))

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                       client: tuple[str, int] | None) -> None:
        make = self.make
        try:
            if self.context is not None:
                await loop.connect_accepted_socket(
                    lambda: make(client), conn, ssl=self.context,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            else:
                await loop.connect_accepted_socket(lambda: make(client), conn)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # A failed handshake is counted (and no longer arriving) by the TLS
            # protocol selector; a plain connection never got that far.
            if self.context is None:
                self.connections.gone()
            log.debug("PROXY protocol connection from %s ended before serving: %s",
                      client, exc)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self.connections.gone()  # the arrival ``serve`` counted: its protocol has it now


class PendingHeader:
    """One accepted connection whose PROXY header is being read."""

    def __init__(self, acceptor: ProxyAcceptor, conn: socket.socket, peer: str) -> None:
        self.acceptor = acceptor
        self.conn = conn
        self.peer = peer
        self.data = b""
        self.done = False
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._fd = conn.fileno()
        self._deadline = time.monotonic() + acceptor.header_timeout
        self._timer = loop.call_later(acceptor.header_timeout, self._expired)
        acceptor.connections.arrive()  # (opened() takes one arriving connection as its own)
        acceptor.connections.opened(self)
        loop.add_reader(self._fd, self._readable)

    # -- Drainable ------------------------------------------------------------------------
    def drain(self) -> None:
        """A graceful stop: the header may still arrive within ``STOP_GRACE``."""
        if self.done or time.monotonic() + STOP_GRACE >= self._deadline:
            return
        self._timer.cancel()
        self._deadline = time.monotonic() + STOP_GRACE
        self._timer = self._loop.call_later(STOP_GRACE, self._expired)

    def close_now(self) -> None:
        """The stop's grace is over."""
        if not self.done:
            self._end()
            with contextlib.suppress(OSError):
                self.conn.close()

    # -- reading --------------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            header = self._read()
        except (BlockingIOError, InterruptedError):
            return
        except ProxyProtocolError as exc:
            self._refuse(exc.reason, str(exc))
            return
        except OSError as exc:
            self._refuse("incomplete", f"connection failed before its header: {exc}")
            return
        if header is not None:
            self._end()
            self.acceptor.serve(self.conn, header)

    def _read(self) -> ProxyHeader | None:
        """Read what surely belongs to the header until it is complete (raises
        BlockingIOError when the socket has nothing more now)."""
        conn = self.conn
        while True:
            data = self.data
            if len(data) < MIN_LENGTH:
                want = MIN_LENGTH - len(data)
            elif data.startswith(V2_SIGNATURE):
                total = expected_length(data)
                want = (V2_FIXED if total is None else total) - len(data)
            else:
                peeked = conn.recv(V1_MAX - len(data), socket.MSG_PEEK)
                if not peeked:
                    raise ProxyProtocolError("incomplete", "closed before the header ended")
                end = peeked.find(b"\n")
                want = end + 1 if end >= 0 else len(peeked)
            chunk = conn.recv(want) if want > 0 else b""
            if want > 0 and not chunk:
                raise ProxyProtocolError("incomplete", "closed before the header ended")
            self.data = data = data + chunk
            check_prefix(data)
            if len(data) >= MIN_LENGTH and (data.startswith(V1_PREFIX)
                                            or expected_length(data) is not None):
                header = parse(data)
                if header is not None:
                    return header
                if data.startswith(V1_PREFIX) and len(data) >= V1_MAX:
                    raise ProxyProtocolError("too_long", "PROXY v1 line longer than 107 bytes")

    def _expired(self) -> None:
        if not self.done:
            self._refuse("timeout", "no complete PROXY header in time")

    def _refuse(self, reason: str, why: str) -> None:
        self._end()
        self.acceptor.refuse(self.conn, self.peer, reason, why)

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        self._timer.cancel()
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(self._fd)
        self.acceptor.connections.closed(self)
