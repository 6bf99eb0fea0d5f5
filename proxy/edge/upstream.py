"""The upstream side: HTTP/1.1 connections to the app processes, and their pool.

Theory of operation
-------------------
Bastion talks to its own app processes over loopback TCP or unix sockets, one request
at a time per connection. Each connection is an ``asyncio.Protocol``
(``UpstreamConnection``) driving llhttp's response parser (``httptools``); what it
parses goes straight to the connection's *sink* (the ``Flow`` of the request it
carries, see ``proxy.edge.flow``) as callbacks: ``upstream_head``, ``upstream_body``,
``upstream_end``, ``upstream_failed``, ``upstream_switched`` (a 101 for a WebSocket
tunnel). No future, task or coroutine is made per response.

Checks on top of llhttp's (which refuses broken status lines, obs-fold, bad or
repeated ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding`` and broken
chunked framing): a status outside 100-599, a ``Transfer-Encoding`` other than a lone
``chunked``, or one in an HTTP/1.0 response are invalid (``InvalidResponse``); 1xx
interim responses are skipped; a 101 is invalid unless a tunnel was asked for. The
response to a HEAD request ends with its head (llhttp would wait for the body its
``Content-Length`` announces: the parser is replaced for the next exchange).

A connection goes back to the pool (``UpstreamPool.release``) only when its response
was read to the end (framed, not by close), the request went out whole, the app did not
say ``close`` and nothing followed the response. Idle ones are closed after
``IDLE_TIMEOUT``. Backpressure: the sink pauses reading from the app
(``pause_reading``) while the client cannot take more, and is told when the app's
socket cannot take more of the request body (``upstream_writable``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, cast

import httptools
from mypy_extensions import mypyc_attr

IDLE_TIMEOUT = 30.0
MAX_HEAD = 64 * 1024  # bytes of a response head


class UpstreamError(Exception):
    """Base of the failures of an exchange with the app."""


class InvalidResponse(UpstreamError):
    """The app's response is not valid HTTP/1.1."""


class UpstreamBroken(UpstreamError):
    """The app's response body ended early or the connection failed mid-body."""


class Closed(UpstreamError):
    """The app closed the connection before its response head was complete.

    ``early``: not one byte of the response had arrived (a kept-alive connection the app
    had closed meanwhile looks like this)."""

    def __init__(self, message: str, early: bool) -> None:
        super().__init__(message)
        self.early = early


class ConnectFailed(UpstreamError):
    """No connection to the app could be opened: nothing reached it."""


class ResponseHead:
    """A parsed response head."""

    __slots__ = ("status", "reason", "headers", "content_length", "chunked", "minor")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 content_length: int | None, chunked: bool, minor: int) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # every field as received, in order
        self.content_length = content_length
        self.chunked = chunked
        self.minor = minor


class Sink(Protocol):
    """What an upstream connection reports to (the request's flow)."""

    def upstream_head(self, head: ResponseHead) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_end(self) -> None: ...
    def upstream_failed(self, exc: UpstreamError) -> None: ...
    def upstream_switched(self, head: ResponseHead, rest: bytes) -> None: ...
    def upstream_writable(self, writable: bool) -> None: ...


class _Stop(Exception):
    """Raised in a parser callback to stop parsing (the reason is kept aside)."""


