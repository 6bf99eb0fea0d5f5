"""Pure tests of the WebSocket frame codec (proxy/edge/wsframes.py)."""

from __future__ import annotations

import os
import struct

import pytest

from bastion.proxy.edge import wsframes as ws


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0,
                 masked: bool = True) -> bytes:
    """A frame as a client sends it (masked)."""
    first = (0x80 if fin else 0) | rsv | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + ws.unmask(payload, mask)


def test_accept_key_from_the_rfc() -> None:
    assert ws.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200000])
def test_lengths_round_trip_byte_by_byte(size: int) -> None:
    payload = os.urandom(size)
    frame = client_frame(ws.BINARY, payload)
    decoder = ws.Decoder()
    events: list[ws.Event] = []
    step = 1 if size < 300 else 4096
    for i in range(0, len(frame), step):
        events += decoder.feed(frame[i:i + step])
    assert events == [ws.Message(payload)]


def test_server_frames_are_unmasked_with_the_right_length() -> None:
    assert ws.encode(ws.TEXT, b"hi") == b"\x81\x02hi"
    assert ws.encode(ws.BINARY, b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert ws.encode(ws.BINARY, b"x" * 65536)[:2] == b"\x82\x7f"
    assert ws.encode_close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert ws.encode_close(ws.NO_STATUS) == b"\x88\x00"


def test_fragments_with_a_ping_between() -> None:
    text = "héllo wörld ✓"
    raw = text.encode()
    frames = (client_frame(ws.TEXT, raw[:2], fin=False)  # splits inside a character
              + client_frame(ws.PING, b"p")
              + client_frame(ws.CONTINUATION, raw[2:7], fin=False)
              + client_frame(ws.CONTINUATION, raw[7:]))
    assert ws.Decoder().feed(frames) == [ws.Ping(b"p"), ws.Message(text)]


def test_close_with_code_and_reason_stops_reading() -> None:
    decoder = ws.Decoder()
    events = decoder.feed(client_frame(ws.CLOSE, struct.pack("!H", 1001) + b"away")
                          + client_frame(ws.TEXT, b"late"))
    assert events == [ws.Close(1001, "away")]
    assert decoder.closed
    assert ws.Decoder().feed(client_frame(ws.CLOSE)) == [ws.Close(ws.NO_STATUS)]


@pytest.mark.parametrize(("frame", "code"), [
    (client_frame(ws.TEXT, b"x", masked=False), ws.PROTOCOL_ERROR),
    (client_frame(ws.TEXT, b"x", rsv=0x40), ws.PROTOCOL_ERROR),
    (client_frame(0x3, b"x"), ws.PROTOCOL_ERROR),
    (client_frame(ws.PING, b"x" * 126), ws.PROTOCOL_ERROR),
    (client_frame(ws.PING, b"x", fin=False), ws.PROTOCOL_ERROR),
    (client_frame(ws.CONTINUATION, b"x"), ws.PROTOCOL_ERROR),
    (client_frame(ws.TEXT, b"a", fin=False) + client_frame(ws.TEXT, b"b"), ws.PROTOCOL_ERROR),
    (client_frame(ws.TEXT, b"\xff\xfe"), ws.INVALID_DATA),
    (client_frame(ws.CLOSE, b"\x03"), ws.PROTOCOL_ERROR),
    (client_frame(ws.CLOSE, struct.pack("!H", 1005)), ws.PROTOCOL_ERROR),
    (client_frame(ws.CLOSE, struct.pack("!H", 1000) + b"\xff"), ws.INVALID_DATA),
])
def test_violations_name_their_close_code(frame: bytes, code: int) -> None:
    with pytest.raises(ws.FrameError) as caught:
        ws.Decoder().feed(frame)
    assert caught.value.code == code


def test_message_size_limit_counts_fragments() -> None:
    decoder = ws.Decoder(max_size=10)
    decoder.feed(client_frame(ws.BINARY, b"x" * 6, fin=False))
    with pytest.raises(ws.FrameError) as caught:
        decoder.feed(client_frame(ws.CONTINUATION, b"x" * 6))
    assert caught.value.code == ws.TOO_BIG
    assert ws.Decoder(max_size=10).feed(client_frame(ws.BINARY, b"x" * 10)) == [
        ws.Message(b"x" * 10)]


def test_application_close_codes_are_allowed() -> None:
    assert ws.Decoder().feed(client_frame(ws.CLOSE, struct.pack("!H", 4000))) == [
        ws.Close(4000, "")]
