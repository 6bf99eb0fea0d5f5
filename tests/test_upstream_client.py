"""The upstream HTTP/1.1 client (proxy/upstream.py) in memory: the strict head parser,
the chunked decoder, and a ``Connection`` fed bytes through a fake transport (framing,
1xx, reuse rules, read pausing, early close)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from proxy.upstream import (
    READ_HIGH,
    ChunkedDecoder,
    Closed,
    Connection,
    ConnectionPool,
    InvalidResponse,
    UpstreamBroken,
    build_head,
    parse_head,
)


# -- parse_head ------------------------------------------------------------------------
def test_parse_head_basic() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: 13\r\nX-A:  spaced value \t")
    assert (head.status, head.reason, head.minor) == (200, "OK", 1)
    assert head.headers == [("Content-Type", "text/plain"), ("Content-Length", "13"),
                            ("X-A", "spaced value")]
    assert head.content_length == 13 and not head.chunked and head.keep_alive


@pytest.mark.parametrize("line, status, reason", [
    (b"HTTP/1.1 204", 204, ""),
    (b"HTTP/1.1 404 ", 404, ""),
    (b"HTTP/1.0 500 Internal \xe9rror", 500, "Internal \xe9rror"),
])
def test_parse_status_line_variants(line: bytes, status: int, reason: str) -> None:
    head = parse_head(line)
    assert (head.status, head.reason) == (status, reason)


@pytest.mark.parametrize("raw", [
    b"",
    b"NOT HTTP AT ALL",
    b"HTTP/1.1 2OO OK",
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 099 Low",
    b"HTTP/2 200 OK",
    b"HTTP/1.1  200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\rb",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\nb",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb",
    b"HTTP/1.1 200 OK\r\nBadHeader",
    b"HTTP/1.1 200 OK\r\nX-Bad : 1",
    b"HTTP/1.1 200 OK\r\n: empty name",
    b"HTTP/1.1 200 OK\r\nX(Bad): 1",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tfolded",
    b"HTTP/1.1 200 OK\r\n\r\nX-A: 1",  # an empty line inside the head
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x10",
    b"HTTP/1.1 200 OK\r\nContent-Length: ",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked",
])
def test_parse_head_rejects(raw: bytes) -> None:
    with pytest.raises(InvalidResponse):
        parse_head(raw)


def test_parse_head_framing_and_keep_alive() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked").chunked
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5"
                      ).content_length == 5
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 007").content_length == 7
    assert not parse_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close").keep_alive
    assert not parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1").keep_alive
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive").keep_alive
    head = parse_head(b"HTTP/1.1 200 OK")
    assert head.content_length is None and not head.chunked and head.keep_alive


def test_parse_head_long_values_are_fast() -> None:
    started = time.monotonic()
    for filler in (b" " * 60000, b"a " * 30000):
        with pytest.raises(InvalidResponse):
            parse_head(b"HTTP/1.1 200 OK\r\nX-A: a" + filler + b"\x00")
    assert time.monotonic() - started < 1.0


# -- ChunkedDecoder ---------------------------------------------------------------------
BODY = (b"5\r\nhello\r\n"
        b"6;name=value; other\r\n world\r\n"
        b"A \t;ext\r\n0123456789\r\n"
        b"0\r\nTrailer-One: x\r\nTrailer-Two: y\r\n\r\n")


def _decode_in_pieces(data: bytes, step: int) -> tuple[bytes, bytes, bool]:
    decoder = ChunkedDecoder()
    body, extra = b"", b""
    for i in range(0, len(data), step):
        pieces, rest = decoder.feed(data[i:i + step])
        body += b"".join(pieces)
        extra += rest
    return body, extra, decoder.done


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunked_any_split(step: int) -> None:
    body, extra, done = _decode_in_pieces(BODY + b"NEXT", step)
    assert body == b"hello world0123456789"
    assert done and extra == b"NEXT"


def test_chunked_not_done_until_the_last_crlf() -> None:
    body, extra, done = _decode_in_pieces(b"2\r\nok\r\n0\r\n", 1)
    assert body == b"ok" and not done and extra == b""


@pytest.mark.parametrize("data", [
    b"zz\r\nok\r\n0\r\n\r\n",
    b"\r\nok\r\n0\r\n\r\n",
    b"-2\r\nok\r\n0\r\n\r\n",
    b"+2\r\nok\r\n0\r\n\r\n",
    b"0x2\r\nok\r\n0\r\n\r\n",
    b" 2\r\nok\r\n0\r\n\r\n",
    b"2 \r\nok\r\n0\r\n\r\n",
    b"2\nok\r\n0\r\n\r\n",
    b"2\r\nokX\r\n0\r\n\r\n",
    b"2\r\nok\n0\r\n\r\n",
    b"2;a\x00b\r\nok\r\n0\r\n\r\n",
    b"1000000000000000\r\n",  # 16 hex digits: too large
    b"1" * 5000,  # a size line without end
    b"2\r\nok\r\n0\r\nBad Trailer\r\n\r\n",
    b"2\r\nok\r\n0\r\n folded\r\n\r\n",
])
def test_chunked_rejects(data: bytes) -> None:
    for step in (1, len(data)):
        with pytest.raises(InvalidResponse):
            _decode_in_pieces(data, step)


def test_chunked_large_size_is_accepted() -> None:
    decoder = ChunkedDecoder()
    pieces, _ = decoder.feed(b"fffffffffffffff\r\nabc")
    assert pieces == [b"abc"] and not decoder.done


# -- build_head -------------------------------------------------------------------------
def test_build_head() -> None:
    head = build_head("POST", "/a?b=c", [("Host", "h"), ("X-V", "caf\xe9")],
                      "Content-Length: 3")
    assert head == (b"POST /a?b=c HTTP/1.1\r\nHost: h\r\nX-V: caf\xe9\r\n"
                    b"Content-Length: 3\r\n\r\n")
    assert build_head("GET", "/", [("Host", "h")], None) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


# -- Connection with a fake transport ---------------------------------------------------
class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: Connection) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = b""
        self.paused = False
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._lose(None)

    def abort(self) -> None:
        self.aborted = True
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, exc)


def connection() -> tuple[Connection, FakeTransport]:
    conn = Connection(1234)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_content_length_response_and_reuse() -> None:
    async def main() -> None:
        conn, transport = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", False, True)
        assert transport.written.startswith(b"GET / ")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Le")
        assert not waiter.done()
        conn.data_received(b"ngth: 10\r\n\r\nhello")
        head = await waiter
        assert head.status == 200 and head.content_length == 10
        assert await conn.read() == b"hello"
        conn.data_received(b"world")
        assert await conn.read() == b"world"
        assert await conn.read() == b""
        assert conn.complete and conn.recycle()
        # Second exchange on the same connection.
        waiter = conn.start(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await waiter
        assert await conn.read_all() == b"ok" and conn.recycle()
    run(main())


def test_interim_responses_are_skipped() -> None:
    async def main() -> None:
        conn, _ = connection()
        waiter = conn.start(b"POST / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert not waiter.done()
        conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        head = await waiter
        assert head.status == 201 and await conn.read_all() == b"ok"
        assert conn.recycle()
    run(main())


def test_101_is_invalid() -> None:
    async def main() -> None:
        conn, _ = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        with pytest.raises(InvalidResponse):
            await waiter
    run(main())


@pytest.mark.parametrize("status, head_only", [(204, False), (304, False), (200, True)])
def test_bodyless_responses(status: int, head_only: bool) -> None:
    async def main() -> None:
        conn, _ = connection()
        waiter = conn.start(b"X / HTTP/1.1\r\n\r\n", head_only, True)
        conn.data_received(f"HTTP/1.1 {status} X\r\nContent-Length: 20\r\n\r\n".encode())
        await waiter
        assert await conn.read() == b""
        assert conn.recycle()
    run(main())


def test_bytes_after_the_response_forbid_reuse() -> None:
    async def main() -> None:
        conn, _ = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
        await waiter
        assert await conn.read_all() == b"ok"
        assert not conn.recycle()
    run(main())


def test_connection_close_and_http10_forbid_reuse() -> None:
    async def main() -> None:
        for head in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                     b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
            conn, _ = connection()
            waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
            conn.data_received(head)
            await waiter
            assert await conn.read_all() == b""
            assert not conn.recycle()
    run(main())


def test_unsent_request_body_forbids_reuse() -> None:
    async def main() -> None:
        conn, _ = connection()
        waiter = conn.start(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\n", False, False)
        conn.data_received(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        assert (await waiter).status == 413
        assert not conn.recycle()
    run(main())


def test_chunked_response_with_trailers() -> None:
    async def main() -> None:
        conn, _ = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + BODY[:20])
        head = await waiter
        assert head.chunked and head.content_length is None
        conn.data_received(BODY[20:])
        assert await conn.read_all() == b"hello world0123456789"
        assert conn.recycle()
    run(main())


def test_read_until_close() -> None:
    async def main() -> None:
        conn, transport = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nsome")
        await waiter
        conn.data_received(b" body")
        transport.close()
        assert await conn.read_all() == b"some body"
        assert not conn.recycle()
    run(main())


@pytest.mark.parametrize("head, rest", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only this much"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"),
])
def test_truncated_body_raises_after_the_data(head: bytes, rest: bytes) -> None:
    async def main() -> None:
        conn, transport = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(head + rest)
        await waiter
        assert await conn.read() in (rest, b"hello")
        transport.close()
        with pytest.raises(UpstreamBroken):
            await conn.read()
        assert not conn.recycle()
    run(main())


def test_bad_chunk_breaks_the_body() -> None:
    async def main() -> None:
        conn, transport = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok")
        await waiter
        with pytest.raises(UpstreamBroken):
            await conn.read_all()
        assert transport.aborted
    run(main())


def test_invalid_head_fails_the_waiter() -> None:
    async def main() -> None:
        conn, transport = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nX-Bad : 1\r\n\r\n")
        with pytest.raises(InvalidResponse):
            await waiter
        assert transport.aborted and not conn.recycle()
    run(main())


def test_head_too_large() -> None:
    async def main() -> None:
        conn, _ = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            conn.data_received(b"X-Filler: " + b"a" * 1000 + b"\r\n")
            if waiter.done():
                break
        with pytest.raises(InvalidResponse):
            await waiter
    run(main())


@pytest.mark.parametrize("sent, early", [(b"", True), (b"HTTP/1.1 200 OK\r\n", False)])
def test_close_before_the_head(sent: bytes, early: bool) -> None:
    async def main() -> None:
        conn, transport = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        if sent:
            conn.data_received(sent)
        transport.close()
        with pytest.raises(Closed) as info:
            await waiter
        assert info.value.early is early
        assert isinstance(info.value, OSError)
    run(main())


def test_start_on_a_closed_connection_fails_early() -> None:
    async def main() -> None:
        conn, transport = connection()
        transport.close()
        await asyncio.sleep(0)
        with pytest.raises(Closed) as info:
            await conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        assert info.value.early
    run(main())


def test_reading_pauses_above_the_high_mark_and_resumes() -> None:
    async def main() -> None:
        conn, transport = connection()
        total = 4 * READ_HIGH
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        await waiter
        piece = b"x" * 65536
        fed = 0
        while not transport.paused:
            conn.data_received(piece)
            fed += len(piece)
        assert READ_HIGH < fed <= READ_HIGH + len(piece)
        assert len(await conn.read()) == fed
        assert not transport.paused
        while fed < total:
            conn.data_received(piece)
            fed += len(piece)
        got = await conn.read_all()
        assert len(got) == total - READ_HIGH - len(piece)
        assert conn.recycle()
    run(main())


def test_idle_connection_receiving_bytes_is_dropped() -> None:
    async def main() -> None:
        conn, transport = connection()
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await waiter
        assert conn.recycle()
        conn.data_received(b"HTTP/1.1 200 OK\r\n")
        assert transport.aborted
    run(main())


def test_pool_reuses_and_expires() -> None:
    async def main() -> None:
        pool = ConnectionPool()
        conn, transport = connection()
        pool._busy.add(conn)
        assert pool.pooled(1234) is None
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await waiter
        pool.release(conn)
        assert pool.pooled(1234) is conn
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await waiter
        pool.release(conn)
        conn.idle_since -= 60
        assert pool.pooled(1234) is None
        assert transport.closing
        pool.close_all()
    run(main())


def test_pool_drops_unfinished_exchanges() -> None:
    async def main() -> None:
        pool = ConnectionPool()
        conn, transport = connection()
        pool._busy.add(conn)
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", False, True)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await waiter
        pool.release(conn)  # the body was not read to its end
        assert transport.aborted and pool.pooled(1234) is None
    run(main())