# Exchange states
_IDLE, _HEAD, _BODY, _DONE, _BROKEN, _TUNNEL = range(6)


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an app process, one exchange at a time."""

    def __init__(self, key: int | str) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.uses = 0  # requests started on it
        self.idle_since = 0.0
        self.reusable = False
        self.request_sent = False
        self.sink: Sink | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._fresh = True  # the parser has seen nothing yet
        self._state = _IDLE
        self._head_only = False
        self._tunnel = False
        self._got_any = False
        self._head_size = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._codings: list[bytes] | None = None
        self._close_delimited = False
        self._error: UpstreamError | None = None
        self._interim = False

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _TUNNEL:
            if self.sink is not None:
                self.sink.upstream_body(data)
            return
        if state != _HEAD and state != _BODY:
            # Bytes nobody asked for: this connection cannot be trusted any more.
            self.reusable = False
            if state == _IDLE and self.transport is not None:
                self.transport.abort()
            return
        self._got_any = True
        self._fresh = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switched(data[exc.args[0]:] if exc.args else b"")
        except httptools.HttpParserCallbackError:
            # A callback stopped the parser: for a reason (``_error``), or because the
            # answer is complete (HEAD) or bytes follow it that nobody asked for.
            if self._error is not None:
                self._fail(self._error)
            elif self._state == _IDLE or self._state == _DONE:
                self.reusable = False
        except httptools.HttpParserError as exc:
            if self._state == _HEAD:
                self._fail(InvalidResponse(f"invalid response: {exc}"))
            elif self._state == _BODY:
                self._fail(UpstreamBroken(f"invalid response body: {exc}"))
            else:
                self.reusable = False  # garbage after a complete response

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        state = self._state
        sink = self.sink
        if state == _HEAD:
            self._state = _BROKEN
            early = not self._got_any
            if sink is not None:
                sink.upstream_failed(Closed(
                    "the app closed the connection before answering" if early else
                    "the app closed the connection in the middle of its response head",
                    early))
        elif state == _BODY:
            if self._close_delimited and exc is None:
                self._state = _DONE
                if sink is not None:
                    sink.upstream_end()
            else:
                self._state = _BROKEN
                if sink is not None:
                    sink.upstream_failed(UpstreamBroken(
                        "the app closed the connection before the end of the body"
                        + (f" ({exc})" if exc is not None else "")))
        elif state == _TUNNEL:
            self._state = _DONE
            if sink is not None:
                sink.upstream_end()

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(True)

    # -- llhttp callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            self._error = None  # a second response: never asked for
            self.reusable = False
            if self._state == _IDLE:
                self.abort()
            raise _Stop()
        self._reason = b""
        self._headers = []
        self._length = None
        self._codings = None
        self._head_size = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            self._error = InvalidResponse("response head too large")
            raise _Stop()
        if self._state == _BODY:
            return  # chunked trailers: dropped, never part of the head
        size = len(name)  # (only the framing fields are lower-cased, found by length)
        if size == 17 and name.lower() == b"transfer-encoding":
            if self._codings is None:
                self._codings = []
            self._codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
        elif size == 14 and name.lower() == b"content-length":
            self._length = int(value.strip(b" \t"))  # llhttp checked digits and duplicates
        self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            self._error = InvalidResponse(f"invalid status code {status}")
            raise _Stop()
        if status < 200:
            if status == 101 and self._tunnel:
                return  # llhttp stops after this head: ``_switched``
            if status == 101:
                self._error = InvalidResponse("unexpected 101 Switching Protocols")
                raise _Stop()
            self._interim = True  # 100 Continue and friends: the real answer follows
            return
        minor = 1 if parser.get_http_version() == "1.1" else 0
        chunked = False
        codings = self._codings
        if codings is not None:
            if codings != [b"chunked"]:
                self._error = InvalidResponse(
                    f"unsupported Transfer-Encoding {b', '.join(codings)!r}")
                raise _Stop()
            if minor == 0:
                self._error = InvalidResponse("Transfer-Encoding in an HTTP/1.0 response")
                raise _Stop()
            chunked = True
        self.reusable = parser.should_keep_alive()
        bodyless = self._head_only or status == 204 or status == 304
        length = self._length
        if bodyless or length == 0:
            self._deliver_head(status, chunked, length, minor)
            # After a HEAD answer llhttp would wait for the body Content-Length
            # announces: the next exchange gets a fresh parser, and what the old one
            # still sees makes the connection unusable (``on_body``).
            self._complete(fresh_parser=self._head_only)
            return
        self._close_delimited = not chunked and length is None
        if self._close_delimited:
            self.reusable = False
        self._state = _BODY
        self._deliver_head(status, chunked, length, minor)

    def on_body(self, body: bytes) -> None:
        if self._state == _BODY and self.sink is not None:
            self.sink.upstream_body(body)
        else:  # bytes after the answer: never asked for
            self.reusable = False
            if self._state == _IDLE:
                self.abort()  # already back in the pool

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._state == _BODY:
            self._complete()

    # -- the exchange ---------------------------------------------------------------------
    def _deliver_head(self, status: int, chunked: bool, length: int | None,
                      minor: int = 1) -> None:
        if self._state == _HEAD:
            self._state = _BODY
        head = ResponseHead(status, self._reason, self._headers, length, chunked, minor)
        if self.sink is not None:
            self.sink.upstream_head(head)

    def _complete(self, fresh_parser: bool = False) -> None:
        self._state = _DONE
        if fresh_parser:
            self._parser = httptools.HttpResponseParser(self)
            self._fresh = True
        if self.sink is not None:
            self.sink.upstream_end()

    def _switched(self, rest: bytes) -> None:
        self._state = _TUNNEL
        self.reusable = False
        sink = self.sink
        if sink is not None:
            head = ResponseHead(101, self._reason, self._headers, None, False, 1)
            sink.upstream_switched(head, rest)

    def _fail(self, exc: UpstreamError) -> None:
        self._state = _BROKEN
        self.reusable = False
        self.abort()
        sink = self.sink
        if sink is not None:
            sink.upstream_failed(exc)

    def send(self, sink: Sink, payload: bytes, *, head_only: bool, whole: bool,
             tunnel: bool = False) -> bool:
        """Start an exchange: write ``payload`` (the head, with the whole body when
        ``whole``); the answer goes to ``sink``. Otherwise the body follows with
        ``write``/``write_chunk`` and ``request_done``. False when the connection is gone
        (nothing was sent)."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        self.uses += 1
        self.sink = sink
        self._state = _HEAD
        self._head_only = head_only
        self._tunnel = tunnel
        self._got_any = False
        self._error = None
        self._interim = False
        self._close_delimited = False
        self.reusable = False
        self.request_sent = whole
        if not self._fresh:
            self._parser = httptools.HttpResponseParser(self)
            self._fresh = True
        transport.write(payload)
        return True

    def write(self, data: bytes) -> None:
        """More of the request body (or tunnelled bytes)."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_chunk(self, data: bytes) -> None:
        """A chunk of a chunked request body."""
        if self.transport is not None and not self.closed:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def request_done(self, chunked: bool) -> None:
        """The request body is complete."""
        if chunked:
            self.write(b"0\r\n\r\n")
        self.request_sent = True

    def write_eof(self) -> None:
        """Half-close toward the app (a tunnel whose client stopped sending)."""
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        """Stop reading from the app (the client cannot take more)."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the app again."""
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    @property
    def complete(self) -> bool:
        """The response arrived to its end."""
        return self._state == _DONE

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
        self.sink = None
        if not (self.reusable and self.request_sent and self._state == _DONE
                and not self.closed and not self._tunnel):
            return False
        self._state = _IDLE
        return True


