"""The native HTTP/2 engine's extension (``proxy/edge/_ng2.c``) driven directly: raw
frames in (built with ``hyperframe`` and ``hpack``), frames and events out, no sockets."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(":method", "GET"), (":scheme", "https"), (":path", "/x"),
           (":authority", "example.org")]


@pytest.fixture(scope="module")
def ng2() -> ModuleType:
    try:
        return importlib.import_module("bastion.proxy.edge._ng2")
    except ImportError:
        pytest.skip("the native HTTP/2 engine is not built here")


class Peer:
    """A client's side: frames to the session, frames and events back."""

    def __init__(self, ng2: ModuleType, **settings: int) -> None:
        self.ng2 = ng2
        self.session = ng2.Session(**{"max_streams": 100, "max_header_list": 16384,
                                      "initial_window": 65535,
                                      "connection_window": 4 * 1024 * 1024, **settings})
        self.encoder = hpack.Encoder()
        self.events: list[tuple[Any, ...]] = []

    def start(self, settings: dict[int, int] | None = None) -> list[Frame]:
        self.feed_raw(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())
        return self.out()

    def feed_raw(self, data: bytes) -> None:
        events = self.session.receive(data)
        if events:
            self.events += events

    def feed(self, *frames: Frame) -> None:
        self.feed_raw(b"".join(f.serialize() for f in frames))

    def out(self) -> list[Frame]:
        data = self.session.send(1 << 20)
        events = self.session.events()
        if events:
            self.events += events
        frames = []
        while data:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9:9 + length]))
            frames.append(frame)
            data = data[9 + length:]
        return frames

    def headers(self, sid: int, fields: list[tuple[str, str]], end_stream: bool = True,
                end_headers: bool = True) -> HeadersFrame:
        frame = HeadersFrame(sid)
        frame.data = self.encoder.encode(fields)
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    def take(self, kind: int) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]


def test_server_settings_and_connection_window(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    frames = peer.out()
    settings = next(f for f in frames if isinstance(f, SettingsFrame))
    assert settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 100
    assert settings.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 16384
    assert settings.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 65535
    assert settings.settings[SettingsFrame.ENABLE_PUSH] == 0
    window = next(f for f in frames if isinstance(f, WindowUpdateFrame))
    assert window.stream_id == 0 and window.window_increment == 4 * 1024 * 1024 - 65535
    # The client's SETTINGS is acknowledged and counted as a control frame.
    frames = peer.start()
    assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in frames)
    assert peer.take(ng2.EV_CONTROL) == [(ng2.EV_CONTROL, 0)]


def test_request_head_and_response_without_body(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, [*REQUEST, ("cookie", "a=1"), ("x-tab", "a\tb")]))
    [request] = peer.take(ng2.EV_REQUEST)
    assert request == (ng2.EV_REQUEST, 1, [(b":method", b"GET"), (b":scheme", b"https"),
                                           (b":path", b"/x"), (b":authority", b"example.org"),
                                           (b"cookie", b"a=1"), (b"x-tab", b"a\tb")], True)
    assert peer.session.respond(1, [(b":status", b"204"), (b"server", b"bastion")], False)
    frames = peer.out()
    [head] = [f for f in frames if isinstance(f, HeadersFrame)]
    assert head.stream_id == 1 and "END_STREAM" in head.flags
    assert hpack.Decoder().decode(head.data) == [(":status", "204"), ("server", "bastion")]
    assert peer.take(ng2.EV_CLOSED) == [(ng2.EV_CLOSED, 1, 0)]
    # A closed stream cannot be answered again.
    assert not peer.session.respond(1, [(b":status", b"200")], False)


