"""A lean HTTP/1.1 client for the app processes: keep-alive pool, strict parser.

Theory of operation
-------------------
Bastion talks to its own app processes over loopback TCP or unix sockets, one request
at a time per connection, so the client needs little: an ``asyncio.Protocol`` per
connection (``Connection``), a pool of idle kept-alive ones per endpoint
(``ConnectionPool``), and a strict response parser working on bytes.

- A request head is built from the (already rewritten) header list in one string; a
  small body goes with it in the same write. A larger or unknown-length body streams
  from its iterator with ``Content-Length`` or fresh chunked framing, waiting whenever
  the transport's write buffer is above its high-water mark.
- The response head is parsed whole once ``CRLF CRLF`` arrived (``parse_head``):
  strict status line, header names and values, one valid ``Content-Length`` or a lone
  ``Transfer-Encoding: chunked``, never both. Anything else raises ``InvalidResponse``.
  1xx interim responses are skipped.
- The body is framed by Content-Length, chunked (``ChunkedDecoder``; trailers are
  discarded) or the end of the connection; it is queued for the reader, and reading
  from the app pauses while more than ``READ_HIGH`` bytes wait (backpressure from the
  client to the app). A body that breaks off raises ``UpstreamBroken``.
- A connection goes back to the pool only when its response was read to the end
  (framed, not by close), the request went out whole, the app did not say ``close``
  (HTTP/1.0: did say ``keep-alive``) and nothing followed the response. Idle ones are
  closed after ``IDLE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass
from typing import cast

IDLE_TIMEOUT = 30.0
MAX_HEAD = 64 * 1024  # response head, and chunked trailers
MAX_CHUNK_LINE = 4096
READ_HIGH = 256 * 1024  # unread body bytes above which reading from the app pauses
SMALL_BODY = 64 * 1024  # a request body up to this size goes with the head in one write
NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamBroken(Exception):
    """The app's response body ended early or the connection failed mid-body."""


class InvalidResponse(Exception):
    """The app's response is not valid HTTP/1.1."""


class ConnectFailed(ConnectionRefusedError):
    """No connection to the app could be opened: nothing reached it."""


class Closed(ConnectionResetError):
    """The app closed the connection before its response head was complete.

    ``early``: not one byte of the response had arrived (a kept-alive connection the app
    had closed meanwhile looks like this)."""

    def __init__(self, message: str, early: bool) -> None:
        super().__init__(message)
        self.early = early


