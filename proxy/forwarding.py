"""Forwarding one request to an app process and streaming the answer back.

Theory of operation
-------------------
The upstream side is Bastion's own lean HTTP/1.1 client (``proxy.upstream``): a pool of
idle kept-alive loopback connections per endpoint (TCP port or unix socket), requests
written from the rewritten header list as they are (a small body in the same write), a
strict response parser. Nothing is added but the body's framing.

The request body streams from the client to the app through an async generator that
reads whatever the client sent (``body_timeout`` between reads), so only one chunk at a
time is in memory; a body up to 64 KiB with a known length is read whole and sent with
the head. ``request_timeout`` bounds the time until the app's response head arrives;
the response body then streams back chunk by chunk, each ``write`` waiting for the
client to drain, and reading from the app pauses while 256 KiB wait unread
(backpressure both ways). A kept-alive connection the app closed before answering is
retried once on a new connection, only for an idempotent request without a body.
Failures are mapped to statuses by ``errors.from_upstream`` only (an invalid response is
a 502 here).

``exchange`` is the transport-neutral core (method, target, rewritten headers, body
iterator in; an ``Upstream`` with status, headers and a body iterator out), used by the
HTTP/1.1 handler (``respond_h1`` writes it to aiohttp) and by HTTP/2 streams
(``proxy.h2server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from module.messages import Endpoint

from .errors import BadGateway, ProxyError, UpstreamGone, from_upstream
from .headers import downstream_headers
from .upstream import (
    NO_BODY_STATUSES,
    SMALL_BODY,
    Closed,
    ConnectFailed,
    Connection,
    ConnectionPool,
    InvalidResponse,
    ResponseHead,
    build_head,
)
from .upstream import UpstreamBroken as UpstreamBroken

CHUNK = 64 * 1024


class UpstreamPool(ConnectionPool):
    """Keep-alive HTTP/1.1 connections to app processes (``proxy.upstream``)."""

    async def close(self) -> None:
        """Close every pooled connection."""
        self.close_all()


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Methods that mean nothing by a body: no ``Content-Length: 0`` when they have none.
NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})


class BodyTimeout(Exception):
    """The client stopped sending its body."""



@dataclass
class Upstream:
    """The app's answer, transport-neutral: status, head and a body iterator."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # without hop-by-hop fields and framing
    content_length: int | None
    bodyless: bool  # HEAD, 1xx, 204, 304: no body goes to the client
    _conn: Connection

    async def read_all(self) -> bytes:
        """The whole body (a small one); 502 when it breaks off before the head is sent."""
        if self.bodyless:
            return b""
        try:
            return await self._conn.read_all()
        except (UpstreamBroken, OSError) as exc:
            raise BadGateway("the app broke off its response", detail=str(exc)) from exc

    async def body(self) -> AsyncIterator[bytes]:
        """The response body, chunk by chunk; ``UpstreamBroken`` when it breaks off."""
        if self.bodyless:
            return
        read = self._conn.read
        while chunk := await read():
            yield chunk


@contextlib.asynccontextmanager
async def exchange(
    endpoint: Endpoint,
    pool: UpstreamPool,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: AsyncIterator[bytes] | None,
    content_length: int | None,
    *,
    app: str,
    request_timeout: float,
) -> AsyncIterator[Upstream]:
    """One HTTP/1.1 exchange with the app, independent of the client's protocol.

    ``headers`` are already rewritten (``headers.upstream_headers``); ``body`` is None
    for a request without one. Raises ``ProxyError`` before the response head arrives
    (the caller turns it into an error page); yields the answer, whose body the caller
    streams within the ``async with``.
    """
    key: int | str = endpoint.socket_path if endpoint.socket_path is not None \
        else endpoint.port
    sent = _Sent()
    try:
        async with asyncio.timeout(request_timeout):
            head = await _request(pool, key, method, target, headers, body, content_length,
                                  app, sent)
    except BodyTimeout:
        _give_up(pool, sent)
        raise ProxyError("the client stopped sending its body") from None
    except InvalidResponse as exc:
        _give_up(pool, sent)
        raise BadGateway(f"the app {app!r} sent an invalid response", app=app,
                         detail=str(exc)) from exc
    except BaseException as exc:
        _give_up(pool, sent)
        if not isinstance(exc, Exception):
            raise
        mapped = from_upstream(exc, app, request_timeout)
        if mapped is exc:
            raise
        raise mapped from exc
    conn = sent.conn
    assert conn is not None
    try:
        yield Upstream(
            status=head.status,
            reason=head.reason,
            headers=downstream_headers(head.headers),
            content_length=head.content_length,
            bodyless=method == "HEAD" or head.status in NO_BODY_STATUSES,
            _conn=conn,
        )
    finally:
        writer = sent.writer
        if writer is not None and not writer.done():
            writer.cancel()
        pool.release(conn)


