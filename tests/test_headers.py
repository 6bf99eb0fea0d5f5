"""Header hygiene (proxy/headers.py) and trusted proxies (proxy/trust.py)."""

from __future__ import annotations

import pytest

from bastion.proxy.edge.headers import ForwardInfo, downstream_headers, upstream_headers
from bastion.proxy.edge.trust import TrustedProxies

INFO = ForwardInfo(
    client_ip="203.0.113.7",
    scheme="https",
    host="shop.example.com",
    port=8443,
    path_base="/shop",
    token="tok123",
)

OURS = [
    (b"X-Forwarded-For", b"203.0.113.7"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"shop.example.com"),
    (b"X-Forwarded-Port", b"8443"),
    (b"X-Forwarded-Prefix", b"/shop"),
    (b"X-Bastion-Token", b"tok123"),
]


def names(headers: list[tuple[bytes, bytes]]) -> list[str]:
    return [n.decode().lower() for n, _ in headers]


def test_plain_request_keeps_client_headers_in_order_then_ours() -> None:
    client = [(b"Host", b"shop.example.com"), (b"Accept", b"*/*"), (b"User-Agent", b"t/1")]
    assert upstream_headers(client, INFO) == [*client, *OURS]


@pytest.mark.parametrize(
    "name",
    ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
     "Upgrade", "HTTP2-Settings", "Proxy-Authorization", "proxy-authenticate"],
)
def test_hop_by_hop_headers_removed(name: str) -> None:
    out = upstream_headers([(b"Host", b"h"), (name.encode(), b"x"), (b"Accept", b"a")], INFO)
    assert name.lower() not in names(out)
    assert out[:2] == [(b"Host", b"h"), (b"Accept", b"a")]