def test_request_body_is_acknowledged_only_when_consumed(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    end = DataFrame(1, b"y" * 13616)
    end.flags.add("END_STREAM")
    peer.feed(peer.headers(1, [*REQUEST, ("content-length", "70000")], end_stream=False),
              DataFrame(1, b"x" * 16384), DataFrame(1, b"x" * 16384))
    assert peer.take(ng2.EV_REQUEST)[0][3] is False
    assert [len(e[2]) for e in peer.take(ng2.EV_DATA)] == [16384, 16384]
    assert not [f for f in peer.out() if isinstance(f, WindowUpdateFrame)]
    peer.session.consume(1, 32768)
    updates = {f.stream_id: f.window_increment for f in peer.out()
               if isinstance(f, WindowUpdateFrame)}
    assert updates[1] == 32768  # the stream's window opens again (half of it was used)
    peer.feed(DataFrame(1, b"x" * 16384), DataFrame(1, b"x" * 7232), end)
    assert peer.take(ng2.EV_END) == [(ng2.EV_END, 1)]


def test_response_body_waits_for_the_window(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start({SettingsFrame.INITIAL_WINDOW_SIZE: 10})
    peer.feed(peer.headers(1, REQUEST))
    assert peer.session.respond(1, [(b":status", b"200")], True)
    assert peer.session.write(1, [b"0123456", b"789abcdefghij"], False) == 20
    frames = peer.out()
    data = [f for f in frames if isinstance(f, DataFrame)]
    assert b"".join(f.data for f in data) == b"0123456789"
    assert peer.session.pending(1) == 10
    assert peer.session.write(1, [], True) == 10
    peer.feed(WindowUpdateFrame(1, window_increment=100))
    data = [f for f in peer.out() if isinstance(f, DataFrame)]
    assert b"".join(f.data for f in data) == b"abcdefghij"
    assert "END_STREAM" in data[-1].flags
    assert peer.session.pending(1) == -1  # closed: gone
    assert peer.session.write(1, [b"late"], True) == -1


def test_deferred_stream_resumes_on_write(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, REQUEST))
    peer.session.respond(1, [(b":status", b"200")], True)
    assert [type(f) for f in peer.out()] == [HeadersFrame]  # no body yet: deferred
    peer.session.write(1, [b"late body"], True)
    [data] = peer.out()
    assert isinstance(data, DataFrame) and data.data == b"late body"
    assert "END_STREAM" in data.flags


def test_several_streams_go_out_in_one_send(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(*[peer.headers(sid, REQUEST) for sid in (1, 3, 5)])
    for sid in (1, 3, 5):
        peer.session.respond(sid, [(b":status", b"200")], True)
        peer.session.write(sid, [b"body %d" % sid], True)
    frames = peer.out()
    assert sorted(f.stream_id for f in frames if isinstance(f, DataFrame)) == [1, 3, 5]
    assert sorted(e[1] for e in peer.take(ng2.EV_CLOSED)) == [1, 3, 5]


def test_early_answer_resets_with_no_error_after_end_stream(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, [(":method", "POST"), *REQUEST[1:]], end_stream=False))
    peer.session.respond(1, [(b":status", b"413")], True)
    peer.session.write(1, [b"too large"], True)
    frames = peer.out()
    kinds = [type(f).__name__ for f in frames]
    assert kinds == ["HeadersFrame", "DataFrame", "RstStreamFrame"]
    assert frames[-1].error_code == 0
    assert peer.take(ng2.EV_RESET_SENT) == []  # NO_ERROR is no reset that counts


def test_client_reset_and_sent_reset(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, REQUEST, end_stream=False), RstStreamFrame(1, error_code=8))
    assert peer.take(ng2.EV_RESET) == [(ng2.EV_RESET, 1, 8)]
    assert peer.take(ng2.EV_CLOSED) == [(ng2.EV_CLOSED, 1, 8)]
    peer.feed(peer.headers(3, REQUEST, end_stream=False))
    peer.session.reset(3, 1)
    [rst] = [f for f in peer.out() if isinstance(f, RstStreamFrame)]
    assert (rst.stream_id, rst.error_code) == (3, 1)
    assert peer.take(ng2.EV_RESET_SENT) == [(ng2.EV_RESET_SENT, 3, 1)]


def test_control_frames_and_empty_data_are_reported(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.events.clear()
    peer.feed(PingFrame(0, opaque_data=b"12345678"), PriorityFrame(7, depends_on=0),
              peer.headers(1, REQUEST, end_stream=False), DataFrame(1, b""))
    frames = peer.out()
    assert any(isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == b"12345678"
               for f in frames)
    assert len(peer.take(ng2.EV_CONTROL)) == 2
    assert peer.take(ng2.EV_EMPTY_DATA) == [(ng2.EV_EMPTY_DATA, 1)]
    # An unknown frame type (0xfa) is ignored by nghttp2 but still counted.
    peer.events.clear()
    peer.feed_raw(b"\x00\x00\x01\xfa\x00\x00\x00\x00\x00z")
    assert peer.take(ng2.EV_CONTROL) == [(ng2.EV_CONTROL, 0)]


def test_header_list_too_large_resets_the_stream(ng2: ModuleType) -> None:
    peer = Peer(ng2, max_header_list=2000)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, [*REQUEST, *[(f"x-h{i}", "v" * 100) for i in range(30)]]))
    assert peer.take(ng2.EV_REQUEST) == []
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == 1 for f in peer.out())
    # The connection goes on (HPACK state kept).
    peer.feed(peer.headers(3, REQUEST))
    assert [e[1] for e in peer.take(ng2.EV_REQUEST)] == [3]


