"""The edge: listeners, and the way of one request from socket to app and back.

Theory of operation
-------------------
Each listener is an aiohttp low-level ``web.Server`` (its HTTP/1.1 parser, keep-alive and
flow control; decompression off, handler cancelled when the client goes away) on a plain
or TLS socket, made by ``limits.EdgeServer`` (head timer, parse errors as 400/414/431/505)
and accepted by ``limits.Acceptor`` (stops accepting at ``max_connections``).
``RequestHandler.handle`` is the way of a request:

    strict checks (proxy/strict.py: version, method, target, Host, framing; 413 by
    Content-Length) -> redirect_https? -> body prefetch (first 64 KiB: a broken,
    stalled or oversized body is refused before any app sees it) -> route (pure) ->
    endpoint (EndpointTable, which asks the module to start the app and waits) ->
    header rewrite (pure) -> forward (stream both ways) -> access log

Every failure on that way is a ``ProxyError``; it becomes an error page here and only
here. The handler holds no per-app state: the table does, and the module behind it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import posixpath
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_exceptions import HTTPException
from yarl import URL

from module.messages import Endpoint

from . import strict
from .accesslog import AccessLog, LogEntry
from .config import Config, Listener
from .endpoints import EndpointTable
from .error_pages import render
from .errors import ConnectRefused, NotFound, ProxyError, RequestRejected, UpstreamGone
from .forwarding import Upstream, UpstreamPool, exchange, respond_h1
from .h2server import AlpnSelector, H2Server
from .headers import ForwardInfo, upstream_headers
from .limits import (
    Acceptor,
    BodyState,
    ConnectionGate,
    EdgeProtocol,
    EdgeServer,
    answer_as_http11,
    limited_body,
    prefetch_body,
)
from .metrics import Metrics
from .routing import Router
from .trust import TrustedProxies
from .websocket import is_upgrade, tunnel, upgrade_headers

log = logging.getLogger("bastion.proxy")

WAIT_MARGIN = 5.0
HANDSHAKE_GRACE = 2.0  # at a stop, for TLS handshakes of connections already accepted
FIRST_REQUEST_GRACE = 0.2  # at a stop, for a just-accepted connection's first request  # beyond startup_time_limit, in case the module's own timer is late


def normalised_path(raw: str) -> str:
    """The decoded path with dot segments and doubled slashes resolved, for routing."""
    if not raw.startswith("/"):
        return raw
    path = posixpath.normpath(raw)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if raw.endswith("/") and path != "/":
        path += "/"
    return path


@dataclass(frozen=True)
class _Answer:
    status: int
    sent: int
    app: str = "-"
    pid: int = 0


class RequestHandler:
    """Serves requests of one listener."""

    def __init__(
        self,
        listener: Listener,
        config: Config,
        router: Router,
        table: EndpointTable,
        pool: UpstreamPool,
        access_log: AccessLog,
    ) -> None:
        self.listener = listener
        self.config = config
        self.router = router
        self.table = table
        self.pool = pool
        self.access_log = access_log
        self.scheme = "https" if listener.tls is not None else "http"
        self.trusted = TrustedProxies(config.trusted_proxies)
        # Like nginx, every answer names the edge, not the app's server software.
        extra: list[tuple[str, str]] = [("Server", "bastion")]
        if listener.tls is not None and listener.tls.hsts:
            extra.append(("Strict-Transport-Security", f"max-age={listener.tls.hsts}"))
        self.response_headers = extra
        self.metrics: Metrics | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's entry point for one request."""
        started = time.monotonic()
        answer = _Answer(500, 0)
        response: web.StreamResponse
        if isinstance(request.protocol, EdgeProtocol):
            request.protocol.request_started()
        try:
            response, answer = await self._serve(request)
        except ProxyError as error:
            page = self._error_response(error)
            response = page
            answer = _Answer(error.status, page.content_length or 0, error.app or "-")
        except HTTPException:
            raise
        finally:
            duration = time.monotonic() - started
            self.access_log.write(request, answer.status, answer.sent, answer.app,
                                  answer.pid, duration)
            if self.metrics is not None:
                self.metrics.observe(answer.app, answer.status, duration)
        return response

    def _error_response(self, error: ProxyError) -> web.Response:
        body = render(error, self.config.detailed_errors)
        response = web.Response(status=error.status, text=body, content_type="text/html")
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        for name, value in self.response_headers:
            response.headers[name] = value
        if error.status < 500 and error.status not in (404,):
            response.force_close()
        return response

    def _redirect(self, request: web.BaseRequest, host: str) -> web.Response:
        https_port = self.config.https_port
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if https_port is not None and https_port != 443:
            name = f"{name}:{https_port}"
        response = web.Response(status=308, text="")
        response.headers["Location"] = f"https://{name}{request.raw_path}"
        response.headers["Server"] = "bastion"
        return response

    def _strict(self, request: web.BaseRequest) -> strict.Verdict:
        """Strict HTTP/1.1 checks (proxy/strict.py) and the body size limit, else raise."""
        limits = self.config.limits
        try:
            verdict = strict.check_request(
                request.method, request._message.path,
                (request.version.major, request.version.minor),
                list(request.raw_headers), max_header_size=limits.max_header_size)
        except strict.StrictError as exc:
            answer_as_http11(request)
            raise RequestRejected(exc.status, exc.message) from None
        if (limits.max_body_size and verdict.content_length is not None
                and verdict.content_length > limits.max_body_size):
            raise RequestRejected(413, "the request body is larger than allowed")
        return verdict

    def reject(self, status: int, message: str, peer: object,
               request: web.BaseRequest | None) -> web.Response:
        """The page for a request refused below the handler (parse error, head timeout),
        with its access log line; the connection closes after it."""
        response = self._error_response(RequestRejected(status, message))
        response.force_close()
        if request is None:
            client = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
            self.finished(LogEntry(client, "-", "-", "-"), status,
                          len(response.body) if isinstance(response.body, bytes) else 0,
                          "-", 0, 0.0)
        return response

    async def _serve(self, request: web.BaseRequest) -> tuple[web.StreamResponse, _Answer]:
        verdict = self._strict(request)
        host = verdict.host
        if self.listener.redirect_https and self.config.https_port is not None:
            return self._redirect(request, host), _Answer(308, 0)
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        raw = strict.strip_h2c(strict.replace_host(raw, host) if verdict.host_replaced else raw)
        path = request.path if not verdict.absolute else URL(verdict.target).path
        front = Front(request.method, verdict.target, host, path, raw,
                      _client_ip(request), _client_cert(request))
        if is_upgrade(request.method, raw) and self._websockets_allowed(front):
            async with self.leased(front, upgrade=True) as leased:
                response, sent = await tunnel(request, leased, self.response_headers)
                return response, _Answer(response.status, sent, leased.app, leased.pid)
        limits = self.config.limits
        body = None
        if request.body_exists:
            state = BodyState()
            first = await prefetch_body(request.content, limits.body_timeout,
                                        limits.max_body_size, state)
            body = limited_body(request.content, limits.body_timeout, limits.max_body_size,
                                state, first)
        async with self.connected(front, body, request.content_length) as (leased, upstream):
            streamed, sent = await respond_h1(request, upstream, self.response_headers)
            return streamed, _Answer(streamed.status, sent, leased.app, leased.pid)

    def _websockets_allowed(self, front: Front) -> bool:
        """Whether the app of this request takes WebSocket upgrades (``websockets``).

        When it does not, the request goes on as a plain one: ``Upgrade`` is hop-by-hop
        and never reaches the app, which answers as it would any GET."""
        route = self.router.match(front.host, normalised_path(front.path))
        return route is None or route.websockets

    @contextlib.asynccontextmanager
    async def connected(self, front: Front, body: AsyncIterator[bytes] | None,
                        length: int | None) -> AsyncIterator[tuple[Leased, Upstream]]:
        """``leased`` + ``exchange``, for every protocol: the app's answer, its head in.

        When the process it went to is gone (it refused the connection, so it got
        nothing; or, for an idempotent request without a body, its kept-alive
        connection broke and it refuses new ones), the request goes once more to
        another process of the app that was already ready, as nginx's
        ``proxy_next_upstream error`` does; the gone one is avoided meanwhile. With no
        other process ready it is a 502: a request is never held back for a restart of
        the process that may have crashed on it.
        """
        for attempt in (1, 2):
            yielded = False
            failed_pid = 0
            try:
                async with self.leased(front) as leased, exchange(
                    leased.endpoint, self.pool, front.method, front.target, leased.headers,
                    body, length, app=leased.app, request_timeout=leased.request_timeout,
                ) as upstream:
                    yielded = True
                    yield leased, upstream
                    return
            except (ConnectRefused, UpstreamGone) as error:
                state = self.table.state(error.app)
                others = [] if state is None else [
                    e for e in state.endpoints if e.pid != error.pid]
                if yielded or attempt == 2 or not others:
                    raise
                failed_pid = error.pid
            log.info("pid %d is gone: the request goes to another process", failed_pid)

    @contextlib.asynccontextmanager
    async def leased(self, front: Front, *, upgrade: bool = False) -> AsyncIterator[Leased]:
        """Route, wait for an endpoint, rewrite the head: the same for every protocol.

        HTTP/1.1, HTTP/2 streams and WebSocket tunnels all come through here. Yields
        the app, its endpoint and the header list to send; a ``ProxyError`` raised in
        the block (before any response byte went out) is tagged with the app, and a 502
        marks the endpoint failed. The endpoint is released when the block ends.
        """
        route = self.router.match(front.host, normalised_path(front.path))
        if route is None:
            raise NotFound("no application is configured for this address")
        spec = self.config.app(route.app)
        lease = await self.table.acquire(
            route.app, spec.settings.startup_time_limit + WAIT_MARGIN
        )
        try:
            info = ForwardInfo(
                client_ip=front.client_ip,
                scheme=self.scheme,
                host=front.host,
                port=self.listener.port,
                path_base=spec.path_base,
                token=lease.endpoint.token,
                client_cert_b64=front.client_cert,
                trusted=self.trusted.contains(front.client_ip),
            )
            headers = upstream_headers(front.headers, info)
            if upgrade:
                headers = upgrade_headers(front.headers, headers)
            try:
                yield Leased(route.app, lease.endpoint.pid, lease.endpoint, headers,
                             spec.settings.request_timeout)
            except ProxyError as error:
                if error.status == 502:
                    lease.failed(str(error))
                elif error.status == 504:
                    lease.timed_out()
                error.app = route.app
                error.pid = lease.endpoint.pid
                raise
        finally:
            lease.release()

    def error_parts(self, error: ProxyError) -> tuple[list[tuple[str, str]], bytes]:
        """The headers and body of the error page for ``error`` (any protocol)."""
        body = render(error, self.config.detailed_errors).encode("utf-8")
        headers = [("Content-Type", "text/html; charset=utf-8")]
        if error.retry_after is not None:
            headers.append(("Retry-After", str(error.retry_after)))
        headers.extend(self.response_headers)
        return headers, body

    def finished(self, entry: LogEntry, status: int, sent: int, app: str, pid: int,
                 duration: float) -> None:
        """Access log and metrics for a request that did not come through aiohttp."""
        self.access_log.write_entry(entry, status, sent, app, pid, duration)
        if self.metrics is not None:
            self.metrics.observe(app, status, duration)


