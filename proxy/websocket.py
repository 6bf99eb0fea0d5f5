"""WebSocket upgrades tunnelled to the app: frames are never parsed nor rewritten.

Theory of operation
-------------------
An HTTP/1.1 ``GET`` with ``Upgrade: websocket`` and ``Connection: upgrade`` goes the same
way as any request up to the endpoint (``RequestHandler.leased``: route, endpoint,
header rewrite); the rewritten head keeps ``Upgrade``/``Connection`` (the only case
where they cross) and the ``Sec-WebSocket-*`` fields, which are end-to-end anyway.

It is not sent through the keep-alive pool: :func:`tunnel` opens a fresh TCP (or unix)
connection to the endpoint, writes the head and reads the app's response head
(``request_timeout``). Anything but ``101`` is relayed as an ordinary response (body
framed by Content-Length, chunked, or close). On ``101`` the head goes to the client,
then the client connection is taken over the way aiohttp's own ``web_ws`` does it: the
handler's protocol gets a payload "parser" (``set_parser``) that writes every byte the
client sends straight to the app, and the handler copies every byte from the app to
the client. Backpressure both ways: the client's reading pauses while the app's write
buffer is full, and each write to the client waits for it to drain. When either side
closes, the other is closed; close frames and codes are the endpoints' own bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from .errors import BadGateway, ProxyError, from_upstream
from .headers import connection_listed, downstream_headers

if TYPE_CHECKING:
    from .server import Leased

CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024
HIGH_WATER = 256 * 1024


def is_upgrade(method: str, headers: list[tuple[str, str]]) -> bool:
    """True for a WebSocket upgrade request (RFC 6455 4.1)."""
    if method != "GET":
        return False
    upgrades = [v for n, v in headers if n.lower() == "upgrade"]
    if len(upgrades) != 1:
        return False
    tokens = {t.strip().lower() for t in upgrades[0].split(",")}
    return "websocket" in tokens and "upgrade" in connection_listed(headers)


def upgrade_headers(client: list[tuple[str, str]], rewritten: list[tuple[str, str]]
                    ) -> list[tuple[str, str]]:
    """The rewritten head with ``Connection: Upgrade`` and the client's ``Upgrade``."""
    upgrade = next(v for n, v in client if n.lower() == "upgrade")
    return [*rewritten, ("Connection", "Upgrade"), ("Upgrade", upgrade)]


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 request head."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response_head(data: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    """Status, reason and fields of an HTTP/1.1 response head (``ValueError`` if bad)."""
    text = data.decode("latin-1")
    status_line, *lines = text.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"bad status line {status_line!r}")
    fields = []
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line!r}")
        fields.append((name, value.strip(" \t")))
    return int(code), reason, fields


class _ToApp:
    """The payload "parser" aiohttp feeds the client's bytes to after the 101."""

    def __init__(self, writer: asyncio.StreamWriter, client: asyncio.Transport) -> None:
        self.writer = writer
        self.client = client
        self.received = 0
        self._draining: asyncio.Task[None] | None = None

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.received += len(data)
        if self.writer.is_closing():
            return False, b""
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > HIGH_WATER and self._draining is None:
            self.client.pause_reading()
            self._draining = asyncio.ensure_future(self._drain())
        return False, b""

    def feed_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write_eof()

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            self._draining = None
            if not self.client.is_closing():
                self.client.resume_reading()


async def _open(leased: Leased) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    endpoint = leased.endpoint
    if endpoint.socket_path is not None:
        return await asyncio.open_unix_connection(endpoint.socket_path, limit=MAX_HEAD)
    return await asyncio.open_connection("127.0.0.1", endpoint.port, limit=MAX_HEAD)


async def tunnel(request: web.BaseRequest, leased: Leased,
                 response_headers: list[tuple[str, str]]) -> tuple[web.StreamResponse, int]:
    """Tunnel one upgrade request to the app; return the response and bytes sent back."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(leased.request_timeout):
            reader, writer = await _open(leased)
            writer.write(request_head(request.method, request.raw_path, leased.headers))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status, reason, fields = parse_response_head(head[:-4])
    except ValueError as exc:
        if writer is not None:
            writer.close()
        raise BadGateway(f"the app {leased.app!r} sent an invalid response", app=leased.app,
                         detail=str(exc)) from exc
    except Exception as exc:
        if writer is not None:
            writer.close()
        if isinstance(exc, ProxyError):
            raise
        raise from_upstream(exc, leased.app, leased.request_timeout) from exc
    try:
        if status == 101:
            return await _switch(request, reader, writer, reason, fields, response_headers)
        return await _relay(request, reader, status, reason, fields, response_headers)
    finally:
        writer.close()


async def _switch(request: web.BaseRequest, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter, reason: str, fields: list[tuple[str, str]],
                  response_headers: list[tuple[str, str]]) -> tuple[web.StreamResponse, int]:
    response = web.StreamResponse(status=101, reason=reason or None)
    for name, value in fields:
        if name.lower() not in ("content-length", "transfer-encoding"):
            response.headers.add(name, value)
    for name, value in response_headers:
        response.headers[name] = value
    await response.prepare(request)
    transport = request.transport
    protocol = request.protocol
    assert transport is not None
    protocol.keep_alive(False)
    protocol.set_parser(_ToApp(writer, transport))  # type: ignore[arg-type]
    sent = 0
    try:
        while chunk := await reader.read(CHUNK):
            await response.write(chunk)
            sent += len(chunk)
    except (OSError, RuntimeError):
        pass
    transport.close()
    return response, sent


async def _relay(request: web.BaseRequest, reader: asyncio.StreamReader, status: int,
                 reason: str, fields: list[tuple[str, str]],
                 response_headers: list[tuple[str, str]]) -> tuple[web.StreamResponse, int]:
    """A refused upgrade: relay the app's ordinary answer."""
    response = web.StreamResponse(status=status, reason=reason or None)
    for name, value in downstream_headers(fields):
        response.headers.add(name, value)
    for name, value in response_headers:
        response.headers[name] = value
    lengths = [v for n, v in fields if n.lower() == "content-length"]
    chunked = any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in fields)
    bodyless = status in (204, 304) or status < 200
    if lengths and lengths[0].strip().isdigit() and not chunked:
        response.content_length = int(lengths[0])
        body = _exactly(reader, int(lengths[0]))
    elif chunked:
        response.enable_chunked_encoding()
        body = _dechunked(reader)
    else:
        response.force_close()
        body = _until_eof(reader)
    if bodyless:
        body = _nothing()
    await response.prepare(request)
    sent = 0
    try:
        async for chunk in body:
            await response.write(chunk)
            sent += len(chunk)
    except (OSError, ValueError, asyncio.IncompleteReadError):
        if request.transport is not None:
            request.transport.abort()
        return response, sent
    await response.write_eof()
    return response, sent


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


async def _exactly(reader: asyncio.StreamReader, size: int) -> AsyncIterator[bytes]:
    while size > 0:
        chunk = await reader.read(min(size, CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", size)
        size -= len(chunk)
        yield chunk


async def _until_eof(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while chunk := await reader.read(CHUNK):
        yield chunk


async def _dechunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return
        async for chunk in _exactly(reader, size):
            yield chunk
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("bad chunk ending")
