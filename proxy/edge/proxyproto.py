"""The PROXY protocol (versions 1 and 2), as a pure parser: bytes in, a header out.

Theory of operation
-------------------
A layer-4 load balancer (HAProxy's ``send-proxy`` / ``send-proxy-v2``, AWS NLB, GCP,
Azure) keeps the client's address by sending one header before the connection's own
bytes (before TLS). Version 1 is a text line, ``PROXY TCP4 SRC DST SPORT DPORT\\r\\n``
(at most 107 bytes; ``PROXY UNKNOWN ...\\r\\n`` when the balancer does not know);
version 2 is binary: a 12-byte signature, a version/command byte, a family/transport
byte, a 2-byte length, the addresses, then TLVs (skipped here, but their framing is
checked). A v2 ``LOCAL`` command (the balancer's own health checks) and the v2
``UNSPEC``/``UNIX`` families and v1 ``UNKNOWN`` carry no client address: the connection
is served as a direct one from the balancer.

The reader (``proxy.edge.proxyaccept``) must never take a byte past the header (what
follows is a TLS ClientHello or an HTTP request, handed over untouched), so this module
also tells it how much it may read: ``MIN_LENGTH`` bytes always belong to the header;
after them a v2 header's length is known (``expected_length``) and a v1 header ends at
its first ``\\n``. ``parse`` takes the bytes read so far and returns ``None`` while the
header is incomplete, a ``ProxyHeader`` once it is complete, and raises
``ProxyProtocolError`` as soon as the bytes cannot start a valid header.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, "\r\n" included
MIN_LENGTH = 15  # "PROXY UNKNOWN\r\n", the shortest header of either version
V2_FIXED = 16  # signature, version/command, family, length
V2_MAX = 2048  # addresses and TLVs beyond this: refused (HAProxy sends far less)

_V2_ADDRESS = {0x11: 12, 0x21: 36}  # TCP over IPv4 / IPv6: the address block's size


class ProxyProtocolError(ValueError):
    """A header that is not a valid PROXY header (or none at all); ``reason`` is a short
    label for logs and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ProxyHeader:
    """A complete PROXY header."""

    version: int  # 1 or 2
    length: int  # bytes of the header (the connection's own bytes follow)
    source: tuple[str, int] | None  # the client; None: a direct connection (LOCAL, UNKNOWN)
    destination: tuple[str, int] | None = None  # the address the client connected to

    @property
    def local(self) -> bool:
        """No client address: serve it as a direct connection from the balancer."""
        return self.source is None


def check_prefix(data: bytes) -> None:
    """Raise when ``data`` (the first bytes of a connection) cannot start a header."""
    head = data[:12]
    if not (V1_PREFIX.startswith(head[:6]) or V2_SIGNATURE.startswith(head)):
        raise ProxyProtocolError("missing", "the connection does not start with a PROXY header")


def expected_length(data: bytes) -> int | None:
    """The whole header's length when it is known from ``data`` (a v2 header with its
    16 fixed bytes in), else None (v1: it ends at the first LF)."""
    if len(data) >= V2_FIXED and data.startswith(V2_SIGNATURE):
        return V2_FIXED + int(struct.unpack_from(">H", data, 14)[0])
    return None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while incomplete; ``ProxyProtocolError``
    when malformed. Bytes after the header are ignored (they are the connection's)."""
    check_prefix(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if len(data) < 12 or not data.startswith(V2_SIGNATURE):
        return None  # a prefix of the v2 signature so far
    return _parse_v2(data)


# -- version 1 ------------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("too_long", "PROXY v1 line longer than 107 bytes")
        if b"\r" in data[:-1] or any(b < 0x20 or b > 0x7E for b in data.rstrip(b"\r")):
            raise ProxyProtocolError("malformed", "PROXY v1 line with control bytes")
        return None
    if end == 0 or data[end - 1] != 0x0D:
        raise ProxyProtocolError("malformed", "PROXY v1 line not ended by CRLF")
    line = data[:end - 1]
    if any(b < 0x20 or b > 0x7E for b in line):
        raise ProxyProtocolError("malformed", "PROXY v1 line with control or non-ASCII bytes")
    parts = line.decode("ascii").split(" ")
    length = end + 1
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, length, None)  # the rest of the line is ignored (spec 2.1)
    if len(parts) != 6:
        raise ProxyProtocolError("malformed", "PROXY v1 line needs exactly 6 fields, "
                                 "separated by single spaces")
    _, family, src, dst, sport, dport = parts
    if family not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed", f"PROXY v1 protocol {family!r} is not "
                                 "TCP4, TCP6 or UNKNOWN")
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(1, length, (_v1_address(src, version), _v1_port(sport)),
                       (_v1_address(dst, version), _v1_port(dport)))


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError("malformed", f"PROXY v1 address {text!r} is not an "
                                 "IP address") from None
    if address.version != version or (version == 4 and text != str(address)):
        raise ProxyProtocolError("malformed", f"PROXY v1 address {text!r} is not an "
                                 f"IPv{version} address in its plain form")
    return str(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise ProxyProtocolError("malformed", f"PROXY v1 port {text!r} is not a number "
                                 "from 0 to 65535 without leading zeros")
    return int(text)


# -- version 2 ------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) >= 13:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError("malformed", f"PROXY v2 header with version {version}")
        if command > 1:
            raise ProxyProtocolError("malformed", f"PROXY v2 command {command} is neither "
                                     "LOCAL nor PROXY")
    total = expected_length(data)
    if total is None:
        return None
    if total > V2_MAX:
        raise ProxyProtocolError("too_long", f"PROXY v2 header of {total} bytes (at most "
                                 f"{V2_MAX})")
    if len(data) < total:
        return None
    command, family = data[12] & 0x0F, data[13]
    body = data[V2_FIXED:total]
    if command == 0:  # LOCAL: the balancer's own connection; addresses are ignored
        return ProxyHeader(2, total, None)
    if family >> 4 > 3 or family & 0x0F > 2:
        raise ProxyProtocolError("malformed", f"PROXY v2 family/transport byte {family:#04x}")
    if family & 0x0F == 2:
        raise ProxyProtocolError("malformed", "PROXY v2 over UDP on a stream connection")
    size = _V2_ADDRESS.get(family)
    if size is None:  # UNSPEC or UNIX: no IP address to take
        return ProxyHeader(2, total, None)
    if len(body) < size:
        raise ProxyProtocolError("malformed", f"PROXY v2 address block of {len(body)} bytes "
                                 f"(needs {size})")
    _check_tlvs(body[size:])
    if family == 0x11:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack_from(">HH", body, 8)
    else:
        src = _v6(body[0:16])
        dst = _v6(body[16:32])
        sport, dport = struct.unpack_from(">HH", body, 32)
    return ProxyHeader(2, total, (src, sport), (dst, dport))


def _v6(raw: bytes) -> str:
    address = ipaddress.IPv6Address(raw)
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def _check_tlvs(data: bytes) -> None:
    """TLVs are skipped, but each must fit: type (1 byte), length (2), value."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError("malformed", "PROXY v2 TLV cut short")
        (size,) = struct.unpack_from(">H", data, offset + 1)
        offset += 3 + size
        if offset > len(data):
            raise ProxyProtocolError("malformed", "PROXY v2 TLV longer than the header")
