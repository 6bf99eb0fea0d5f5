"""The PROXY protocol parser (proxy/edge/proxyproto.py): pure, no sockets.

The "HAProxy" cases are bytes HAProxy 2.6 wrote itself (``send-proxy``,
``send-proxy-v2``, and the v2 LOCAL header of its ``check`` with ``send-proxy-v2``),
captured from a loopback listener, each followed by the connection's first bytes.
"""

from __future__ import annotations

import struct

import pytest

from bastion.proxy.edge.proxyproto import (
    MIN_LENGTH,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    expected_length,
    parse,
)

REQUEST = b"GET / HTTP/1.1\r\n\r\n"

HAPROXY_V1_TCP4 = b"PROXY TCP4 127.0.0.7 127.0.0.1 48473 19001\r\n"
HAPROXY_V1_TCP6 = b"PROXY TCP6 ::1 ::1 44887 19004\r\n"
HAPROXY_V2_TCP4 = (b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c\x7f\x00\x00\x07\x7f\x00\x00\x01"
                   b"\xce\xd5J:")
HAPROXY_V2_TCP6 = (b"\r\n\r\n\x00\r\nQUIT\n!!\x00$" + b"\x00" * 15 + b"\x01" + b"\x00" * 15
                   + b"\x01\x80#J;")
HAPROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n \x00\x00\x00"


def v2(command: int = 1, family: int = 0x11, body: bytes | None = None) -> bytes:
    """A v2 header; ``body`` defaults to 10.1.2.3:4000 -> 10.0.0.1:443."""
    if body is None:
        body = bytes([10, 1, 2, 3, 10, 0, 0, 1]) + struct.pack(">HH", 4000, 443)
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">H", len(value)) + value


# -- what HAProxy sends ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "version", "source", "destination"), [
    (HAPROXY_V1_TCP4, 1, ("127.0.0.7", 48473), ("127.0.0.1", 19001)),
    (HAPROXY_V1_TCP6, 1, ("::1", 44887), ("::1", 19004)),
    (HAPROXY_V2_TCP4, 2, ("127.0.0.7", 52949), ("127.0.0.1", 19002)),
    (HAPROXY_V2_TCP6, 2, ("::1", 32803), ("::1", 19003)),
], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6"])
def test_haproxy_headers_give_the_client_address(raw: bytes, version: int,
                                                  source: tuple[str, int],
                                                  destination: tuple[str, int]) -> None:
    header = parse(raw + REQUEST)
    assert header == ProxyHeader(version, len(raw), source, destination)
    assert not header.local
    assert (raw + REQUEST)[header.length:] == REQUEST  # the connection's own bytes follow


def test_haproxy_health_check_is_v2_local_a_direct_connection() -> None:
    header = parse(HAPROXY_V2_LOCAL + b"GET /.well-known/bastion/health HTTP/1.0\r\n\r\n")
    assert header == ProxyHeader(2, 16, None)
    assert header.local


# -- complete headers ----------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
])
def test_v1_unknown_is_a_direct_connection(line: bytes) -> None:
    header = parse(line + REQUEST)
    assert header is not None and header.local and header.length == len(line)


def test_v1_longest_line_is_accepted() -> None:
    line = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(line) == 104
    header = parse(line)
    assert header is not None
    assert header.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


def test_v2_ipv4_with_tlvs_skips_them() -> None:
    body = (bytes([192, 0, 2, 9, 10, 0, 0, 1]) + struct.pack(">HH", 51000, 443)
            + tlv(0x01, b"h2") + tlv(0x04, b"\x00" * 5) + tlv(0xEA, b"vpce-0abc"))
    raw = v2(body=body)
    header = parse(raw + b"\x16\x03\x01")
    assert header == ProxyHeader(2, len(raw), ("192.0.2.9", 51000), ("10.0.0.1", 443))


def test_v2_ipv6() -> None:
    src = bytes.fromhex("20010db8000000000000000000000042")
    dst = bytes.fromhex("20010db8000000000000000000000001")
    header = parse(v2(family=0x21, body=src + dst + struct.pack(">HH", 1234, 443)))
    assert header is not None
    assert header.source == ("2001:db8::42", 1234)
    assert header.destination == ("2001:db8::1", 443)


def test_v2_ipv4_mapped_ipv6_source_is_the_ipv4_address() -> None:
    src = bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 7])
    header = parse(v2(family=0x21, body=src + src + struct.pack(">HH", 1, 2)))
    assert header is not None and header.source == ("198.51.100.7", 1)


@pytest.mark.parametrize("family", [0x00, 0x31], ids=["unspec", "unix"])
def test_v2_proxy_without_an_ip_address_is_a_direct_connection(family: int) -> None:
    body = b"" if family == 0 else b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")
    header = parse(v2(family=family, body=body))
    assert header is not None and header.local


def test_v2_local_ignores_whatever_address_block_it_carries() -> None:
    raw = v2(command=0, family=0x11)
    header = parse(raw)
    assert header == ProxyHeader(2, len(raw), None)


def test_v2_header_of_the_largest_allowed_size() -> None:
    base = bytes([10, 1, 2, 3, 10, 0, 0, 1]) + struct.pack(">HH", 4000, 443)
    pad = V2_MAX - 16 - len(base) - 3
    raw = v2(body=base + tlv(0x04, bytes(pad)))
    assert len(raw) == V2_MAX
    header = parse(raw)
    assert header is not None and header.length == V2_MAX