@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamPool:
    """Idle kept-alive connections per app endpoint (a TCP port or a unix socket path)."""

    def __init__(self) -> None:
        self._idle: dict[int | str, list[UpstreamConnection]] = {}
        self._busy: set[UpstreamConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def pooled(self, key: int | str) -> UpstreamConnection | None:
        """An idle connection to ``key``, taken from the pool, or None."""
        idle = self._idle.get(key)
        if not idle:
            return None
        # (time.monotonic, not the loop's clock: asyncio.get_running_loop() costs a
        # getpid() system call in CPython 3.11, twice per proxied request here)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if (not conn.closed and transport is not None and not transport.is_closing()
                    and now - conn.idle_since < IDLE_TIMEOUT):
                self._busy.add(conn)
                return conn
            conn.close()
        return None

    async def open(self, key: int | str) -> UpstreamConnection:
        """A new connection to ``key`` (a port on 127.0.0.1 or a unix socket path);
        ``ConnectFailed`` when it cannot be opened."""
        loop = asyncio.get_running_loop()
        try:
            if isinstance(key, str):
                _, conn = await loop.create_unix_connection(
                    lambda: UpstreamConnection(key), key)
            else:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(key), "127.0.0.1", key)
        except OSError as exc:
            where = key if isinstance(key, str) else f"127.0.0.1:{key}"
            raise ConnectFailed(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        self._busy.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """The exchange on ``conn`` is over: keep it for the next one, or close it."""
        self._busy.discard(conn)
        if not conn.recycle():
            if conn.complete:
                conn.close()
            else:
                conn.abort()
            return
        conn.idle_since = time.monotonic()
        idle = self._idle.get(conn.key)
        if idle is None:
            self._idle[conn.key] = [conn]
        else:
            idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_TIMEOUT / 2,
                                                                  self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
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

    def close_idle(self) -> None:
        """Close the idle connections (a graceful stop)."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.close_idle()
        for conn in list(self._busy):
            conn.abort()
        self._busy.clear()