def test_control_character_in_a_value_resets_the_stream(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, [*REQUEST, ("x-a", "a\x01b")]))
    # nghttp2 refuses it, or Bastion does (h2translate) when it comes through.
    requests = peer.take(ng2.EV_REQUEST)
    if requests:
        assert (b"x-a", b"a\x01b") in requests[0][2]
    else:
        [rst] = [f for f in peer.out() if isinstance(f, RstStreamFrame)]
        assert (rst.stream_id, rst.error_code) == (1, 1)


def test_stream_id_going_back_is_a_connection_error(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    with pytest.raises(ng2.Error):
        peer.feed(peer.headers(5, REQUEST), peer.headers(3, REQUEST))
    [goaway] = [f for f in peer.out() if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == 1  # PROTOCOL_ERROR


def test_trailers_of_an_open_stream_are_fine(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, [(":method", "POST"), *REQUEST[1:]], end_stream=False),
              peer.headers(3, REQUEST), DataFrame(1, b"abc"),
              peer.headers(1, [("x-trailer", "1")]))
    assert [e[1] for e in peer.take(ng2.EV_REQUEST)] == [1, 3]
    assert peer.take(ng2.EV_END) == [(ng2.EV_END, 1)]


def test_continuation_flood_ends_the_connection(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    frames: list[Frame] = [peer.headers(1, REQUEST, end_headers=False)]
    for _ in range(100):
        frame = ContinuationFrame(1)
        frame.data = b"\x40\x01a\x01b"
        frames.append(frame)
    with pytest.raises(ng2.Error):
        peer.feed(*frames)


def test_goaway_graceful_and_terminating(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(peer.headers(1, REQUEST), peer.headers(3, REQUEST))
    peer.session.goaway(0, False)
    [goaway] = [f for f in peer.out() if isinstance(f, GoAwayFrame)]
    assert (goaway.last_stream_id, goaway.error_code) == (3, 0)
    assert peer.session.want_read()  # open streams may finish
    peer.session.respond(1, [(b":status", b"200")], False)
    assert any(isinstance(f, HeadersFrame) for f in peer.out())
    peer.session.goaway(11, True)
    [calm] = [f for f in peer.out() if isinstance(f, GoAwayFrame)]
    assert calm.error_code == 11
    assert not peer.session.want_read() and not peer.session.want_write()


def test_client_goaway_is_reported(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    peer.out()
    peer.start()
    peer.feed(GoAwayFrame(0, last_stream_id=0, error_code=0))
    assert peer.take(ng2.EV_GOAWAY) == [(ng2.EV_GOAWAY, 0, 0)]


def test_bad_preface(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    with pytest.raises(ng2.Error) as caught:
        peer.feed_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert caught.value.args[1] == ng2.ERR_BAD_CLIENT_MAGIC


def test_incomplete_frame_or_header_block(ng2: ModuleType) -> None:
    peer = Peer(ng2)
    assert peer.session.incomplete  # the preface is still to come
    peer.start()
    assert not peer.session.incomplete
    frame = peer.headers(1, REQUEST, end_headers=False).serialize()
    peer.feed_raw(frame[:5])
    assert peer.session.incomplete  # in a frame header
    peer.feed_raw(frame[5:])
    assert peer.session.incomplete  # in a header block
    last = ContinuationFrame(1)
    last.data = b""
    last.flags.add("END_HEADERS")
    peer.feed(last)
    assert not peer.session.incomplete
    assert [e[1] for e in peer.take(ng2.EV_REQUEST)] == [1]


def test_ping_ack_queue_is_bounded(ng2: ModuleType) -> None:
    peer = Peer(ng2, max_outbound_ack=50)
    peer.out()
    peer.start()
    with pytest.raises(ng2.Error) as caught:
        peer.feed(*[PingFrame(0, opaque_data=i.to_bytes(8, "big")) for i in range(200)])
    assert caught.value.args[1] == ng2.ERR_FLOODED