def test_headers_named_by_connection_removed() -> None:
    client = [
        (b"Host", b"h"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Connection", b" Other-One "),
        (b"X-Secret", b"1"),
        (b"other-one", b"2"),
        (b"X-Kept", b"3"),
    ]
    out = upstream_headers(client, INFO)
    assert out[:2] == [(b"Host", b"h"), (b"X-Kept", b"3")]
    assert {"x-secret", "other-one", "connection"}.isdisjoint(names(out))


def test_connection_cannot_remove_the_host_header() -> None:
    # Host goes to the app unchanged; a "Connection: host" must not strip it
    # (the HTTP client would then invent Host: 127.0.0.1:PORT).
    out = upstream_headers([(b"Host", b"shop.example.com"), (b"Connection", b"Host")], INFO)
    assert (b"Host", b"shop.example.com") in out


@pytest.mark.parametrize(
    "name",
    ["X-Bastion-Token", "x-bastion-client-cert", "X-Bastion-Anything", "X-Forwarded-For",
     "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Prefix",
     "Forwarded", "X-Real-IP"],
)
def test_forgeable_client_headers_removed(name: str) -> None:
    out = upstream_headers([(b"Host", b"h"), (name.encode(), b"forged")], INFO)
    assert b"forged" not in [v for _, v in out]
    assert out[0] == (b"Host", b"h")
    assert out[1:] == OURS


@pytest.mark.parametrize("name", ["X_Forwarded_For", "X_Bastion_Token", "My_Header"])
def test_headers_with_underscores_dropped(name: str) -> None:
    out = upstream_headers([(b"Host", b"h"), (name.encode(), b"forged"), (b"My-Header", b"ok")], INFO)
    assert out[:2] == [(b"Host", b"h"), (b"My-Header", b"ok")]
    assert b"forged" not in [v for _, v in out]


def test_content_length_dropped_for_reframing() -> None:
    out = upstream_headers([(b"Host", b"h"), (b"Content-Length", b"12"), (b"Content-Type", b"a/b")], INFO)
    assert "content-length" not in names(out)
    assert (b"Content-Type", b"a/b") in out


def test_duplicate_headers_preserved_in_order() -> None:
    client = [(b"Host", b"h"), (b"Cookie", b"a=1"), (b"Accept", b"x"), (b"cookie", b"b=2"), (b"Cookie", b"c=3")]
    out = upstream_headers(client, INFO)
    assert out[: len(client)] == client


def test_prefix_only_when_path_base_is_not_root() -> None:
    out = upstream_headers([(b"Host", b"h")], ForwardInfo("10.0.0.1", "http", "h", 80, "", "t"))
    assert out == [
        (b"Host", b"h"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"h"),
        (b"X-Forwarded-Port", b"80"),
        (b"X-Bastion-Token", b"t"),
    ]


def test_client_cert_only_when_given() -> None:
    without = upstream_headers([], INFO)
    assert "x-bastion-client-cert" not in names(without)
    info = ForwardInfo("::1", "https", "h", 443, "", "t", client_cert_b64="TUlJQg==")
    out = upstream_headers([(b"X-Bastion-Client-Cert", b"forged")], info)
    assert [v for n, v in out if n.lower() == b"x-bastion-client-cert"] == [b"TUlJQg=="]
    assert out[-1] == (b"X-Bastion-Client-Cert", b"TUlJQg==")
    assert (b"X-Forwarded-For", b"::1") in out


def test_untrusted_peer_chain_is_replaced() -> None:
    client = [(b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-Proto", b"https")]
    info = ForwardInfo("198.51.100.2", "http", "h", 80, "", "t")
    out = upstream_headers(client, info)
    assert [v for n, v in out if n == b"X-Forwarded-For"] == [b"198.51.100.2"]
    assert [v for n, v in out if n == b"X-Forwarded-Proto"] == [b"http"]


def test_trusted_proxy_chain_kept_and_appended() -> None:
    client = [
        (b"Host", b"h"),
        (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2"),
        (b"X-Forwarded-For", b"3.3.3.3"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Bastion-Token", b"forged"),
        (b"Forwarded", b"for=9.9.9.9"),
    ]
    info = ForwardInfo("10.0.0.5", "http", "h", 80, "", "t", trusted=True)
    out = upstream_headers(client, info)
    assert [v for n, v in out if n == b"X-Forwarded-For"] == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.5"]
    # the original scheme is the first hop's
    assert [v for n, v in out if n == b"X-Forwarded-Proto"] == [b"https"]
    assert [v for n, v in out if n.lower() == b"x-bastion-token"] == [b"t"]
    assert "forwarded" not in names(out)


def test_trusted_proxy_without_chain_gets_ours() -> None:
    info = ForwardInfo("10.0.0.5", "http", "h", 80, "", "t", trusted=True)
    out = upstream_headers([(b"Host", b"h")], info)
    assert (b"X-Forwarded-For", b"10.0.0.5") in out
    assert (b"X-Forwarded-Proto", b"http") in out


def test_downstream_removes_hop_by_hop_connection_listed_and_length() -> None:
    app = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"5"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Upgrade", b"h2c"),
    ]
    assert downstream_headers(app) == [
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]


# -- trusted proxies ---------------------------------------------------------------


def test_trusted_proxies_v4() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "192.168.1.1"])
    assert trusted.contains("10.1.2.3")
    assert trusted.contains("192.168.1.1")
    assert not trusted.contains("192.168.1.2")
    assert not trusted.contains("11.0.0.1")


def test_trusted_proxies_v6() -> None:
    trusted = TrustedProxies(["2001:db8::/32"])
    assert trusted.contains("2001:db8::1")
    assert trusted.contains("2001:DB8:ffff::9")
    assert not trusted.contains("2001:db9::1")
    assert not trusted.contains("10.0.0.1")


def test_trusted_proxies_v4_mapped_v6_peer() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    assert trusted.contains("::ffff:10.0.0.1")
    assert not trusted.contains("::ffff:11.0.0.1")


def test_trusted_proxies_empty_trusts_nobody() -> None:
    assert not TrustedProxies([]).contains("127.0.0.1")


@pytest.mark.parametrize("address", ["", "not-an-ip", "10.0.0.1:80", "[10.0.0.1]", "10.0.0.256"])
def test_trusted_proxies_bad_address_is_untrusted(address: str) -> None:
    assert not TrustedProxies(["0.0.0.0/0", "::/0"]).contains(address)


def test_trusted_proxies_host_bits_allowed_but_bad_cidr_rejected() -> None:
    assert TrustedProxies(["10.1.2.3/8"]).contains("10.200.0.1")
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/33"])
    with pytest.raises(ValueError):
        TrustedProxies(["example.com"])