# -- parsing (pure) --------------------------------------------------------------------
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_FIELD = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t\x20-\x7e\x80-\xff]*)")
_B_FIELD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?")


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head."""

    minor: int  # HTTP/1.minor
    status: int
    reason: str
    headers: list[tuple[str, str]]  # every field as received, in order
    content_length: int | None
    chunked: bool
    keep_alive: bool


def parse_head(raw: bytes) -> ResponseHead:
    """Parse a response head (status line and fields, without the final empty line).

    Raises ``InvalidResponse`` for anything not strictly valid.
    """
    lines = raw.decode("latin-1").split("\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise InvalidResponse(f"invalid status line {lines[0][:100]!r}")
    minor = int(match[1])
    status = int(match[2])
    headers: list[tuple[str, str]] = []
    length: int | None = None
    codings: list[str] | None = None
    tokens: list[str] = []
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:
            if line[:1] in (" ", "\t"):
                raise InvalidResponse("obsolete line folding in the response head")
            raise InvalidResponse(f"invalid header line {line[:100]!r}")
        name, value = field[1], field[2].strip(" \t")
        low = name.lower()
        if low == "content-length":
            for item in value.split(","):
                item = item.strip(" \t")
                if _DIGITS.fullmatch(item) is None:
                    raise InvalidResponse(f"invalid Content-Length {value[:100]!r}")
                if length is not None and int(item) != length:
                    raise InvalidResponse("conflicting Content-Length fields")
                length = int(item)
        elif low == "transfer-encoding":
            if codings is None:
                codings = []
            codings.extend(c.strip(" \t").lower() for c in value.split(","))
        elif low == "connection":
            tokens.extend(t.strip(" \t").lower() for t in value.split(","))
        headers.append((name, value))
    chunked = False
    if codings is not None and status >= 200:
        if codings != ["chunked"]:
            raise InvalidResponse(f"unsupported Transfer-Encoding {', '.join(codings)!r}")
        if length is not None:
            raise InvalidResponse("both Transfer-Encoding and Content-Length")
        if minor == 0:
            raise InvalidResponse("Transfer-Encoding in an HTTP/1.0 response")
        chunked = True
    keep_alive = "close" not in tokens and (minor == 1 or "keep-alive" in tokens)
    return ResponseHead(minor, status, match[3] or "", headers, length, chunked, keep_alive)


_SIZE, _DATA, _DATA_END, _TRAILER, _END = range(5)


class ChunkedDecoder:
    """Incremental, strict decoder of a chunked body; trailers are checked and dropped."""

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0
        self._pending = b""
        self._trailer = 0
        self.done = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """(body pieces in ``data``, bytes after the end of the body); raises
        ``InvalidResponse`` on broken framing."""
        if self.done:
            return [], data
        if self._pending:
            data = self._pending + data
            self._pending = b""
        out: list[bytes] = []
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state == _DATA:
                take = min(self._left, size - pos)
                out.append(data if take == size else data[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
            elif state == _SIZE:
                end = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if end < 0:
                    if size - pos >= MAX_CHUNK_LINE:
                        raise InvalidResponse("chunk size line too long")
                    self._pending = data[pos:]
                    break
                match = _CHUNK_SIZE.fullmatch(data, pos, end)
                if match is None:
                    raise InvalidResponse(f"invalid chunk size line {data[pos:end][:40]!r}")
                self._left = int(match[1], 16)
                self._state = _DATA if self._left else _TRAILER
                pos = end + 2
            elif state == _DATA_END:
                if size - pos < 2:
                    if data[pos:] != b"\r":
                        raise InvalidResponse("chunk data not followed by CRLF")
                    self._pending = data[pos:]
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise InvalidResponse("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            else:  # _TRAILER
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if self._trailer + size - pos > MAX_HEAD:
                        raise InvalidResponse("chunked trailers too large")
                    self._pending = data[pos:]
                    break
                if end == pos:
                    self._state = _END
                    self.done = True
                    return out, data[pos + 2:]
                self._trailer += end - pos + 2
                if self._trailer > MAX_HEAD:
                    raise InvalidResponse("chunked trailers too large")
                if _B_FIELD.fullmatch(data, pos, end) is None:
                    raise InvalidResponse("invalid trailer field")
                pos = end + 2
        return out, b""


def build_head(method: str, target: str, headers: list[tuple[str, str]],
               framing: str | None) -> bytes:
    """A request head; ``framing`` is a last header line (``Content-Length: N`` or
    ``Transfer-Encoding: chunked``) or None."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if framing is not None:
        lines.append(framing)
    lines += ("", "")
    text = "\r\n".join(lines)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