class _Sent:
    """The connection of one exchange, and the task writing its streamed body."""

    __slots__ = ("conn", "writer")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.writer: asyncio.Task[None] | None = None


def _give_up(pool: UpstreamPool, sent: _Sent) -> None:
    """Drop the connection of a request that failed before its answer."""
    if sent.writer is not None and not sent.writer.done():
        sent.writer.cancel()
    if sent.conn is not None:
        sent.conn.abort()
        pool.release(sent.conn)
        sent.conn = None


async def _request(pool: UpstreamPool, key: int | str, method: str, target: str,
                   headers: list[tuple[str, str]], body: AsyncIterator[bytes] | None,
                   content_length: int | None, app: str,
                   sent: _Sent) -> ResponseHead:
    """Send the request and wait for the response head; ``sent`` gets the connection and
    the task writing a streamed body (for the caller to release or drop)."""
    has_body = body is not None
    payload: bytes | None = None
    chunked = False
    if body is None:
        framing = None if method in NO_BODY_METHODS else "Content-Length: 0"
    elif content_length is not None:
        framing = f"Content-Length: {content_length}"
        if content_length <= SMALL_BODY:
            # A small body is read whole and sent with the head in one write.
            payload = b"".join([chunk async for chunk in body])
            body = None
    else:
        framing = "Transfer-Encoding: chunked"
        chunked = True
    data = build_head(method, target, headers, framing)
    if payload:
        data += payload
    conn = pool.pooled(key)
    reused = conn is not None
    if conn is None:
        conn = await pool.open(key)
    sent.conn = conn
    while True:
        waiter = conn.start(data, method == "HEAD", body is None)
        if body is not None:
            writer = asyncio.ensure_future(_write_body(conn, body, chunked))
            writer.add_done_callback(functools.partial(_written, conn))
            sent.writer = writer
        try:
            return await waiter
        except Closed as exc:
            # A kept-alive connection the app had closed meanwhile: the one case worth a
            # second try, and only when resending cannot do harm.
            if not (exc.early and reused and not has_body and method in IDEMPOTENT):
                raise
        sent.conn = None
        pool.release(conn)
        reused = False
        try:
            conn = await pool.open(key)
        except ConnectFailed as exc:
            # The process is gone since the first try: no other process gets a request
            # that may have been under way.
            raise UpstreamGone(f"the app {app!r} closed the connection", app=app,
                             detail=str(exc)) from exc
        sent.conn = conn


async def _write_body(conn: Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Stream a request body to the app, waiting while its write buffer is full."""
    async for chunk in body:
        if not chunk:
            continue
        if chunked:
            conn.write_chunk(chunk)
        else:
            conn.write(chunk)
        await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")
    conn.request_sent = True


def _written(conn: Connection, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        conn.request_failed(exc)


async def respond_h1(
    request: web.BaseRequest, upstream: Upstream, response_headers: list[tuple[str, str]]
) -> tuple[web.StreamResponse, int]:
    """Stream ``upstream`` to an HTTP/1.1 client; return the response and body size.

    Once the response head is out, a failure of the app aborts the client connection
    (the status is gone) and the response is returned as it stands.
    """
    length = upstream.content_length
    if length is not None and length <= SMALL_BODY and not upstream.bodyless:
        # A small body is read whole and sent with the head in one write: one system
        # call instead of three, and a body cut short still becomes a clean 502.
        body = await upstream.read_all()
        small = web.Response(status=upstream.status, reason=upstream.reason or None,
                             body=body)
        small.headers.popall("Content-Type", None)
        for name, value in upstream.headers:
            small.headers.add(name, value)
        for name, value in response_headers:
            small.headers[name] = value
        return small, len(body)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
    for name, value in upstream.headers:
        response.headers.add(name, value)
    for name, value in response_headers:
        response.headers[name] = value
    if length is not None and not upstream.bodyless:
        response.content_length = length
    elif length is not None and request.method == "HEAD":
        response.headers["Content-Length"] = str(length)
    elif not upstream.bodyless:
        response.enable_chunked_encoding()
    await response.prepare(request)
    sent = 0
    try:
        async for chunk in upstream.body():
            await response.write(chunk)
            sent += len(chunk)
    except (UpstreamBroken, ConnectionResetError):
        # The status is already out: all we can do is cut the connection short.
        if request.transport is not None:
            request.transport.abort()
        return response, sent
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response, sent