@dataclass(frozen=True)
class Front:
    """A client's request head as routing and rewriting need it, whatever the protocol."""

    method: str
    target: str  # origin-form, sent to the app as is
    host: str
    path: str  # decoded path, for routing
    headers: list[tuple[str, str]]  # as received (HTTP/1.1 form, Host included)
    client_ip: str
    client_cert: str | None


@dataclass(frozen=True)
class Leased:
    """What ``RequestHandler.leased`` yields: where to send the request, and what."""

    app: str
    pid: int
    endpoint: Endpoint
    headers: list[tuple[str, str]]  # rewritten for the app
    request_timeout: float


def _client_ip(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "127.0.0.1"  # a unix socket client


def _client_cert(request: web.BaseRequest) -> str | None:
    if request.transport is None:
        return None
    ssl_object = request.transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return base64.b64encode(der).decode("ascii") if der else None


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


class ListenerSet:
    """The running listeners of one worker."""

    def __init__(self) -> None:
        self._servers: list[asyncio.AbstractServer] = []
        self._aiohttp: list[web.Server] = []
        self._h2: list[H2Server] = []
        self._gate = ConnectionGate(0)

    async def start(
        self,
        sockets: list[tuple[Listener, socket.socket, ssl.SSLContext | None]],
        handlers: dict[str, RequestHandler],
        config: Config,
    ) -> None:
        """Serve each bound socket with its handler."""
        limits = config.limits
        self._gate.limit = limits.max_connections
        for listener, sock, context in sockets:
            handler = handlers[listener.address]
            web_server = EdgeServer(
                handler.handle,
                reject=handler.reject,
                header_timeout=limits.header_timeout,
                max_header_size=limits.max_header_size,
                handler_cancellation=True,
                keepalive_timeout=limits.keepalive_timeout,
                max_line_size=limits.max_header_size,
                max_field_size=limits.max_header_size,
                auto_decompress=False,
                access_log=None,
                lingering_time=2.0,  # after a refusal, read what the client still sends
            )
            self._aiohttp.append(web_server)
            factory: Callable[[], asyncio.Protocol] = web_server
            if context is not None and listener.http2:
                # ALPN: h2 or http/1.1, chosen per connection after the handshake.
                h2_server = H2Server(handler, limits)
                self._h2.append(h2_server)
                factory = functools.partial(AlpnSelector, web_server, h2_server)
            # Accepting stops while the worker is at max_connections (proxy/limits.py).
            self._servers.append(Acceptor(sock, factory, context, self._gate))

    def open_connections(self) -> int:
        """Client connections open now on these listeners."""
        return (sum(len(web_server.connections) for web_server in self._aiohttp)
                + sum(len(h2_server.connections) for h2_server in self._h2))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish up to ``grace``, then close.

        Like nginx's graceful stop: idle keep-alive connections are closed at once (a
        client retries its next request on a new connection, which another worker
        generation accepts), busy ones close after their response. A connection
        accepted just before the stop first finishes its handshake and gets a moment to
        send its first request, which is then served.
        """
        for server in self._servers:
            server.close()
        await asyncio.gather(*(server.wait_handshakes(HANDSHAKE_GRACE)
                               for server in self._servers if isinstance(server, Acceptor)))
        await asyncio.sleep(FIRST_REQUEST_GRACE)
        h2_done = asyncio.gather(*(h2_server.shutdown(grace) for h2_server in self._h2))
        deadline = time.monotonic() + grace
        while True:
            # Every pass also drains connections that finished their handshake since.
            open_now = [c for web_server in self._aiohttp for c in web_server.connections]
            if not open_now or time.monotonic() >= deadline:
                break
            for connection in open_now:
                if isinstance(connection, EdgeProtocol):
                    if not connection.draining:
                        connection.drain()  # idle: closed now; busy: after its response
                else:
                    connection.close()
            await asyncio.sleep(0.05)
        if open_now:
            log.warning("stop: %d connection(s) still open after %gs; closing them",
                        len(open_now), grace)
        for web_server in self._aiohttp:
            await web_server.shutdown(max(0.0, deadline - time.monotonic()))
        await h2_done
        for server in self._servers:
            await server.wait_closed()
