"""One request's way to the app and back, whatever the client's protocol.

Theory of operation
-------------------
A ``Flow`` is made by a client-side protocol (HTTP/1.1 connection, HTTP/2 stream) for
each request head it accepted (``Request``). The protocol feeds it the request body
(``feed``, ``feed_end``, ``feed_failed``) and gets the answer through its
``Downstream`` interface (``respond``: a head with the body bytes available so far;
``respond_body``; ``respond_end``; ``abort``; ``pause_request``/``resume_request``
for the body's backpressure; ``switch`` for a WebSocket's 101). Every failure on the
way is a ``ProxyError`` and becomes the same error page or the same cut connection on
every protocol; the status mapping of upstream failures is ``errors.from_upstream``.

The way:

    prefetch (the first 64 KiB of a body, or all of it: a broken, stalled or too
    large body is refused before any app sees it) -> route (pure) -> endpoint
    (``EndpointTable.try_acquire``; else a task awaits ``acquire``, which may start
    the app) -> header rewrite (pure, bytes) -> an idle kept-alive connection from the
    pool (else a task opens one) -> the head (and the body so far) in one write ->
    callbacks from the upstream parser -> the client.

The fast path (ready process, idle connection, head and body in the first read)
creates no task, future or coroutine. Deadlines live in the flow (``deadline``), and
the client-side protocol's one timer calls ``expire``: ``body_timeout`` since the last
body bytes while the request body is incomplete (408), ``request_timeout`` from the
request sent to the response head (504).

Retries only where nothing was sent: a refused connection goes once to another process
of the app that was already ready; a kept-alive connection that the app closed before
answering is retried on a new one for an idempotent request without a body (and if that
process refuses it, once on another ready process). When the app's only process refuses
a new connection (it is gone), the request waits up to ``GONE_WAIT`` for the module to
withdraw that process, then for the restart like any request for an app that is not
ready: a request that arrives just after a crash is served by the new process. A request
sent on a kept-alive connection that broke is not sent to the restart: the process may
have died of it.

The answer's head is held back while the body is known to be small (``SMALL_BODY``), so
a small answer goes out in one write and a body cut short is still a clean 502; other
answers go out at the end of each read from the app, head and body together.

Offload (the app's pool's ``buffering`` and ``compression``, ``Site.offload``): with
``buffering.request`` above the prefetch, the flow reads that much of the body (or all
of it) after routing and before it asks for an endpoint, so a slow upload does not hold
an app's process; with ``buffering.response``, a client that cannot take more
(``pause_response``) does not stop reading from the app at once: what the app sends is
written on, up to that many bytes, and reading pauses only beyond. Both take their bytes
from the worker's ``BufferBudget`` (``Site.buffers``); when it is spent the flow streams
with backpressure as without buffering. Response bytes still in the client's buffer when
the flow ends stay charged to the client's connection (``Downstream.hold``). The answer
is compressed when ``proxy.edge.compress`` says so: its head rewritten, each piece from
the app compressed as it arrives, a held small body compressed whole.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
from typing import Protocol

from bastion.module.messages import Endpoint

from ..config.model import Offload, StaticLocation
from . import compress
from .accesslog import LogEntry
from .buffers import Held
from .codec import decoded_path, request_head
from .endpoints import Lease
from .errors import (
    BadGateway,
    ConnectRefused,
    GatewayTimeout,
    NotFound,
    ProxyError,
    RequestRejected,
    UpstreamGone,
    from_upstream,
)
from .headers import ForwardInfo, downstream_headers, upstream_headers
from .site import WAIT_MARGIN, Site
from .static import ACCEL_KEPT, FileSender, accel_target
from .static import answer as static_answer
from .upstream import Closed, ResponseHead, UpstreamConnection, UpstreamError
from .websocket import AppEnd

log = logging.getLogger("bastion.proxy")

PREFETCH = 64 * 1024  # body bytes read before the app is asked
GONE_WAIT = 1.0  # how long a request that found the only process gone waits for the module
SMALL_BODY = 64 * 1024  # a body up to this size goes with its head in one write
PENDING_HIGH = 256 * 1024  # body bytes buffered before reading from the client pauses
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Methods that mean nothing by a body: no ``Content-Length: 0`` when they have none.
NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})


class BodyTooLarge(RequestRejected):
    """The client's body went beyond ``max_body_size`` (413)."""

    def __init__(self) -> None:
        super().__init__(413, "the request body is larger than allowed")


