"""Header hygiene (proxy/headers.py) and trusted proxies (proxy/trust.py)."""

from __future__ import annotations

import pytest

from proxy.headers import ForwardInfo, downstream_headers, upstream_headers
from proxy.trust import TrustedProxies

INFO = ForwardInfo(
    client_ip="203.0.113.7",
    scheme="https",
    host="shop.example.com",
    port=8443,
    path_base="/shop",
    token="tok123",
)

OURS = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "shop.example.com"),
    ("X-Forwarded-Port", "8443"),
    ("X-Forwarded-Prefix", "/shop"),
    ("X-Bastion-Token", "tok123"),
]


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


def test_plain_request_keeps_client_headers_in_order_then_ours() -> None:
    client = [("Host", "shop.example.com"), ("Accept", "*/*"), ("User-Agent", "t/1")]
    assert upstream_headers(client, INFO) == [*client, *OURS]


@pytest.mark.parametrize(
    "name",
    ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
     "Upgrade", "HTTP2-Settings", "Proxy-Authorization", "proxy-authenticate"],
)
def test_hop_by_hop_headers_removed(name: str) -> None:
    out = upstream_headers([("Host", "h"), (name, "x"), ("Accept", "a")], INFO)
    assert name.lower() not in names(out)
    assert out[:2] == [("Host", "h"), ("Accept", "a")]


def test_headers_named_by_connection_removed() -> None:
    client = [
        ("Host", "h"),
        ("Connection", "keep-alive, X-Secret"),
        ("Connection", " Other-One "),
        ("X-Secret", "1"),
        ("other-one", "2"),
        ("X-Kept", "3"),
    ]
    out = upstream_headers(client, INFO)
    assert out[:2] == [("Host", "h"), ("X-Kept", "3")]
    assert {"x-secret", "other-one", "connection"}.isdisjoint(names(out))


def test_connection_cannot_remove_the_host_header() -> None:
    # Host goes to the app unchanged; a "Connection: host" must not strip it
    # (the HTTP client would then invent Host: 127.0.0.1:PORT).
    out = upstream_headers([("Host", "shop.example.com"), ("Connection", "Host")], INFO)
    assert ("Host", "shop.example.com") in out


@pytest.mark.parametrize(
    "name",
    ["X-Bastion-Token", "x-bastion-client-cert", "X-Bastion-Anything", "X-Forwarded-For",
     "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Prefix",
     "Forwarded", "X-Real-IP"],
)
def test_forgeable_client_headers_removed(name: str) -> None:
    out = upstream_headers([("Host", "h"), (name, "forged")], INFO)
    assert "forged" not in [v for _, v in out]
    assert out[0] == ("Host", "h")
    assert out[1:] == OURS


@pytest.mark.parametrize("name", ["X_Forwarded_For", "X_Bastion_Token", "My_Header"])
def test_headers_with_underscores_dropped(name: str) -> None:
    out = upstream_headers([("Host", "h"), (name, "forged"), ("My-Header", "ok")], INFO)
    assert out[:2] == [("Host", "h"), ("My-Header", "ok")]
    assert "forged" not in [v for _, v in out]


def test_content_length_dropped_for_reframing() -> None:
    out = upstream_headers([("Host", "h"), ("Content-Length", "12"), ("Content-Type", "a/b")], INFO)
    assert "content-length" not in names(out)
    assert ("Content-Type", "a/b") in out


def test_duplicate_headers_preserved_in_order() -> None:
    client = [("Host", "h"), ("Cookie", "a=1"), ("Accept", "x"), ("cookie", "b=2"), ("Cookie", "c=3")]
    out = upstream_headers(client, INFO)
    assert out[: len(client)] == client


def test_prefix_only_when_path_base_is_not_root() -> None:
    out = upstream_headers([("Host", "h")], ForwardInfo("10.0.0.1", "http", "h", 80, "", "t"))
    assert out == [
        ("Host", "h"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "h"),
        ("X-Forwarded-Port", "80"),
        ("X-Bastion-Token", "t"),
    ]


def test_client_cert_only_when_given() -> None:
    without = upstream_headers([], INFO)
    assert "x-bastion-client-cert" not in names(without)
    info = ForwardInfo("::1", "https", "h", 443, "", "t", client_cert_b64="TUlJQg==")
    out = upstream_headers([("X-Bastion-Client-Cert", "forged")], info)
    assert [v for n, v in out if n.lower() == "x-bastion-client-cert"] == ["TUlJQg=="]
    assert out[-1] == ("X-Bastion-Client-Cert", "TUlJQg==")
    assert ("X-Forwarded-For", "::1") in out


def test_untrusted_peer_chain_is_replaced() -> None:
    client = [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-Proto", "https")]
    info = ForwardInfo("198.51.100.2", "http", "h", 80, "", "t")
    out = upstream_headers(client, info)
    assert [v for n, v in out if n == "X-Forwarded-For"] == ["198.51.100.2"]
    assert [v for n, v in out if n == "X-Forwarded-Proto"] == ["http"]


def test_trusted_proxy_chain_kept_and_appended() -> None:
    client = [
        ("Host", "h"),
        ("X-Forwarded-For", "1.1.1.1, 2.2.2.2"),
        ("X-Forwarded-For", "3.3.3.3"),
        ("X-Forwarded-Proto", "https"),
        ("X-Bastion-Token", "forged"),
        ("Forwarded", "for=9.9.9.9"),
    ]
    info = ForwardInfo("10.0.0.5", "http", "h", 80, "", "t", trusted=True)
    out = upstream_headers(client, info)
    assert [v for n, v in out if n == "X-Forwarded-For"] == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.5"]
    # the original scheme is the first hop's
    assert [v for n, v in out if n == "X-Forwarded-Proto"] == ["https"]
    assert [v for n, v in out if n.lower() == "x-bastion-token"] == ["t"]
    assert "forwarded" not in names(out)


def test_trusted_proxy_without_chain_gets_ours() -> None:
    info = ForwardInfo("10.0.0.5", "http", "h", 80, "", "t", trusted=True)
    out = upstream_headers([("Host", "h")], info)
    assert ("X-Forwarded-For", "10.0.0.5") in out
    assert ("X-Forwarded-Proto", "http") in out


def test_downstream_removes_hop_by_hop_connection_listed_and_length() -> None:
    app = [
        ("Content-Type", "text/plain"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "5"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Upgrade", "h2c"),
    ]
    assert downstream_headers(app) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
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
