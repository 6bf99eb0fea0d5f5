"""The upstream side of the edge (proxy/edge/upstream.py) in memory: an
``UpstreamConnection`` fed the app's bytes through a fake transport, reporting to a
recording sink; and the ``UpstreamPool``'s reuse rules, idle timeout and ``forget``.

No socket is opened: ``FakeTransport`` records what is written and, like a real
transport, reports ``connection_lost`` on the next loop iteration after ``close`` or
``abort``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from bastion.proxy.edge import upstream as upstream_module
from bastion.proxy.edge.upstream import (
    IDLE_TIMEOUT,
    MAX_HEAD,
    Closed,
    InvalidResponse,
    ResponseHead,
    UpstreamBroken,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
)

GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


async def tick(n: int = 2) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class FakeTransport(asyncio.Transport):
    """Records writes; close/abort report ``connection_lost`` on the next iteration."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = b""
        self.writes: list[bytes] = []
        self.paused = False
        self.closing = False
        self.closed_by: str | None = None  # "close" or "abort"
        self.eof_written = False

    def write(self, data: Any) -> None:
        assert not self.closing, "write after close"
        self.writes.append(bytes(data))
        self.written += bytes(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self._lose("close", None)

    def abort(self) -> None:
        self._lose("abort", None)

    def lose(self, exc: Exception | None = None) -> None:
        """The peer went away (or the socket failed with ``exc``)."""
        self._lose("peer", exc)

    def _lose(self, how: str, exc: Exception | None) -> None:
        if not self.closing:
            self.closing = True
            self.closed_by = how
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, exc)