# -- incomplete headers: None, never an error, at every cut -----------------------------------


@pytest.mark.parametrize("raw", [HAPROXY_V1_TCP4, HAPROXY_V2_TCP4, HAPROXY_V2_TCP6,
                                 HAPROXY_V2_LOCAL, v2(body=bytes(12) + tlv(1, b"h2"))],
                         ids=["v1", "v2-tcp4", "v2-tcp6", "v2-local", "v2-tlv"])
def test_every_prefix_of_a_header_is_incomplete(raw: bytes) -> None:
    for cut in range(len(raw)):
        assert parse(raw[:cut]) is None, cut
    assert parse(raw) is not None


def test_expected_length_is_known_after_sixteen_bytes_of_v2() -> None:
    raw = v2(body=bytes(12) + tlv(1, b"h2"))
    assert expected_length(raw[:15]) is None
    assert expected_length(raw[:16]) == len(raw)
    assert expected_length(HAPROXY_V1_TCP4) is None
    assert MIN_LENGTH == len(b"PROXY UNKNOWN\r\n")


# -- malformed headers: each one raises --------------------------------------------------------

MALFORMED = {
    # not a header at all
    "http-request": REQUEST,
    "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(20),
    "lowercase-proxy": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "proxy-without-space": b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v2-signature-broken": b"\r\n\r\n\x00\r\nQUIX\n!\x11\x00\x0c" + bytes(12),
    # v1
    "v1-lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\n",
    "v1-bare-cr": b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1000 2000\r\n",
    "v1-too-long": b"PROXY TCP6 " + b"f" * 120 + b"\r\n",
    "v1-no-end-in-107": b"PROXY UNKNOWN " + b"x" * 100,
    "v1-five-fields": b"PROXY TCP4 1.2.3.4 5.6.7.8 1000\r\n",
    "v1-seven-fields": b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000 3000\r\n",
    "v1-double-space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1000 2000\r\n",
    "v1-tab": b"PROXY TCP4\t1.2.3.4 5.6.7.8 1000 2000\r\n",
    "v1-udp4": b"PROXY UDP4 1.2.3.4 5.6.7.8 1000 2000\r\n",
    "v1-bad-ipv4": b"PROXY TCP4 1.2.3.256 5.6.7.8 1000 2000\r\n",
    "v1-ipv4-leading-zero": b"PROXY TCP4 1.2.3.04 5.6.7.8 1000 2000\r\n",
    "v1-ipv6-in-tcp4": b"PROXY TCP4 ::1 ::1 1000 2000\r\n",
    "v1-ipv4-in-tcp6": b"PROXY TCP6 1.2.3.4 5.6.7.8 1000 2000\r\n",
    "v1-hostname": b"PROXY TCP4 localhost 5.6.7.8 1000 2000\r\n",
    "v1-port-too-big": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2000\r\n",
    "v1-port-leading-zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 01000 2000\r\n",
    "v1-port-negative": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2000\r\n",
    "v1-port-not-ascii-digit": "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2000\r\n".encode(),
    "v1-nul-byte": b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1000 2000\r\n",
    "v1-empty-after-proxy": b"PROXY \r\n" + bytes(8),
    # v2
    "v2-version-1": V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    "v2-version-3": V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
    "v2-command-2": V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
    "v2-command-15": V2_SIGNATURE + b"\x2f\x11\x00\x0c" + bytes(12),
    "v2-family-4": v2(family=0x41),
    "v2-transport-3": v2(family=0x13),
    "v2-udp4": v2(family=0x12),
    "v2-udp6": v2(family=0x22, body=bytes(36)),
    "v2-ipv4-block-short": v2(family=0x11, body=bytes(11)),
    "v2-ipv6-block-short": v2(family=0x21, body=bytes(35)),
    "v2-ipv6-with-ipv4-length": v2(family=0x21, body=bytes(12)),
    "v2-tlv-cut-short": v2(body=bytes(12) + b"\x01\x00"),
    "v2-tlv-too-long": v2(body=bytes(12) + b"\x01\x00\x09abc"),
    "v2-too-long": V2_SIGNATURE + b"\x21\x11" + struct.pack(">H", V2_MAX),
    "v2-length-65535": V2_SIGNATURE + b"\x21\x11\xff\xff",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_headers_raise(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as caught:
        parse(raw)
    assert caught.value.reason in ("missing", "malformed", "too_long")
    assert str(caught.value)


def test_a_non_header_is_refused_from_its_first_bytes() -> None:
    with pytest.raises(ProxyProtocolError) as caught:
        parse(b"GET")
    assert caught.value.reason == "missing"
    with pytest.raises(ProxyProtocolError):
        parse(b"\r\n\r\n\x00\r\nX")


def test_too_long_is_known_from_the_fixed_part_alone() -> None:
    with pytest.raises(ProxyProtocolError) as caught:
        parse(V2_SIGNATURE + b"\x21\x11\x10\x00")
    assert caught.value.reason == "too_long"


def test_malformed_corpus_is_large() -> None:
    assert len(MALFORMED) >= 20