class BodyStalled(RequestRejected):
    """Nothing of the client's body arrived within ``body_timeout`` (408)."""

    def __init__(self) -> None:
        super().__init__(408, "the client stopped sending its body")


def normalised_path(raw: str) -> str:
    """The decoded path with dot segments and doubled slashes resolved, for routing."""
    if not raw.startswith("/"):
        return raw
    if "/." not in raw and "//" not in raw:
        return raw  # nothing to resolve (the common case)
    path = posixpath.normpath(raw)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if raw.endswith("/") and path != "/":
        path += "/"
    return path


class Request:
    """A client's request head as the flow needs it, whatever the protocol."""

    __slots__ = ("method", "target", "host", "path", "headers", "client_ip", "client_cert",
                 "content_length", "has_body", "upgrade", "version", "trusted", "client_port")

    def __init__(self, method: str, target: str, host: str, path: str,
                 headers: list[tuple[bytes, bytes]], client_ip: str,
                 client_cert: str | None, content_length: int | None, has_body: bool,
                 version: str, *, upgrade: bool = False, trusted: bool = False,
                 client_port: int = 0) -> None:
        self.method = method
        self.target = target  # origin-form, sent to the app as is
        self.host = host
        self.path = path  # decoded path, for routing
        self.headers = headers  # as received (Host included)
        self.client_ip = client_ip
        self.client_cert = client_cert
        self.content_length = content_length
        self.has_body = has_body
        self.version = version  # for the access log: "HTTP/1.1", "HTTP/2.0"
        self.upgrade = upgrade  # a WebSocket upgrade to tunnel
        self.trusted = trusted  # the client is a trusted proxy
        self.client_port = client_port  # for an in-process app's scope (0: unknown)

    def log_entry(self) -> LogEntry:
        """The access log's view of this request."""
        referer = agent = "-"
        for name, value in self.headers:
            low = name.lower()
            if low == b"referer":
                referer = value.decode("latin-1")
            elif low == b"user-agent":
                agent = value.decode("latin-1")
        return LogEntry(self.client_ip, self.method, self.target, self.version, referer,
                        agent)


class HostedCall(Protocol):
    """A request being served by an in-process app (``proxy.edge.hosting``)."""

    def feed(self, data: bytes) -> None:
        """More of the request body."""

    def feed_end(self) -> None:
        """The request body is complete."""

    def pause(self) -> None:
        """The client cannot take more of the answer."""

    def resume(self) -> None:
        """The client can take more again."""

    def close(self, abort: bool) -> None:
        """The exchange is over (``abort``: cancel what the app still does for it)."""

    def start(self) -> None:
        """Call the app (it may answer, and end the flow, before this returns)."""


class Downstream(Protocol):
    """The client side of a flow (an HTTP/1.1 connection or an HTTP/2 stream)."""

    def respond(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int | None, bodyless: bool, body: list[bytes], end: bool) -> None:
        """The response head, the body pieces so far, and whether that is all."""

    def respond_body(self, body: list[bytes], end: bool) -> None:
        """More of the response body."""

    def abort(self) -> None:
        """The answer broke off after its head went out: cut the client off."""

    def pause_request(self) -> None:
        """Stop reading the request body for now."""

    def resume_request(self) -> None:
        """Read the request body again."""

    def rearm(self) -> None:
        """The flow's deadline changed."""

    def switch(self, head: bytes, rest: bytes, conn: AppEnd) -> None:
        """A WebSocket upgrade was accepted: ``head`` goes to the client, then both
        connections become one byte pipe (``rest``: the app's first tunnelled bytes)."""

    def flow_done(self, flow: Flow) -> None:
        """The exchange is over (its log line is written)."""

    def sendfile_transport(self) -> asyncio.Transport | None:
        """The client's plain (not TLS, not HTTP/2) transport, for ``os.sendfile``."""

    def hold(self, held: Held) -> None:
        """Response bytes of a finished flow are still in this client's buffer: call
        ``held.release()`` once they have drained (or the client is gone)."""


# Flow states
_PREFETCH, _WAIT_LEASE, _CONNECTING, _SENT, _RESPONDING, _DONE = range(6)