class Sink:
    """Records what an upstream connection reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.heads: list[ResponseHead] = []
        self.errors: list[UpstreamError] = []
        self.body = b""

    def upstream_head(self, head: ResponseHead) -> None:
        self.heads.append(head)
        self.events.append(("head", head.status))

    def upstream_body(self, data: bytes) -> None:
        self.body += data
        self.events.append(("body", data))

    def upstream_end(self) -> None:
        self.events.append(("end",))

    def upstream_failed(self, exc: UpstreamError) -> None:
        self.errors.append(exc)
        self.events.append(("failed", type(exc).__name__))

    def upstream_switched(self, head: ResponseHead, rest: bytes) -> None:
        self.heads.append(head)
        self.events.append(("switched", head.status, rest))

    def upstream_writable(self, writable: bool) -> None:
        self.events.append(("writable", writable))

    @property
    def kinds(self) -> list[str]:
        return [e[0] for e in self.events if e[0] != "body"]

    @property
    def ended(self) -> bool:
        return self.kinds[-1:] == ["end"]


def connection(key: int | str = 8001) -> tuple[UpstreamConnection, FakeTransport]:
    conn = UpstreamConnection(key)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport


def exchange(response: bytes | list[bytes], *, head_only: bool = False, tunnel: bool = False,
             payload: bytes = GET, whole: bool = True
             ) -> tuple[UpstreamConnection, FakeTransport, Sink]:
    """A connection that sent ``payload`` and received ``response`` (in pieces)."""
    conn, transport = connection()
    sink = Sink()
    assert conn.send(sink, payload, head_only=head_only, whole=whole, tunnel=tunnel)
    for piece in [response] if isinstance(response, bytes) else response:
        conn.data_received(piece)
    return conn, transport, sink


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def only_error(sink: Sink) -> UpstreamError:
    assert len(sink.errors) == 1, sink.events
    assert sink.kinds[-1] == "failed", sink.events
    return sink.errors[0]


# -- sending ------------------------------------------------------------------------------
@in_loop
async def test_send_writes_the_payload_in_one_write() -> None:
    conn, transport = connection()
    payload = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    assert conn.send(Sink(), payload, head_only=False, whole=True)
    assert transport.writes == [payload]
    assert conn.uses == 1 and conn.request_sent


@in_loop
async def test_streamed_request_body() -> None:
    conn, transport = connection()
    assert conn.send(Sink(), b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                     head_only=False, whole=False)
    assert not conn.request_sent
    conn.write_chunk(b"hello")
    conn.write_chunk(b"!" * 17)
    conn.request_done(chunked=True)
    assert conn.request_sent
    assert transport.written.endswith(b"5\r\nhello\r\n11\r\n" + b"!" * 17 + b"\r\n0\r\n\r\n")
    conn.write(b"raw")
    assert transport.writes[-1] == b"raw"


@in_loop
async def test_request_done_without_chunks_writes_nothing() -> None:
    conn, transport = connection()
    conn.send(Sink(), b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n", head_only=False,
              whole=False)
    conn.write(b"ok")
    before = transport.written
    conn.request_done(chunked=False)
    assert transport.written == before and conn.request_sent


@in_loop
async def test_send_on_a_closed_connection_sends_nothing() -> None:
    conn, transport = connection()
    transport.close()
    assert not conn.send(Sink(), GET, head_only=False, whole=True)
    await tick()
    assert not conn.send(Sink(), GET, head_only=False, whole=True)
    assert transport.written == b"" and conn.uses == 0


@in_loop
async def test_send_without_a_transport() -> None:
    conn = UpstreamConnection(1)
    assert not conn.send(Sink(), GET, head_only=False, whole=True)


# -- framing --------------------------------------------------------------------------------
@in_loop
async def test_content_length_framing() -> None:
    conn, _, sink = exchange([b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 10\r\nX-A: 1\r\n\r\nhel",
                              b"lo", b"world"])
    assert sink.kinds == ["head", "end"]
    head = sink.heads[0]
    assert (head.status, head.reason, head.content_length, head.chunked, head.minor) == \
        (200, b"OK", 10, False, 1)
    assert head.headers == [(b"Content-Length", b"10"), (b"X-A", b"1")]
    assert sink.body == b"helloworld"
    assert conn.complete and conn.reusable and conn.recycle()


@in_loop
async def test_content_length_byte_by_byte() -> None:
    response = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello"
    conn, _, sink = exchange(byte_by_byte(response))
    assert sink.kinds == ["head", "end"] and sink.body == b"hello"
    assert sink.heads[0].status == 201 and conn.recycle()


@in_loop
async def test_content_length_zero_ends_with_the_head() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert sink.kinds == ["head", "end"] and sink.body == b""
    assert conn.recycle()


@in_loop
async def test_header_values_lose_trailing_whitespace() -> None:
    _, _, sink = exchange(b"HTTP/1.1 200 OK\r\nX-A:  spaced value \t\r\nContent-Length: 0\r\n\r\n")
    assert (b"X-A", b"spaced value") in sink.heads[0].headers


@in_loop
async def test_no_reason_phrase() -> None:
    _, _, sink = exchange(b"HTTP/1.1 204\r\n\r\n")
    assert sink.heads[0].status == 204 and sink.heads[0].reason == b""


@pytest.mark.parametrize("step", [1, 3, 1000])
@in_loop
async def test_chunked_framing(step: int) -> None:
    response = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
                b"5\r\nhello\r\n6;name=value\r\n world\r\nA\r\n0123456789\r\n"
                b"0\r\nX-Trailer: t\r\n\r\n")
    pieces = [response[i:i + step] for i in range(0, len(response), step)]
    conn, _, sink = exchange(pieces)
    assert sink.kinds == ["head", "end"]
    head = sink.heads[0]
    assert head.chunked and head.content_length is None
    assert sink.body == b"hello world0123456789"
    assert conn.recycle()


@in_loop
async def test_chunked_body_events_come_before_the_end() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
    assert sink.kinds == ["head"] and sink.body == b"ok" and not conn.complete
    conn.data_received(b"0\r\n\r\n")
    assert sink.ended and conn.complete


@in_loop
async def test_close_delimited_body() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
    conn.data_received(b" body")
    head = sink.heads[0]
    assert head.content_length is None and not head.chunked
    assert sink.kinds == ["head"] and not conn.reusable
    transport.lose()
    await tick()
    assert sink.kinds == ["head", "end"] and sink.body == b"some body"
    assert conn.complete and conn.closed and not conn.recycle()


@in_loop
async def test_close_delimited_body_cut_by_an_error_is_broken() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
    transport.lose(ConnectionResetError("reset"))
    await tick()
    error = only_error(sink)
    assert isinstance(error, UpstreamBroken) and "reset" in str(error)
    assert not conn.complete


@in_loop
async def test_http10_response() -> None:
    conn, _, sink = exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert sink.heads[0].minor == 0 and sink.ended and sink.body == b"ok"
    assert not conn.reusable and not conn.recycle()  # HTTP/1.0 without keep-alive


@in_loop
async def test_http10_keep_alive_response_is_reusable() -> None:
    conn, _, sink = exchange(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                             b"Content-Length: 2\r\n\r\nok")
    assert sink.ended and conn.recycle()


@in_loop
async def test_connection_close_forbids_reuse() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert sink.ended and not conn.reusable and not conn.recycle()


# -- interim responses and tunnels -------------------------------------------------------------
@in_loop
async def test_interim_responses_are_skipped() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert sink.events == []
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                       b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert sink.kinds == ["head", "end"] and sink.heads[0].status == 201
    assert sink.heads[0].headers == [(b"Content-Length", b"2")]  # not the 103's Link
    assert sink.body == b"ok" and conn.recycle()


@in_loop
async def test_interim_then_bodyless_answer() -> None:
    conn, _, sink = exchange([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert sink.kinds == ["head", "end"] and sink.heads[0].status == 204 and conn.recycle()


@in_loop
async def test_101_without_a_tunnel_is_invalid() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\n\r\nxyz")
    assert isinstance(only_error(sink), InvalidResponse)
    assert sink.heads == [] and transport.closed_by == "abort" and not conn.recycle()


@in_loop
async def test_101_for_a_tunnel_switches() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\n\r\nfirst", tunnel=True)
    assert sink.events == [("switched", 101, b"first")]
    assert (b"Upgrade", b"websocket") in sink.heads[0].headers
    assert sink.heads[0].reason == b"Switching Protocols"
    # From now on a byte pipe: bytes go to the sink as they are, never parsed.
    conn.data_received(b"HTTP/1.1 999 not parsed\r\n\r\n")
    assert sink.events[-1] == ("body", b"HTTP/1.1 999 not parsed\r\n\r\n")
    conn.write_eof()
    assert transport.eof_written
    transport.lose()
    await tick()
    assert sink.ended and not conn.recycle()


@in_loop
async def test_tunnel_asked_but_plain_answer() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno", tunnel=True)
    assert sink.kinds == ["head", "end"] and sink.heads[0].status == 403
    assert not conn.recycle()  # a connection asked to tunnel is never pooled


# -- invalid responses ------------------------------------------------------------------------
INVALID_HEADS = {
    "status-999": b"HTTP/1.1 999 Nope\r\nContent-Length: 0\r\n\r\n",
    "status-600": b"HTTP/1.1 600 Nope\r\nContent-Length: 0\r\n\r\n",
    "status-099": b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
    "status-letters": b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    "not-http": b"NOT HTTP AT ALL\r\n\r\n",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    "te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "te-chunked-twice": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "te-identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nok",
    "te-http10": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "cl-te": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"2\r\nok\r\n0\r\n\r\n"),
    "te-cl": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
              b"2\r\nok\r\n0\r\n\r\n"),
    "cl-duplicate-same": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "cl-duplicate-different": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
                               b"\r\nok!"),
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "cl-sign": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "cl-overflow": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nok",
    "obs-fold-tab": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\t2\r\nContent-Length: 2\r\n\r\nok",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok",
    "no-colon": b"HTTP/1.1 200 OK\r\nBadHeader\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("response", list(INVALID_HEADS.values()), ids=list(INVALID_HEADS))
@in_loop
async def test_invalid_head(response: bytes) -> None:
    conn, transport, sink = exchange(response)
    error = only_error(sink)
    assert isinstance(error, InvalidResponse), error
    assert sink.heads == [], "an invalid head must not reach the client"
    assert transport.closed_by == "abort" and not conn.reusable and not conn.complete
    await tick()
    assert sink.kinds == ["failed"], "reported once, not again at connection_lost"
    assert not conn.recycle()


@pytest.mark.parametrize("response", [INVALID_HEADS["status-999"], INVALID_HEADS["obs-fold"],
                                      INVALID_HEADS["cl-te"], INVALID_HEADS["te-http10"]])
@in_loop
async def test_invalid_head_byte_by_byte(response: bytes) -> None:
    _, _, sink = exchange(byte_by_byte(response))
    assert isinstance(only_error(sink), InvalidResponse)
    assert sink.heads == []


@in_loop
async def test_status_999_message() -> None:
    _, _, sink = exchange(INVALID_HEADS["status-999"])
    assert "999" in str(only_error(sink))


@in_loop
async def test_head_too_large() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 200 OK\r\n")
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    for _ in range(MAX_HEAD // len(filler) + 2):
        if transport.closing:
            break
        conn.data_received(filler)
    assert isinstance(only_error(sink), InvalidResponse)
    assert sink.heads == [] and transport.closed_by == "abort"


@pytest.mark.parametrize("body", [b"zz\r\nok\r\n", b"2\r\nokX\r\n", b"-2\r\nok\r\n",
                                  b"2\nok\r\n"])
@in_loop
async def test_broken_chunked_body(body: bytes) -> None:
    conn, transport, sink = exchange(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert sink.kinds == ["head", "failed"]
    assert isinstance(sink.errors[0], UpstreamBroken)
    assert transport.closed_by == "abort" and not conn.complete
    await tick()
    assert sink.kinds == ["head", "failed"] and not conn.recycle()


# -- bodyless answers ------------------------------------------------------------------------
@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",
])
@in_loop
async def test_head_answer_ends_with_its_head(head: bytes) -> None:
    conn, transport, sink = exchange(head, head_only=True,
                                     payload=b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert sink.kinds == ["head", "end"] and sink.body == b""
    assert conn.complete and not transport.closing


@in_loop
async def test_head_answer_keeps_its_content_length() -> None:
    _, _, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head_only=True)
    assert sink.heads[0].content_length == 5


@in_loop
async def test_head_answer_followed_by_bytes_is_not_reused() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", head_only=True)
    assert sink.kinds == ["head", "end"] and sink.body == b""
    assert not conn.reusable and not conn.recycle()


@in_loop
async def test_head_answer_is_reusable() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head_only=True)
    assert sink.ended
    assert conn.reusable and conn.recycle()
    # And the next exchange on it parses a fresh response.
    sink2 = Sink()
    assert conn.send(sink2, GET, head_only=False, whole=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert sink2.ended and sink2.body == b"hello"


@pytest.mark.parametrize("status", [204, 304])
@in_loop
async def test_204_304_end_with_their_head(status: int) -> None:
    conn, _, sink = exchange(b"HTTP/1.1 %d X\r\nContent-Length: 20\r\n\r\n" % status)
    assert sink.kinds == ["head", "end"] and sink.body == b""
    assert conn.recycle()


@in_loop
async def test_bodyless_answer_followed_by_bytes_is_not_reused() -> None:
    conn, _, sink = exchange(b"HTTP/1.1 204 No Content\r\n\r\nXYZ")
    assert sink.kinds == ["head", "end"]
    assert not conn.reusable and not conn.recycle()


# -- bytes after the response -----------------------------------------------------------------
@pytest.mark.parametrize("extra", [b"EXTRA", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
@in_loop
async def test_bytes_after_a_complete_response_forbid_reuse(extra: bytes) -> None:
    conn, _, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
    assert sink.kinds == ["head", "end"] and sink.body == b"ok"
    assert not conn.reusable and not conn.recycle()


@in_loop
async def test_bytes_in_a_later_read_forbid_reuse() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert conn.reusable
    conn.data_received(b"late")
    assert sink.kinds == ["head", "end"]
    assert not conn.reusable and not conn.recycle()
    assert not transport.closing  # the pool closes it on release


@in_loop
async def test_bytes_while_idle_abort_the_connection() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert conn.recycle()
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.closed_by == "abort" and not conn.reusable
    assert sink.kinds == ["head", "end"]  # the old sink hears nothing more
    await tick()
    assert conn.closed


@in_loop
async def test_second_exchange_on_a_recycled_connection() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"2\r\nok\r\n0\r\n\r\n")
    assert conn.recycle()
    sink2 = Sink()
    assert conn.send(sink2, b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n", head_only=False, whole=True)
    conn.data_received(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")
    assert sink2.kinds == ["head", "end"] and sink2.heads[0].status == 404
    assert sink2.body == b"nope" and conn.uses == 2 and conn.recycle()
    assert sink.kinds == ["head", "end"]
    assert transport.written.count(b"GET ") == 2


# -- the app goes away ------------------------------------------------------------------------
@in_loop
async def test_early_close_before_any_byte() -> None:
    conn, transport, sink = exchange([])
    transport.lose()
    await tick()
    error = only_error(sink)
    assert isinstance(error, Closed) and error.early
    assert conn.closed and not conn.recycle()


@pytest.mark.parametrize("partial", [b"H", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"])
@in_loop
async def test_close_in_the_middle_of_the_head(partial: bytes) -> None:
    _, transport, sink = exchange(partial)
    transport.lose()
    await tick()
    error = only_error(sink)
    assert isinstance(error, Closed) and not error.early
    assert sink.heads == []


@pytest.mark.parametrize(("head", "rest"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only this much"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"),
])
@in_loop
async def test_close_in_the_middle_of_the_body(head: bytes, rest: bytes) -> None:
    conn, transport, sink = exchange(head + rest)
    assert sink.kinds == ["head"]
    transport.lose()
    await tick()
    assert sink.kinds == ["head", "failed"]
    assert isinstance(sink.errors[0], UpstreamBroken)
    assert sink.body in (rest, b"hello")
    assert not conn.complete and not conn.recycle()


@in_loop
async def test_close_after_the_response_reports_nothing() -> None:
    conn, transport, sink = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    transport.lose()
    await tick()
    assert sink.kinds == ["head", "end"]
    assert conn.closed and not conn.reusable and not conn.recycle()


# -- backpressure -----------------------------------------------------------------------------
@in_loop
async def test_writable_and_read_pausing() -> None:
    conn, transport = connection()
    sink = Sink()
    conn.send(sink, GET, head_only=False, whole=False)
    conn.pause_writing()
    conn.resume_writing()
    assert sink.events == [("writable", False), ("writable", True)]
    conn.pause_reading()
    assert transport.paused
    conn.resume_reading()
    assert not transport.paused


@in_loop
async def test_abort_and_close() -> None:
    conn, transport = connection()
    conn.abort()
    assert transport.closed_by == "abort" and conn.closed and not conn.reusable
    conn2, transport2 = connection()
    conn2.close()
    assert transport2.closed_by == "close" and conn2.closed


# -- the pool ---------------------------------------------------------------------------------
def done_exchange(key: int | str = 8001, response: bytes =
                  b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", *, whole: bool = True
                  ) -> tuple[UpstreamConnection, FakeTransport]:
    conn, transport = connection(key)
    conn.send(Sink(), GET, head_only=False, whole=whole)
    conn.data_received(response)
    return conn, transport


@in_loop
async def test_pool_keeps_a_complete_reusable_connection() -> None:
    pool = UpstreamPool()
    assert pool.pooled(8001) is None
    conn, transport = done_exchange()
    pool.release(conn)
    assert not transport.closing
    assert pool.pooled(8002) is None  # another endpoint
    assert pool.pooled(8001) is conn
    assert pool.pooled(8001) is None  # taken
    await pool.close()


@in_loop
async def test_pool_takes_the_most_recent_first() -> None:
    pool = UpstreamPool()
    first, _ = done_exchange()
    second, _ = done_exchange()
    pool.release(first)
    pool.release(second)
    assert pool.pooled(8001) is second
    assert pool.pooled(8001) is first
    await pool.close()


@in_loop
async def test_pool_keys_by_unix_socket_path() -> None:
    pool = UpstreamPool()
    conn, _ = done_exchange("/run/app.sock")
    pool.release(conn)
    assert pool.pooled(8001) is None
    assert pool.pooled("/run/app.sock") is conn
    await pool.close()


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
])
@in_loop
async def test_pool_closes_a_complete_but_unreusable_connection(response: bytes) -> None:
    pool = UpstreamPool()
    conn, transport = done_exchange(response=response)
    assert conn.complete
    pool.release(conn)
    assert transport.closed_by == "close"
    assert pool.pooled(8001) is None
    await pool.close()


@in_loop
async def test_pool_closes_when_the_request_was_not_sent_whole() -> None:
    pool = UpstreamPool()
    conn, transport = done_exchange(whole=False)  # e.g. a 413 before the body went out
    assert conn.complete and conn.reusable and not conn.request_sent
    pool.release(conn)
    assert transport.closed_by == "close" and pool.pooled(8001) is None
    await pool.close()


@in_loop
async def test_pool_keeps_a_streamed_request_once_done() -> None:
    pool = UpstreamPool()
    conn, transport = done_exchange(whole=False)
    conn.request_done(chunked=False)
    pool.release(conn)
    assert not transport.closing and pool.pooled(8001) is conn
    await pool.close()


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"",
])
@in_loop
async def test_pool_aborts_an_incomplete_exchange(response: bytes) -> None:
    pool = UpstreamPool()
    conn, transport = done_exchange(response=response)
    assert not conn.complete
    pool.release(conn)
    assert transport.closed_by == "abort" and pool.pooled(8001) is None
    await pool.close()


@in_loop
async def test_pool_skips_connections_closed_while_idle() -> None:
    pool = UpstreamPool()
    good, _ = done_exchange()
    dead, dead_transport = done_exchange()
    pool.release(good)
    pool.release(dead)
    dead_transport.lose()  # the app closed it meanwhile
    assert pool.pooled(8001) is good
    await tick()
    assert dead.closed
    await pool.close()


@in_loop
async def test_pool_idle_timeout_on_take() -> None:
    pool = UpstreamPool()
    old, old_transport = done_exchange()
    pool.release(old)
    old.idle_since -= IDLE_TIMEOUT + 1
    assert pool.pooled(8001) is None
    assert old_transport.closed_by == "close"
    await pool.close()


@in_loop
async def test_pool_idle_timeout_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "IDLE_TIMEOUT", 0.05)
    pool = UpstreamPool()
    conn, transport = done_exchange()
    pool.release(conn)
    await asyncio.sleep(0.01)
    assert not transport.closing
    await asyncio.sleep(0.2)
    assert transport.closed_by == "close"
    assert pool.pooled(8001) is None
    await pool.close()


@in_loop
async def test_pool_forget_closes_idle_and_aborts_busy() -> None:
    pool = UpstreamPool()
    idle, idle_transport = done_exchange()
    busy, busy_transport = done_exchange()
    other, other_transport = done_exchange(8002)
    for conn in (idle, busy, other):
        pool.release(conn)
    assert pool.pooled(8001) is busy  # taken: in use now
    pool.forget(8001)
    assert idle_transport.closed_by == "close"
    assert busy_transport.closed_by == "abort"
    assert not other_transport.closing
    assert pool.pooled(8001) is None and pool.pooled(8002) is other
    # A connection forgotten while busy is not pooled again when its flow releases it.
    pool.release(busy)
    assert pool.pooled(8001) is None
    await pool.close()


@in_loop
async def test_pool_close_idle_and_close() -> None:
    pool = UpstreamPool()
    a, a_transport = done_exchange()
    b, b_transport = done_exchange(8002)
    pool.release(a)
    pool.release(b)
    taken = pool.pooled(8002)
    assert taken is b
    pool.close_idle()
    assert a_transport.closed_by == "close" and not b_transport.closing
    await pool.close()
    assert b_transport.closed_by == "abort"
    assert pool.pooled(8001) is None
