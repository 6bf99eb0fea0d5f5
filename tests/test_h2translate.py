"""HTTP/2 request checks and translation to HTTP/1.1 (proxy.h2translate): pure."""

from __future__ import annotations

import pytest

from bastion.proxy.edge.h2translate import (
    Malformed,
    check_body_length,
    request_from_h2,
    response_to_h2,
)

BASE = [(":method", "GET"), (":scheme", "https"), (":path", "/a?b=1"),
        (":authority", "example.com:8443")]


def req(*extra: tuple[str, str], base: list[tuple[str, str]] | None = None
        ) -> list[tuple[str, str]]:
    return [*(BASE if base is None else base), *extra]


def test_plain_get() -> None:
    r = request_from_h2(req(("user-agent", "t"), ("accept", "*/*")))
    assert r.method == "GET"
    assert r.target == "/a?b=1"
    assert r.authority == "example.com:8443"
    assert r.headers == [("Host", "example.com:8443"), ("user-agent", "t"), ("accept", "*/*")]
    assert r.content_length is None


def test_bytes_fields() -> None:
    r = request_from_h2([(n.encode(), v.encode()) for n, v in req(("x-a", "1"))])
    assert r.headers[-1] == ("x-a", "1")


def test_cookies_joined() -> None:
    r = request_from_h2(req(("cookie", "a=1"), ("x", "y"), ("cookie", "b=2")))
    assert r.headers == [("Host", "example.com:8443"), ("cookie", "a=1; b=2"), ("x", "y")]


def test_host_without_authority() -> None:
    base = [(":method", "GET"), (":scheme", "https"), (":path", "/")]
    r = request_from_h2(req(("host", "h.example"), base=base))
    assert r.authority == "h.example"
    assert r.headers == [("Host", "h.example")]


def test_host_same_as_authority_is_dropped() -> None:
    r = request_from_h2(req(("host", "EXAMPLE.com:8443")))
    assert r.headers == [("Host", "example.com:8443")]


def test_content_length() -> None:
    r = request_from_h2(req(("content-length", "12")))
    assert r.content_length == 12
    assert ("content-length", "12") in r.headers


def test_options_star() -> None:
    base = [(":method", "OPTIONS"), (":scheme", "https"), (":path", "*"),
            (":authority", "a")]
    assert request_from_h2(base).target == "*"


def test_ipv6_authority() -> None:
    base = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "[::1]:443")]
    assert request_from_h2(base).authority == "[::1]:443"


def test_tab_inside_a_value_is_allowed() -> None:
    assert ("x", "a\tb") in request_from_h2(req(("x", "a\tb"))).headers


def test_te_trailers_allowed() -> None:
    assert ("te", "trailers") in request_from_h2(req(("te", "trailers"))).headers


def _swap(name: str, value: str | None) -> list[tuple[str, str]]:
    out = [(n, v) for n, v in BASE if n != name]
    if value is not None:
        out.insert(0, (name, value))
    return out


MALFORMED = {
    "no method": _swap(":method", None),
    "no scheme": _swap(":scheme", None),
    "no path": _swap(":path", None),
    "empty path": _swap(":path", ""),
    "method not token": _swap(":method", "GE T"),
    "method with slash": _swap(":method", "GET/"),
    "connect": _swap(":method", "CONNECT"),
    "scheme http": _swap(":scheme", "http"),
    "path absolute-form": _swap(":path", "https://a/b"),
    "path with space": _swap(":path", "/a b"),
    "path with fragment": _swap(":path", "/a#b"),
    "path with control": _swap(":path", "/a\x01"),
    "path with DEL": _swap(":path", "/a\x7f"),
    "path non-ascii": _swap(":path", "/é"),
    "star not options": _swap(":path", "*"),
    "authority userinfo": _swap(":authority", "user@example.com"),
    "authority with path": _swap(":authority", "example.com/x"),
    "authority empty": _swap(":authority", ""),
    "authority bad port": _swap(":authority", "example.com:80x"),
    "authority space": _swap(":authority", "exa mple.com"),
    "no authority no host": _swap(":authority", None),
    "status pseudo": req((":status", "200"))[:4] + [(":status", "200")],
    "protocol pseudo": [(":protocol", "websocket"), *BASE],
    "unknown pseudo": [(":foo", "1"), *BASE],
    "repeated method": [(":method", "GET"), *BASE],
    "pseudo after regular": [BASE[0], ("x", "1"), *BASE[1:]],
    "uppercase name": req(("X-Upper", "1")),
    "name with space": req(("x y", "1")),
    "empty name": req(("", "1")),
    "connection": req(("connection", "keep-alive")),
    "keep-alive": req(("keep-alive", "5")),
    "proxy-connection": req(("proxy-connection", "x")),
    "transfer-encoding": req(("transfer-encoding", "chunked")),
    "upgrade": req(("upgrade", "websocket")),
    "te gzip": req(("te", "gzip")),
    "value with CR": req(("x", "a\rb")),
    "value with LF": req(("x", "a\nb")),
    "value with NUL": req(("x", "a\x00b")),
    "value with SOH": req(("x", "a\x01b")),
    "value with ESC": req(("x", "a\x1bb")),
    "value with DEL": req(("x", "a\x7fb")),
    "value leading space": req(("x", " a")),
    "host differs": req(("host", "other.example")),
    "two hosts": _swap(":authority", None) + [("host", "a"), ("host", "a")],
    "content-length conflict": req(("content-length", "1"), ("content-length", "2")),
    "content-length not digits": req(("content-length", "-1")),
    "content-length hex": req(("content-length", "0x10")),
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(fields: list[tuple[str, str]]) -> None:
    with pytest.raises(Malformed):
        request_from_h2(fields)


def test_body_length_checks() -> None:
    check_body_length(None, 10, True)
    check_body_length(5, 3, False)
    check_body_length(5, 5, True)
    with pytest.raises(Malformed):
        check_body_length(5, 6, False)
    with pytest.raises(Malformed):
        check_body_length(5, 4, True)


def test_response_head() -> None:
    head = response_to_h2(
        200,
        [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
         ("Connection", "close"), ("Transfer-Encoding", "chunked"), ("Keep-Alive", "1"),
         ("Content-Length", "99"), ("Bad Name", "x"), ("x-bad", "a\r\nb")],
        5,
    )
    assert head == [(b":status", b"200"), (b"content-type", b"text/plain"),
                    (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
                    (b"content-length", b"5")]


def test_response_head_without_length() -> None:
    assert response_to_h2(204, [], None) == [(b":status", b"204")]
