"""Forwarding one request to an app process and streaming the answer back.

Theory of operation
-------------------
The upstream side is an aiohttp ``ClientSession`` per worker with a keep-alive pool of
loopback connections (one ``UnixConnector`` session per socket path for
``transport: unix``). The session adds nothing of its own: no default headers, no
decompression, no cookie jar, no redirects, and the target is sent byte for byte.

The request body streams from the client to the app through an async generator that
reads whatever the client sent (``body_timeout`` between reads), so only one chunk at a
time is in memory. ``request_timeout`` bounds the time until the app's response head
arrives; the response body then streams back chunk by chunk, each ``write`` waiting for
the client to drain (backpressure both ways). Failures are mapped to statuses by
``errors.from_upstream`` only.

``exchange`` is the transport-neutral core (method, target, rewritten headers, body
iterator in; an ``Upstream`` with status, headers and a body iterator out), used by the
HTTP/1.1 handler (``respond_h1`` writes it to aiohttp) and by HTTP/2 streams
(``proxy.h2server``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from module.messages import Endpoint

from .errors import BadGateway, ProxyError, UpstreamGone, from_upstream
from .headers import downstream_headers

CHUNK = 64 * 1024
NO_BODY_STATUSES = frozenset({204, 304})
SMALL_BODY = 64 * 1024  # bodies up to this size are sent with the head in one write


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to app processes."""

    def __init__(self) -> None:
        self._tcp: aiohttp.ClientSession | None = None
        self._unix: dict[str, aiohttp.ClientSession] = {}

    @staticmethod
    def _session(connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_note_reuse)
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, connect=10),
            requote_redirect_url=False,
            trace_configs=[trace],
        )
        # aiohttp would resend any idempotent request whose connection broke, even one
        # the app was busy with when it crashed: ``exchange`` decides that itself.
        session._retry_connection = False
        return session

    def session_for(self, endpoint: Endpoint) -> aiohttp.ClientSession:
        """The session whose pool reaches ``endpoint``."""
        if endpoint.socket_path is not None:
            session = self._unix.get(endpoint.socket_path)
            if session is None:
                unix = aiohttp.UnixConnector(path=endpoint.socket_path, limit=0)
                session = self._unix[endpoint.socket_path] = self._session(unix)
            return session
        if self._tcp is None:
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=30, enable_cleanup_closed=False, use_dns_cache=False
            )
            self._tcp = self._session(connector)
        return self._tcp

    def forget(self, socket_path: str) -> None:
        """Drop the pool of a unix socket whose process is gone."""
        session = self._unix.pop(socket_path, None)
        if session is not None:
            asyncio.ensure_future(session.close())

    async def close(self) -> None:
        """Close every pooled connection."""
        sessions = list(self._unix.values())
        if self._tcp is not None:
            sessions.append(self._tcp)
        self._tcp = None
        self._unix.clear()
        for session in sessions:
            await session.close()


async def client_body(request: web.BaseRequest, body_timeout: float) -> AsyncIterator[bytes]:
    """An HTTP/1.1 request body, chunk by chunk (``BodyTimeout`` between reads)."""
    while True:
        try:
            chunk = await asyncio.wait_for(request.content.readany(), body_timeout)
        except TimeoutError as exc:
            raise BodyTimeout() from exc
        if not chunk:
            return
        yield chunk


_client_body = client_body


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class _Attempt(SimpleNamespace):
    """What aiohttp's tracing tells about one attempt: was a pooled connection reused?"""

    reused: bool = False


async def _note_reuse(session: aiohttp.ClientSession, context: SimpleNamespace,
                      params: object) -> None:
    attempt = context.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.reused = True


class BodyTimeout(Exception):
    """The client stopped sending its body."""


_BodyTimeout = BodyTimeout


class UpstreamBroken(Exception):
    """The app's response body ended early or the connection failed mid-body."""


@dataclass
class Upstream:
    """The app's answer, transport-neutral: status, head and a body iterator."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # without hop-by-hop fields and framing
    content_length: int | None
    bodyless: bool  # HEAD, 1xx, 204, 304: no body goes to the client
    _response: aiohttp.ClientResponse

    async def read_all(self) -> bytes:
        """The whole body (a small one); 502 when it breaks off before the head is sent."""
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise BadGateway("the app broke off its response", detail=str(exc)) from exc

    async def body(self) -> AsyncIterator[bytes]:
        """The response body, chunk by chunk; ``UpstreamBroken`` when it breaks off."""
        if self.bodyless:
            return
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(str(exc)) from exc


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
    session = pool.session_for(endpoint)
    host = "127.0.0.1" if endpoint.socket_path is None else "localhost"
    port = endpoint.port if endpoint.socket_path is None else 80
    url = URL(f"http://{host}:{port}{target}", encoded=True)
    out_headers = list(headers)
    if body is not None and content_length is not None:
        out_headers.append(("Content-Length", str(content_length)))
    try:
        async with asyncio.timeout(request_timeout):
            for tries_left in (1, 0):
                attempt = _Attempt()
                try:
                    upstream = await session.request(
                        method,
                        url,
                        headers=_multidict(out_headers),
                        data=body,
                        allow_redirects=False,
                        compress=None,
                        chunked=None if content_length is not None or body is None else True,
                        trace_request_ctx=attempt,
                    )
                    break
                except aiohttp.ClientConnectorError as exc:
                    if not tries_left:  # the process is gone since the first try: no
                        # other process gets a request that may have been under way
                        raise UpstreamGone(f"the app {app!r} closed the connection",
                                         app=app, detail=str(exc)) from exc
                    raise
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # A kept-alive connection the app had closed meanwhile: the one case
                    # worth a second try, and only when resending cannot do harm.
                    if not (tries_left and attempt.reused and body is None
                            and method in IDEMPOTENT):
                        raise
    except BodyTimeout:
        raise ProxyError("the client stopped sending its body") from None
    except Exception as exc:  # noqa: BLE001 - mapped in one place
        raise from_upstream(exc, app, request_timeout) from exc
    async with upstream:
        yield Upstream(
            status=upstream.status,
            reason=upstream.reason or "",
            headers=downstream_headers(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers
            ),
            content_length=upstream.content_length,
            bodyless=method == "HEAD" or upstream.status in NO_BODY_STATUSES
            or upstream.status < 200,
            _response=upstream,
        )


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


async def forward(
    request: web.BaseRequest,
    endpoint: Endpoint,
    pool: UpstreamPool,
    headers: list[tuple[str, str]],
    *,
    app: str,
    request_timeout: float,
    body_timeout: float,
    response_headers: list[tuple[str, str]],
) -> tuple[web.StreamResponse, int]:
    """Send an HTTP/1.1 ``request`` to ``endpoint``, stream the answer back.

    ``exchange`` + ``respond_h1``. Raises ``ProxyError`` when nothing has been sent to
    the client yet.
    """
    body = client_body(request, body_timeout) if request.body_exists else None
    async with exchange(endpoint, pool, request.method, request.raw_path, headers, body,
                        request.content_length, app=app,
                        request_timeout=request_timeout) as upstream:
        return await respond_h1(request, upstream, response_headers)


def _multidict(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    return CIMultiDict(headers)
