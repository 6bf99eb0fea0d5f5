"""The WebSocket frame codec (RFC 6455), pure: bytes in, messages out, and back.

Theory of operation
-------------------
Used where Bastion itself is the WebSocket server end: an in-process ASGI app's
``websocket`` scope (``proxy.edge.hosting.websocket``). Out of process, frames are never
parsed (``proxy.edge.websocket`` is a byte pipe).

``Decoder.feed(data)`` takes the client's bytes as they arrive and returns the complete
events so far: ``Message`` (a whole text or binary message, its fragments joined),
``Ping``, ``Pong`` and ``Close``. It enforces what a server must: every client frame
masked, no reserved bits (no extension was negotiated), control frames at most 125
bytes and never fragmented, continuation frames only inside a fragmented message, text
valid UTF-8, close codes valid, and a message no larger than ``max_size``. A violation
raises ``FrameError`` carrying the close code to answer with (1002, 1007 or 1009).
``encode`` makes a server frame (never masked). ``accept_key`` answers the handshake.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL = frozenset({CLOSE, PING, PONG})
DATA = frozenset({CONTINUATION, TEXT, BINARY})

NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
NO_STATUS = 1005
ABNORMAL = 1006
INVALID_DATA = 1007
TOO_BIG = 1009
INTERNAL_ERROR = 1011
# Codes a peer may send (RFC 6455 7.4.1, 7.4.2; 1004-1006 and 1015 never on the wire).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                       1014})


class FrameError(Exception):
    """The client broke the protocol; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """A complete data message."""

    data: str | bytes  # str for text, bytes for binary


@dataclass(frozen=True)
class Ping:
    """A ping (answered with a pong carrying the same payload)."""

    payload: bytes


@dataclass(frozen=True)
class Pong:
    """A pong."""

    payload: bytes


@dataclass(frozen=True)
class Close:
    """The client's close frame (``code`` 1005 when it gave none)."""

    code: int = NO_STATUS
    reason: str = ""


Event = Message | Ping | Pong | Close
_MORE = object()  # the frame is not complete yet


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for the client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())  # noqa: S324


def encode(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One unmasked (server) frame."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 126, size)
    else:
        head = struct.pack("!BBQ", first, 127, size)
    return head + payload


def encode_close(code: int = NORMAL, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason`` (cut to fit a control frame)."""
    if code == NO_STATUS:
        return encode(CLOSE)
    payload = struct.pack("!H", code) + reason.encode("utf-8")[:123]
    return encode(CLOSE, payload)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask``."""
    if not payload:
        return payload
    repeat = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeat, "little")).to_bytes(
        len(payload), "little")


class Decoder:
    """Client frames in, events out (see the module's theory of operation)."""

    def __init__(self, max_size: int = 16 * 1024 * 1024) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._opcode: int | None = None  # of the fragmented message under way
        self._parts: list[bytes] = []
        self._size = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text: list[str] = []
        self.closed = False  # a close frame was received: nothing more is read

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by ``data`` (``FrameError`` on a violation)."""
        self._buffer += data
        events: list[Event] = []
        while not self.closed:
            event = self._next()
            if event is _MORE:
                break
            if event is None:
                continue  # a fragment: its message is not complete yet
            assert isinstance(event, Message | Ping | Pong | Close)
            if isinstance(event, Close):
                self.closed = True
            events.append(event)
        return events

    def _next(self) -> Event | object | None:
        """The next event, None after a fragment, ``_MORE`` when bytes are missing."""
        buffer = self._buffer
        if len(buffer) < 2:
            return _MORE
        first, second = buffer[0], buffer[1]
        fin = bool(first & 0x80)
        opcode = first & 0x0F
        if first & 0x70:
            raise FrameError(PROTOCOL_ERROR, "reserved bits set without an extension")
        if not second & 0x80:
            raise FrameError(PROTOCOL_ERROR, "a client frame must be masked")
        size = second & 0x7F
        offset = 2
        if size == 126:
            if len(buffer) < 4:
                return _MORE
            size = struct.unpack_from("!H", buffer, 2)[0]
            offset = 4
        elif size == 127:
            if len(buffer) < 10:
                return _MORE
            size = struct.unpack_from("!Q", buffer, 2)[0]
            offset = 10
        if opcode in CONTROL:
            if not fin:
                raise FrameError(PROTOCOL_ERROR, "a fragmented control frame")
            if size > 125:
                raise FrameError(PROTOCOL_ERROR, "a control frame longer than 125 bytes")
        elif opcode not in DATA:
            raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        elif self._size + size > self.max_size:
            raise FrameError(TOO_BIG, f"a message larger than {self.max_size} bytes")
        if len(buffer) < offset + 4 + size:
            return _MORE
        mask = bytes(buffer[offset:offset + 4])
        payload = unmask(bytes(buffer[offset + 4:offset + 4 + size]), mask)
        del buffer[:offset + 4 + size]
        if opcode == PING:
            return Ping(payload)
        if opcode == PONG:
            return Pong(payload)
        if opcode == CLOSE:
            return _close(payload)
        return self._data(opcode, fin, payload)

    def _data(self, opcode: int, fin: bool, payload: bytes) -> Event | None:
        if opcode == CONTINUATION:
            if self._opcode is None:
                raise FrameError(PROTOCOL_ERROR, "a continuation frame outside a message")
            opcode = self._opcode
        elif self._opcode is not None:
            raise FrameError(PROTOCOL_ERROR, "a new message inside a fragmented one")
        self._size += len(payload)
        if opcode == TEXT:
            try:
                self._text.append(self._utf8.decode(payload, final=fin))
            except UnicodeDecodeError:
                raise FrameError(INVALID_DATA, "text that is not UTF-8") from None
        else:
            self._parts.append(payload)
        if not fin:
            self._opcode = opcode
            return None
        self._opcode = None
        self._size = 0
        if opcode == TEXT:
            text = "".join(self._text)
            self._text = []
            self._utf8.reset()
            return Message(text)
        data = b"".join(self._parts)
        self._parts = []
        return Message(data)


def _close(payload: bytes) -> Close:
    if not payload:
        return Close()
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "a close frame with a one-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if code not in _SENDABLE and not 3000 <= code <= 4999:
        raise FrameError(PROTOCOL_ERROR, f"close code {code} is not allowed")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "a close reason that is not UTF-8") from None
    return Close(code, reason)