# -- a connection ----------------------------------------------------------------------
_IDLE, _HEAD, _BODY_LENGTH, _BODY_CHUNKED, _BODY_CLOSE, _DONE, _BROKEN = range(7)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an app process, one exchange at a time."""

    def __init__(self, key: int | str) -> None:
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.uses = 0  # requests started on it
        self.idle_since = 0.0
        self.reusable = False
        self.request_sent = False
        self._state = _IDLE
        self._head_only = False  # the request was HEAD
        self._buffer = b""  # an incomplete response head
        self._got_any = False
        self._waiter: asyncio.Future[ResponseHead] | None = None
        self._left = 0
        self._decoder: ChunkedDecoder | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._reader: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._read_paused = False
        self._write_paused = False
        self._drainer: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _BODY_LENGTH:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                self._push(data)
                return
            if len(data) > left:
                self.reusable = False  # bytes beyond the response: do not trust it
                data = data[:left]
            self._left = 0
            self._push(data)
            self._finish()
        elif state == _HEAD:
            self._head_data(data)
        elif state == _BODY_CHUNKED:
            assert self._decoder is not None
            try:
                pieces, extra = self._decoder.feed(data)
            except InvalidResponse as exc:
                self._break(UpstreamBroken(f"invalid chunked body: {exc}"))
                return
            for piece in pieces:
                self._push(piece)
            if self._decoder.done:
                if extra:
                    self.reusable = False
                self._finish()
        elif state == _BODY_CLOSE:
            self._push(data)
        else:  # bytes nobody asked for: this connection cannot be trusted any more
            self.reusable = False
            if state == _IDLE and self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        state = self._state
        if state == _HEAD:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                early = not self._got_any
                waiter.set_exception(Closed(
                    "the app closed the connection before answering" if early else
                    "the app closed the connection in the middle of its response head",
                    early))
            self._state = _BROKEN
        elif state == _BODY_CLOSE and exc is None:
            self._finish()
        elif state in (_BODY_LENGTH, _BODY_CHUNKED, _BODY_CLOSE):
            self._break(UpstreamBroken(
                f"the app closed the connection before the end of the body{_reason(exc)}"))
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            drainer.set_exception(ConnectionResetError("the app closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            drainer.set_result(None)

    # -- the request ----------------------------------------------------------------------
    def start(self, payload: bytes, head_only: bool, whole: bool
              ) -> asyncio.Future[ResponseHead]:
        """Send ``payload`` (the head, with the whole body when ``whole``); the response
        head resolves the future. Otherwise the body follows with ``write`` or
        ``write_chunk``, and ``request_sent`` is set once it is out."""
        self.uses += 1
        self._state = _HEAD
        self._head_only = head_only
        self._buffer = b""
        self._got_any = False
        self._error = None
        self.reusable = False
        self.request_sent = whole
        self._chunks.clear()
        self._queued = 0
        waiter = self._waiter = self.loop.create_future()
        if self.closed or self.transport is None or self.transport.is_closing():
            self._state = _BROKEN
            waiter.set_exception(Closed("the app closed the connection", True))
        else:
            self.transport.write(payload)
        return waiter

    def write(self, data: bytes) -> None:
        """More of the request body."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_chunk(self, data: bytes) -> None:
        """A chunk of a chunked request body."""
        if self.transport is not None and not self.closed:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))

    async def drain(self) -> None:
        """Wait while the write buffer is above its high-water mark."""
        if self.closed:
            raise ConnectionResetError("the app closed the connection")
        if self._write_paused:
            drainer = self._drainer = self.loop.create_future()
            try:
                await drainer
            finally:
                self._drainer = None

    def request_failed(self, exc: BaseException) -> None:
        """Sending the request body failed: the response head waiter gets ``exc``, and the
        connection is given up."""
        waiter = self._waiter
        if self._state == _HEAD and waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            self._state = _BROKEN
        self.abort()

    # -- the response ---------------------------------------------------------------------
    def _head_data(self, data: bytes) -> None:
        self._got_any = True
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._fail_head(InvalidResponse("response head too large"))
                else:
                    self._buffer = buffer
                return
            if end > MAX_HEAD:
                self._fail_head(InvalidResponse("response head too large"))
                return
            try:
                head = parse_head(buffer[:end])
            except InvalidResponse as exc:
                self._fail_head(exc)
                return
            buffer = buffer[end + 4:]
            if head.status >= 200:
                break
            if head.status == 101:
                self._fail_head(InvalidResponse("unexpected 101 Switching Protocols"))
                return
            if not buffer:  # an interim response (100 Continue): the real one follows
                self._buffer = b""
                return
        self._buffer = b""
        self.reusable = head.keep_alive
        if self._head_only or head.status in NO_BODY_STATUSES:
            self._state = _DONE
            if buffer:
                self.reusable = False
        elif head.chunked:
            self._decoder = ChunkedDecoder()
            self._state = _BODY_CHUNKED
        elif head.content_length is not None:
            self._left = head.content_length
            self._state = _BODY_LENGTH if self._left else _DONE
        else:
            self.reusable = False
            self._state = _BODY_CLOSE
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)
        if buffer:
            self.data_received(buffer)

    def _fail_head(self, exc: Exception) -> None:
        self._state = _BROKEN
        self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._queued += len(data)
        if self._queued > READ_HIGH and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _finish(self) -> None:
        self._state = _DONE
        self._decoder = None
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _break(self, exc: Exception) -> None:
        self._state = _BROKEN
        self._error = exc
        self.reusable = False
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)
        self.abort()

    @property
    def complete(self) -> bool:
        """The response arrived to its end (it may still be queued for the reader)."""
        return self._state == _DONE

    async def read(self) -> bytes:
        """The next piece of the body (everything queued), b"" at its end; raises
        ``UpstreamBroken`` when it broke off."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._queued = 0
                if self._read_paused:
                    self._read_paused = False
                    if self.transport is not None and not self.closed:
                        self.transport.resume_reading()
                return data
            state = self._state
            if state == _DONE:
                return b""
            if state == _BROKEN or state == _IDLE:
                raise self._error or UpstreamBroken("the response is gone")
            reader = self._reader = self.loop.create_future()
            try:
                await reader
            finally:
                self._reader = None

    async def read_all(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def abort(self) -> None:
        """Drop the connection at once."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    def close(self) -> None:
        """Close the connection (an idle one, or one whose exchange is over)."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def recycle(self) -> bool:
        """Ready the connection for the pool; False when it must not be reused."""
        if not (self.reusable and self.request_sent and self._state == _DONE
                and not self.closed):
            return False
        self._state = _IDLE
        self._waiter = None
        self._chunks.clear()
        self._queued = 0
        if self._read_paused:
            self._read_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        return True


def _reason(exc: Exception | None) -> str:
    return f" ({exc})" if exc is not None else ""


# -- the pool --------------------------------------------------------------------------
class ConnectionPool:
    """Idle kept-alive connections per app endpoint (a TCP port or a unix socket path)."""

    def __init__(self) -> None:
        self._idle: dict[int | str, list[Connection]] = {}
        self._busy: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def pooled(self, key: int | str) -> Connection | None:
        """An idle connection to ``key``, taken from the pool, or None."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = idle[-1].loop.time()
        while idle:
            conn = idle.pop()
            if (not conn.closed and conn.transport is not None
                    and not conn.transport.is_closing()
                    and now - conn.idle_since < IDLE_TIMEOUT):
                self._busy.add(conn)
                return conn
            conn.close()
        return None

    async def open(self, key: int | str) -> Connection:
        """A new connection to ``key`` (a port on 127.0.0.1 or a unix socket path);
        ``ConnectFailed`` when it cannot be opened."""
        loop = asyncio.get_running_loop()
        try:
            if isinstance(key, str):
                _, conn = await loop.create_unix_connection(lambda: Connection(key), key)
            else:
                _, conn = await loop.create_connection(lambda: Connection(key),
                                                       "127.0.0.1", key)
        except OSError as exc:
            where = key if isinstance(key, str) else f"127.0.0.1:{key}"
            raise ConnectFailed(exc.errno, f"cannot connect to {where}: "
                                           f"{exc.strerror or exc}") from exc
        self._busy.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """The exchange on ``conn`` is over: keep it for the next one, or close it."""
        self._busy.discard(conn)
        if not conn.recycle():
            if conn.complete:
                conn.close()
            else:
                conn.abort()
            return
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(IDLE_TIMEOUT / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and now - c.idle_since < IDLE_TIMEOUT]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = loop.call_later(IDLE_TIMEOUT / 2, self._sweep)

    def forget(self, key: int | str) -> None:
        """Close every connection to ``key`` (its process is gone)."""
        for conn in self._idle.pop(key, []):
            conn.close()
        for conn in [c for c in self._busy if c.key == key]:
            self._busy.discard(conn)
            conn.abort()

    def close_all(self) -> None:
        """Close every connection, idle or busy."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.abort()
        self._busy.clear()