class Flow:
    """One request forwarded to an app: see the module's theory of operation."""

    __slots__ = ("site", "request", "down", "state", "started", "status", "sent", "app",
                 "pid", "lease", "conn", "deadline", "_pending", "_pending_size",
                 "_received", "_body_end", "_body_failed", "_body_at", "_sent_at",
                 "_attempt", "_reused", "_chunked", "_task", "_held", "_head_out",
                 "_response_bodyless", "_timeout", "_paused_up", "_endpoint", "_paused_down",
                 "refused", "_retry", "_offload", "_encoder", "_held_headers", "_prefetch",
                 "_buffering_request", "_request_charged", "_down_full", "_response_charged",
                 "_static", "hosted")

    def __init__(self, site: Site, request: Request, down: Downstream) -> None:
        self.site = site
        self.request = request
        self.down = down
        self.state = _PREFETCH
        self.started = time.monotonic()
        self.status = 0
        self.sent = 0
        self.app = "-"
        self.pid = 0
        self.lease: Lease | None = None
        self.conn: UpstreamConnection | None = None
        self.deadline: float | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._received = 0
        self._body_end = not request.has_body
        self._body_failed: ProxyError | None = None
        self._body_at = self.started
        self._sent_at = 0.0
        self._attempt = 1
        self._reused = False  # the connection came from the pool
        self._retry = False  # on a new connection after a stale kept-alive one
        self._chunked = False
        self._task: asyncio.Task[None] | None = None
        self._held: ResponseHead | None = None  # a head waiting for its small body
        self._head_out = False
        self._response_bodyless = False
        self._timeout = 0.0
        self._paused_up = False
        self._endpoint: Endpoint | None = None
        self._paused_down = False  # reading the request body is paused by us
        self.refused = False  # ended by a refusal at the edge (the connection closes)
        self._offload: Offload | None = None  # the app's buffering and compression
        self._encoder: compress.Encoder | None = None  # compressing the answer
        self._held_headers: list[tuple[bytes, bytes]] = []  # the held head's, rewritten
        self._prefetch = PREFETCH  # body bytes wanted before the app is asked
        self._buffering_request = False  # buffering.request beyond the prefetch
        self._request_charged = 0  # pending body bytes taken from the buffer budget
        self._down_full = False  # the client cannot take more now
        self._response_charged = 0  # bytes written to a full client, from the budget
        self._static: FileSender | None = None  # sending a static file's body
        self.hosted: HostedCall | None = None  # served by an in-process app

    @property
    def done(self) -> bool:
        """The exchange is over."""
        return self.state == _DONE

    # -- from the client ------------------------------------------------------------------
    def start(self) -> None:
        """The head is in: go on at once, or after the body's first bytes arrived."""
        request = self.request
        limit = self.site.limits.max_body_size
        if limit and request.content_length is not None and request.content_length > limit:
            self.fail(BodyTooLarge())
            return
        if request.has_body:
            self._set_deadline()
        self._maybe_dispatch()

    def feed(self, data: bytes) -> None:
        """Bytes of the request body."""
        if self.state == _DONE or not data:
            return
        self._received += len(data)
        self._body_at = time.monotonic()
        limit = self.site.limits.max_body_size
        if limit and self._received > limit:
            self.feed_failed(BodyTooLarge())
            return
        hosted = self.hosted
        if hosted is not None:
            hosted.feed(data)
            return
        conn = self.conn
        if conn is not None and self.state >= _SENT:
            if self._chunked:
                conn.write_chunk(data)
            else:
                conn.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._buffering_request and self.state == _PREFETCH:
            if self.site.buffers.acquire(len(data)):
                self._request_charged += len(data)
            else:
                self._prefetch = 0  # the worker's buffers are full: stream it as it comes
        if self._pending_size > PENDING_HIGH and self._pending_size > self._prefetch:
            self._pause_down()
        if self.state == _PREFETCH:
            self._maybe_dispatch()

    def feed_end(self) -> None:
        """The request body is complete."""
        if self._body_end:
            return
        self._body_end = True
        if self.hosted is not None:
            self.hosted.feed_end()
        conn = self.conn
        if conn is not None and self.state >= _SENT:
            conn.request_done(self._chunked)
        if self.state == _PREFETCH:
            self._maybe_dispatch()
        else:
            self._set_deadline()

    def feed_failed(self, error: ProxyError) -> None:
        """The request body is broken (framing 400, too large 413, stalled 408)."""
        if self.state == _DONE:
            return
        self._body_failed = error
        self._body_end = True
        self.fail(error)

    def client_gone(self) -> None:
        """The client went away: give everything up; logged as 499 unless complete."""
        if self.state == _DONE:
            return
        if not self._head_out or self.status == 0:
            self.status = 499
        self._finish(abort_upstream=True)

    def pause_response(self) -> None:
        """The client cannot take more of the answer: stop reading from the app, unless
        the app's buffering allows holding more of it (``_hold_response``)."""
        if self._static is not None:
            self._static.pause()
            return
        if self._down_full:
            return
        self._down_full = True
        offload = self._offload
        if offload is None or offload.buffering.response <= 0:
            self._pause_up()

    def _pause_up(self) -> None:
        if not self._paused_up:
            self._paused_up = True
            if self.conn is not None:
                self.conn.pause_reading()
            elif self.hosted is not None:
                self.hosted.pause()

    def _hold_response(self, size: int) -> None:
        """``size`` bytes went to a client that cannot take them now: held within the
        app's ``buffering.response`` and the worker's budget, else reading pauses."""
        offload = self._offload
        limit = offload.buffering.response if offload is not None else 0
        if self._response_charged + size <= limit and self.site.buffers.acquire(size):
            self._response_charged += size
            return
        self._pause_up()

    def resume_response(self) -> None:
        """The client can take more again (what it was sent has drained)."""
        if self._static is not None:
            self._static.resume()
            return
        self._down_full = False
        if self._response_charged:
            self.site.buffers.release(self._response_charged)
            self._response_charged = 0
        if self._paused_up:
            self._paused_up = False
            if self.conn is not None:
                self.conn.resume_reading()
            elif self.hosted is not None:
                self.hosted.resume()

    def expire(self) -> None:
        """The client side's timer fired at or after ``deadline``."""
        if self.state == _DONE:
            return
        now = time.monotonic()
        if not self._body_end and not self._paused_down \
                and now >= self._body_at + self.site.limits.body_timeout:
            self.feed_failed(BodyStalled())
            return
        if self.state in (_SENT, _CONNECTING) and self._sent_at \
                and now >= self._sent_at + self._timeout:
            self.fail(GatewayTimeout(
                f"the app {self.app!r} did not answer within {self._timeout:g}s",
                app=self.app))
            return
        self._set_deadline()

    # -- dispatch -------------------------------------------------------------------------
    def _set_deadline(self) -> None:
        deadline: float | None = None
        if not self._body_end and not self._paused_down and self.state != _DONE:
            deadline = self._body_at + self.site.limits.body_timeout
        if self.state in (_SENT, _CONNECTING) and self._sent_at:
            waiting = self._sent_at + self._timeout
            deadline = waiting if deadline is None else min(deadline, waiting)
        if deadline != self.deadline:
            self.deadline = deadline
            self.down.rearm()

    def _maybe_dispatch(self) -> None:
        if self.state != _PREFETCH:
            return
        if not self._body_end and self._pending_size < self._prefetch:
            return
        try:
            self._route()
        except ProxyError as error:
            self.fail(error)

    def _route(self) -> None:
        site = self.site
        request = self.request
        if request.path == site.health_path:
            self._answer_health()
            return
        route = site.router.match(request.host, normalised_path(request.path))
        if route is None:
            raise NotFound("no application is configured for this address")
        self.app = route.app
        if route.static is not None:
            if route.static.internal:
                raise NotFound("no application is configured for this address")
            self._static_answer(route.static, route.path, request.target, request.method,
                                None)
            return
        if request.upgrade and not route.websockets:
            request.upgrade = False  # goes on as a plain request; Upgrade is hop-by-hop
        self._timeout = site.request_timeouts[route.app]
        offload = self._offload = site.offload.get(route.app)
        if offload is not None and not self._body_end and not self._buffering_request \
                and offload.buffering.request > self._pending_size:
            # Read more of the body before the app is asked (buffering.request).
            self._buffering_request = True
            self._prefetch = offload.buffering.request
            return
        if route.app in site.in_process:
            self._route_hosted()
            return
        lease = site.table.try_acquire(route.app)
        if lease is not None:
            self._leased(lease)
            return
        self.state = _WAIT_LEASE
        self._task = asyncio.get_running_loop().create_task(
            self._acquire(site.apps[route.app].settings.startup_time_limit + WAIT_MARGIN))

    # -- an in-process app (proxy.edge.hosting) --------------------------------------------
    def _route_hosted(self) -> None:
        host = self.site.host
        assert host is not None
        if self.request.upgrade and not host.websockets(self.app):
            self.request.upgrade = False  # goes on as a plain request (a WSGI app)
        error = host.refusal(self.app)
        if error is not None:
            raise error
        loading = host.loading(self.app)
        if loading is None:
            slot = host.admit(self.app)  # max_concurrency / max_queue: 503 when full
            if slot is None:
                self._call_hosted()
                return
            self.state = _WAIT_LEASE
            self._task = asyncio.get_running_loop().create_task(self._await_slot(slot))
            return
        self.state = _WAIT_LEASE  # like waiting for an app process's start
        self._task = asyncio.get_running_loop().create_task(self._await_load(loading))

    async def _await_load(self, loading: asyncio.Future[bool]) -> None:
        loaded = await asyncio.shield(loading)
        if self.state == _DONE:
            self._task = None
            return
        host = self.site.host
        assert host is not None
        error = host.refusal(self.app)
        if error is None and not loaded:
            error = host.failure(self.app)
        if error is None:
            try:
                slot = host.admit(self.app)
            except ProxyError as full:
                error = full
            else:
                if slot is not None:
                    await self._await_slot(slot)
                    return
        self._task = None
        if error is not None:
            self.fail(error)
            return
        self._call_hosted()

    async def _await_slot(self, slot: asyncio.Future[ProxyError | None]) -> None:
        host = self.site.host
        assert host is not None
        try:
            error = await slot  # cancelled with the flow: the host skips it
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled() and slot.result() is None:
                host.unreserve(self.app)  # granted, then given up
            raise
        self._task = None
        if error is not None:
            self.fail(error)
        elif self.state == _DONE:
            host.unreserve(self.app)
        else:
            self._call_hosted(reserved=True)

    def _call_hosted(self, reserved: bool = False) -> None:
        """Call the in-process app instead of connecting to an app process."""
        host = self.site.host
        assert host is not None
        self.pid = host.pid
        self.state = _SENT
        self._sent_at = time.monotonic()
        pending = self._pending
        self._pending = []
        self._pending_size = 0
        self._release_request()  # the app holds the body now (bounded by BODY_HIGH)
        hosted = self.hosted = host.call(self.app, self, pending, self._body_end, reserved)
        self._resume_down()
        self._set_deadline()
        hosted.start()

    def hosted_switched(self, headers: list[tuple[bytes, bytes]], end: AppEnd) -> None:
        """The in-process app accepted the WebSocket: the 101 with ``headers`` goes to
        the client, then the connection's bytes go to ``end``."""
        if self.state == _DONE:
            end.abort()
            return
        self.state = _RESPONDING
        self.status = 101
        self._head_out = True
        lines = [b"HTTP/1.1 101 Switching Protocols"] + [n + b": " + v for n, v in headers]
        data = b"\r\n".join(lines) + b"\r\n" + self.site.extra_head + b"\r\n"
        self._set_deadline()
        self.down.switch(data, b"", end)

    def hosted_failed(self, error: ProxyError) -> None:
        """The in-process app failed: its error page before the head, a cut after it."""
        self.fail(error)

    async def _acquire(self, wait_limit: float) -> None:
        try:
            lease = await self.site.table.acquire(self.app, wait_limit)
        except ProxyError as error:
            self._task = None
            self.fail(error)
            return
        self._task = None
        if self.state == _DONE:
            lease.release()
            return
        self._leased(lease)

    def _leased(self, lease: Lease) -> None:
        self.lease = lease
        endpoint = self._endpoint = lease.endpoint
        self.pid = endpoint.pid
        key: int | str = endpoint.socket_path if endpoint.socket_path is not None \
            else endpoint.port
        conn = None if self.request.upgrade else self.site.pool.pooled(key)
        if conn is not None:
            self._reused = True
            self._send(conn)
            return
        self.state = _CONNECTING
        self._sent_at = time.monotonic()
        self._set_deadline()
        self._task = asyncio.get_running_loop().create_task(self._connect(key))

    async def _connect(self, key: int | str) -> None:
        try:
            conn = await self.site.pool.open(key)
        except UpstreamError as exc:
            self._task = None
            if self._retry:  # the retry of a stale kept-alive connection
                self._upstream_error(UpstreamGone(
                    f"the app {self.app!r} closed the connection", app=self.app,
                    detail=str(exc)))
            else:
                self._upstream_error(ConnectRefused(
                    f"the app {self.app!r} refused the connection", app=self.app,
                    detail=str(exc)))
            return
        self._task = None
        if self.state == _DONE:
            conn.abort()
            self.site.pool.release(conn)
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        request = self.request
        endpoint = self._endpoint
        assert endpoint is not None
        site = self.site
        spec = site.apps[self.app]
        info = ForwardInfo(request.client_ip, site.scheme, request.host, site.port,
                           spec.path_base, endpoint.token, request.client_cert,
                           request.trusted)
        headers = upstream_headers(request.headers, info)
        if request.upgrade:
            upgrade = next(v for n, v in request.headers if n.lower() == b"upgrade")
            headers += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
        whole = self._body_end
        if not request.has_body:
            framing = None if request.method in NO_BODY_METHODS else b"Content-Length: 0"
            self._chunked = False
        elif request.content_length is not None:
            framing = b"Content-Length: %d" % request.content_length
            self._chunked = False
        elif whole:
            framing = b"Content-Length: %d" % self._pending_size
            self._chunked = False
        else:
            framing = b"Transfer-Encoding: chunked"
            self._chunked = True
        payload = request_head(request.method, request.target, headers, framing)
        pending = self._pending
        if pending:
            if self._chunked:
                payload += b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pending)
            else:
                payload += b"".join(pending)
        if whole and self._chunked:
            payload += b"0\r\n\r\n"
        self.conn = conn
        if not conn.send(self, payload, head_only=request.method == "HEAD", whole=whole,
                         tunnel=request.upgrade):
            # The pooled connection died while idle: nothing was sent; a new one.
            self.conn = None
            self.site.pool.release(conn)
            self._reused = False
            self.state = _CONNECTING
            self._task = asyncio.get_running_loop().create_task(self._connect(conn.key))
            return
        self._pending = []
        self._pending_size = 0
        self._release_request()
        self.state = _SENT
        self._sent_at = time.monotonic()
        self._resume_down()
        self._set_deadline()

    # -- from the upstream connection -------------------------------------------------------
    def upstream_head(self, head: ResponseHead) -> None:
        """The app's response head arrived."""
        if self.state == _DONE:
            return
        self.state = _RESPONDING
        if self.site.accel:
            for name, value in head.headers:
                if name.lower() == b"x-accel-redirect":
                    # As nginx: the app's body is never read (django-sendfile2 announces
                    # the file's length and sends nothing); the connection is dropped.
                    self._accel_redirect(value, [(n, v) for n, v in head.headers
                                                 if n.lower() in ACCEL_KEPT])
                    return
        self.status = head.status
        self._response_bodyless = (self.request.method == "HEAD"
                                   or head.status in (204, 304))
        length = head.content_length
        headers = downstream_headers(head.headers)
        offload = self._offload
        if offload is not None and offload.compression.enabled:
            headers = self._compression(head.status, headers, length, offload)
        if length is not None and length <= SMALL_BODY and not self._response_bodyless:
            self._held = head
            self._held_headers = headers
            self._pending = []
            self._pending_size = 0
        else:
            self._head_out = True
            self.down.respond(head.status, head.reason, headers,
                              None if self._encoder is not None else length,
                              self._response_bodyless, [], False)
            if self._response_bodyless:
                self._encoder = None  # HEAD: the head a GET would get, and no body
        self._set_deadline()

    def _compression(self, status: int, headers: list[tuple[bytes, bytes]],
                     length: int | None, offload: Offload) -> list[tuple[bytes, bytes]]:
        """The answer's head as compression wants it; ``_encoder`` set when it is (a HEAD
        gets the head a GET would get)."""
        settings = offload.compression
        method = "GET" if self.request.method == "HEAD" else self.request.method
        if not compress.eligible(method, status, headers, length, settings):
            return headers
        accept: bytes | None = None
        for name, value in self.request.headers:
            if name.lower() == b"accept-encoding":
                accept = value if accept is None else accept + b"," + value
        coding = compress.accepted_coding(accept, compress.available())
        if coding is None:
            return compress.with_vary(headers)
        self._encoder = compress.Encoder(coding, settings)
        return compress.encoded_headers(headers, coding)

    def upstream_body(self, data: bytes) -> None:
        """A piece of the app's response body."""
        if self.state == _DONE:
            return
        if self._held is not None:
            self._pending.append(data)
            return
        encoder = self._encoder
        if encoder is not None:
            data = encoder.chunk(data)
        self.sent += len(data)
        self.down.respond_body([data], False)
        if self._down_full and not self._paused_up:
            self._hold_response(len(data))

    def upstream_end(self) -> None:
        """The app's response is complete."""
        if self.state == _DONE:
            return
        held = self._held
        if held is not None:
            self._held = None
            self._head_out = True
            body = self._pending
            self._pending = []
            length = held.content_length
            if self._encoder is not None:
                body = [self._encoder.whole(b"".join(body))]
                length = len(body[0])
            for piece in body:
                self.sent += len(piece)
            self.down.respond(held.status, held.reason, self._held_headers, length, False,
                              body, True)
        elif self._head_out:
            tail = self._encoder.finish() if self._encoder is not None else b""
            self.sent += len(tail)
            self.down.respond_body([tail] if tail else [], True)
        self._finish()

    def upstream_failed(self, exc: UpstreamError) -> None:
        """The exchange with the app failed."""
        if self.state == _DONE:
            return
        conn = self.conn
        if (isinstance(exc, Closed) and exc.early and self._reused and conn is not None
                and not self.request.has_body and self.request.method in IDEMPOTENT
                and self.state == _SENT):
            # A kept-alive connection the app had closed meanwhile: the one case worth a
            # second try, and only when resending cannot do harm.
            self.conn = None
            self.site.pool.release(conn)
            self.state = _CONNECTING
            self._reused = False
            self._retry = True
            self._task = asyncio.get_running_loop().create_task(self._connect(conn.key))
            return
        if self._head_out:
            self.down.abort()
            self._finish(abort_upstream=True)
            return
        if self._held is not None:  # a held head whose small body broke off
            self._held = None
            error: ProxyError = BadGateway("the app broke off its response", app=self.app,
                                           detail=str(exc))
        else:
            error = from_upstream(exc, self.app, self._timeout)
        self._upstream_error(error)

    def upstream_switched(self, head: ResponseHead, rest: bytes) -> None:
        """The app accepted the WebSocket upgrade (101)."""
        conn = self.conn
        if self.state == _DONE or conn is None:
            return
        self.state = _RESPONDING
        self.status = 101
        self._head_out = True
        fields = [(n, v) for n, v in head.headers
                  if n.lower() not in (b"content-length", b"transfer-encoding", b"server")]
        lines = [b"HTTP/1.1 101 " + (head.reason or b"Switching Protocols")]
        lines += [n + b": " + v for n, v in fields]
        data = b"\r\n".join(lines) + b"\r\n" + self.site.extra_head + b"\r\n"
        self._set_deadline()
        self.down.switch(data, rest, conn)

    def upstream_writable(self, writable: bool) -> None:
        """The app's socket can (not) take more of the request body."""
        if writable:
            self._resume_down()
        else:
            self._pause_down()

    def _pause_down(self) -> None:
        if not self._paused_down:
            self._paused_down = True
            self.down.pause_request()
            self._set_deadline()

    def _resume_down(self) -> None:
        if self._paused_down:
            self._paused_down = False
            self._body_at = time.monotonic()
            self.down.resume_request()
            self._set_deadline()

    def tunnel_closed(self, sent: int) -> None:
        """A WebSocket tunnel ended (either side closed)."""
        self.sent = sent
        self._finish(abort_upstream=True)

    # -- failures and the end -------------------------------------------------------------
    # -- static files (proxy.edge.static) ----------------------------------------------
    def _static_answer(self, location: StaticLocation, base: str, target: str, method: str,
                       kept: list[tuple[bytes, bytes]] | None) -> None:
        try:
            found = static_answer(location, method, target, base, self.request.headers, kept)
        except ProxyError as error:
            self.fail(error)
            return
        self.status = found.status
        self.state = _RESPONDING
        self._head_out = True
        if found.fd < 0:
            self.sent = sum(len(piece) for piece in found.body)
            self.down.respond(found.status, b"", found.headers, found.length,
                              found.bodyless, found.body, True)
            self._finish()
            return
        sender = FileSender(self, self.down, found.fd, found.offset, found.remaining,
                            self.down.sendfile_transport())
        self._static = sender
        self.down.respond(found.status, b"", found.headers, found.length, False, [], False)
        if self.state != _DONE:
            sender.start()

    def static_end(self, sent: int) -> None:
        """A static file's body went out whole."""
        self._static = None
        self.sent = sent
        self._finish()

    def static_abort(self, sent: int) -> None:
        """A static file's body broke off after its head: the client is cut off."""
        self._static = None
        self.sent = sent
        self.down.abort()
        self._finish(abort_upstream=True)

    def _accel_redirect(self, value: bytes, kept: list[tuple[bytes, bytes]]) -> None:
        """The app answered with X-Accel-Redirect: the file it names, not its body."""
        self._drop_upstream()
        target = accel_target(value)
        route = None if target is None else self.site.router.match(
            self.request.host, normalised_path(decoded_path(target)))
        if target is None or route is None or route.static is None:
            log.warning("app %r answered X-Accel-Redirect: %r, which no static location "
                        "maps: 404", self.app, value.decode("latin-1"))
            self.fail(NotFound("X-Accel-Redirect names no static location",
                               detail=value.decode("latin-1")))
            return
        method = "HEAD" if self.request.method == "HEAD" else "GET"
        self._static_answer(route.static, route.path, target, method, kept)

    def _upstream_error(self, error: ProxyError) -> None:
        if isinstance(error, ConnectRefused | UpstreamGone) and self._attempt == 1 \
                and self._other_ready():
            # Nothing reached the app: once more, on another process already serving.
            log.info("pid %d is gone: the request goes to another process", self.pid)
            self._attempt = 2
            self._drop_upstream(failed=str(error))
            self.state = _PREFETCH
            self._reused = False
            try:
                self._route()
            except ProxyError as again:
                self.fail(again)
            return
        if isinstance(error, ConnectRefused) and self._attempt == 1:
            # Nothing reached the app and its only process is gone (killed a moment ago):
            # the request waits for the module to withdraw it and goes the way of any
            # request for an app that is not ready (it waits for the restart), instead of
            # a 502 for a request that arrived after the crash. (Not after a broken
            # kept-alive connection: that request may have been the one it died on.)
            self._attempt = 2
            pid = self.pid
            self._drop_upstream(failed=str(error))
            self.state = _WAIT_LEASE
            self._reused = False
            self._task = asyncio.get_running_loop().create_task(self._after_gone(pid, error))
            return
        self.fail(error)

    async def _after_gone(self, pid: int, error: ProxyError) -> None:
        withdrawn = await self.site.table.withdrawn(self.app, pid, GONE_WAIT)
        self._task = None
        if self.state == _DONE:
            return
        if not withdrawn:
            self.fail(error)
            return
        self.state = _PREFETCH
        try:
            self._route()
        except ProxyError as again:
            self.fail(again)

    def _other_ready(self) -> bool:
        state = self.site.table.state(self.app)
        return state is not None and any(e.pid != self.pid for e in state.endpoints)

    def _answer_health(self) -> None:
        """The node's own health answer, for load balancers (``proxy.edge.health``)."""
        health = self.site.health()
        body = b"" if self.request.method == "HEAD" else health.body
        self.status = health.status
        self.sent = len(body)
        self._head_out = True
        self.down.respond(health.status, b"", [(b"Content-Type", b"text/plain; charset=utf-8"),
                                               (b"Cache-Control", b"no-store")],
                          len(health.body), self.request.method == "HEAD", [body] if body else [],
                          True)
        self._finish()

    def fail(self, error: ProxyError) -> None:
        """End the exchange with ``error``: its page when nothing went out, else a cut."""
        if self.state == _DONE:
            return
        if not error.app and self.app != "-":
            error.app = self.app
        if self.lease is not None:
            if error.status == 502:
                self.lease.failed(str(error))
            elif error.status == 504:
                self.lease.timed_out()  # three in a row replace the process
        if self._head_out:
            self.down.abort()
            self._finish(abort_upstream=True)
            return
        page = self.site.error_page(error)
        self.refused = isinstance(error, RequestRejected)
        self.status = page.status
        self.sent = len(page.body)
        self._head_out = True
        self._drop_upstream()
        self.down.respond(page.status, b"", page.headers, len(page.body), False,
                          [page.body], True)
        self._finish(abort_upstream=True)

    def _drop_upstream(self, failed: str | None = None) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
            self.site.pool.release(conn)
        if self.lease is not None:
            if failed is not None:
                self.lease.failed(failed)
            self.lease.release()
            self.lease = None

    def _release_request(self) -> None:
        if self._request_charged:
            self.site.buffers.release(self._request_charged)
            self._request_charged = 0

    def _finish(self, abort_upstream: bool = False) -> None:
        if self.state == _DONE:
            return
        incomplete = not self._body_end
        self.state = _DONE
        self.deadline = None
        if self._static is not None:
            self._static.close()
            self._static = None
        self._release_request()
        if self._response_charged:
            # Still in the client's buffer: its connection gives it back once drained.
            held = Held(self.site.buffers, self._response_charged)
            self._response_charged = 0
            if abort_upstream:
                held.release()
            else:
                self.down.hold(held)
        task = self._task
        if task is not None:
            self._task = None
            task.cancel()
        hosted = self.hosted
        if hosted is not None:
            self.hosted = None
            hosted.close(abort_upstream)
        conn = self.conn
        self.conn = None
        if conn is not None:
            if abort_upstream or incomplete:
                conn.abort()
            elif self._paused_up:
                conn.resume_reading()
            self.site.pool.release(conn)
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.site.finished(self.request, self.status or 500, self.sent, self.app, self.pid,
                           time.monotonic() - self.started)
        self.down.flow_done(self)

