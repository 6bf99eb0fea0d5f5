"""The HTTP/1.1 request corpus shared by the end-to-end test (tests/test_http1_corpus.py,
a real Bastion in front of tests/apps/raw_upstream.py) and the in-memory one
(tests/test_edge_memory.py, ``H1Connection`` with fake transports).

Sources: RFC 9112 / 9110, Http11Probe and HTTP Garden style cases, and smuggler's
mutations (CL.TE, TE.CL, TE.TE obfuscations). Each case names the status Bastion must
answer (a set where RFC 9112 allows either) and whether the app may see the request:
every rejected one must reach no app, and the connection must close after it. A
``check`` runs on what the app saw, as raw_upstream.py reports it (JSON: ``method``,
``target``, ``head``, ``headers`` lower-cased, ``body``, ``raw_body`` as framed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

MAX_HEADER = 8192
MAX_BODY = 4096


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    status: frozenset[int]
    reaches: bool | None = False  # the app must see it, must not, or either (None)
    check: Any = None  # optional: callable(app_json) for forwarded requests


def case(id: str, raw: bytes, *status: int, reaches: bool | None = False,
         check: Any = None) -> Case:
    return Case(id, raw, frozenset(status), reaches, check)


def get(target: bytes = b"/", *headers: bytes, method: bytes = b"GET",
        version: bytes = b"HTTP/1.1", body: bytes = b"") -> bytes:
    head = method + b" " + target + b" " + version + b"\r\n"
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


H = b"Host: h"
C = b"Connection: close"


def post(*headers: bytes, body: bytes = b"") -> bytes:
    return get(b"/", H, C, *headers, method=b"POST", body=body)


def chunked(body: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked", body=body)


def _no_framing_leak(app: dict[str, Any]) -> None:
    assert app["body"] == "hello"
    assert ";" not in app["raw_body"] and "X-Trailer" not in app["raw_body"]
    assert "x-trailer" not in app["headers"]


CORPUS: list[Case] = [
    # -- controls: valid requests that must reach the app ---------------------------
    case("valid-get", get(b"/", H, C), 200, reaches=True),
    case("valid-leading-crlf", b"\r\n" + get(b"/", H, C), 200, reaches=True),
    case("valid-http10", get(b"/", H, version=b"HTTP/1.0"), 200, reaches=True),
    case("valid-cl-ows", post(b"Content-Length:  5 ", body=b"hello"), 200, reaches=True),
    case("valid-chunked-upper", post(b"Transfer-Encoding: CHUNKED",
                                     body=b"5\r\nhello\r\n0\r\n\r\n"), 200, reaches=True),
    case("valid-te-leading-ows", post(b"Transfer-Encoding:  chunked",
                                      body=b"5\r\nhello\r\n0\r\n\r\n"), 200, reaches=True),
    case("valid-chunk-ext-dropped", chunked(b"5;name=value\r\nhello\r\n0\r\n\r\n"), 200,
         reaches=True, check=_no_framing_leak),
    case("valid-trailer-dropped", chunked(b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"), 200,
         reaches=True, check=_no_framing_leak),
    case("valid-underscore-te-ignored",
         post(b"Transfer_Encoding: chunked", b"Content-Length: 5", body=b"hello"), 200,
         reaches=True, check=lambda a: ("transfer_encoding" not in a["headers"]
                                        and a["body"] == "hello") or pytest.fail(str(a))),
    case("valid-h2c-upgrade-stripped",
         get(b"/", H, C, b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"), 200,
         reaches=True, check=lambda a: ("upgrade" not in a["headers"]
                                        and "http2-settings" not in a["headers"])
         or pytest.fail(str(a))),
    case("valid-h2c-connection-upgrade-stripped",
         get(b"/", H, b"Connection: Upgrade, HTTP2-Settings, close", b"Upgrade: h2c",
             b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"), 200,
         reaches=True, check=lambda a: ("upgrade" not in a["headers"]
                                        and "http2-settings" not in a["headers"])
         or pytest.fail(str(a))),
    case("valid-absolute-form", get(b"http://other.test/x?y=1", b"Host: h", C), 200,
         reaches=True, check=lambda a: (a["target"] == "/x?y=1"
                                        and a["headers"]["host"] == "other.test")
         or pytest.fail(str(a))),
    case("valid-absolute-form-no-path", get(b"http://other.test", b"Host: other.test", C),
         200, reaches=True, check=lambda a: a["target"] == "/" or pytest.fail(str(a))),
    # -- request line -----------------------------------------------------------------
    case("bare-lf", b"GET / HTTP/1.1\nHost: h\n\n", 400),
    case("bare-cr", b"GET / HTTP/1.1\rHost: h\r\r\n\r\n", 400),
    case("tab-separator", b"GET\t/\tHTTP/1.1\r\nHost: h\r\n\r\n", 400),
    case("double-space", b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    case("trailing-space", b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
    case("leading-space", b" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    case("lowercase-version", get(b"/", H, version=b"http/1.1"), 400),
    case("version-11", get(b"/", H, version=b"HTTP/11"), 400),
    case("version-1x", get(b"/", H, version=b"HTTP/1.1x"), 400),
    case("version-1-dot", get(b"/", H, version=b"HTTP/1."), 400),
    case("version-2", get(b"/", H, version=b"HTTP/2.0"), 400, 505),
    case("version-3", get(b"/", H, version=b"HTTP/3.0"), 400, 505),
    case("version-0.9-line", get(b"/", H, version=b"HTTP/0.9"), 400, 505),
    case("http09-simple-request", b"GET /\r\n\r\n", 400),
    case("missing-version", b"GET /\r\nHost: h\r\n\r\n", 400),
    case("method-bad-char", get(b"/", H, method=b"G(T"), 400),
    case("method-empty", b" / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    case("method-nul", get(b"/", H, method=b"GE\x00T"), 400),
    case("connect", get(b"h:443", H, method=b"CONNECT"), 400, 405),
    case("trace", get(b"/", H, method=b"TRACE"), 405),
    case("fragment", get(b"/a#b", H), 400),
    case("space-in-target", get(b"/a b", H), 400),
    case("non-ascii-target", get(b"/\xff", H), 400),
    case("nul-in-target", get(b"/a\x00b", H), 400),
    case("ctl-in-target", get(b"/a\x01b", H), 400),
    case("del-in-target", get(b"/a\x7fb", H), 400),
    case("empty-target", b"GET  HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    case("relative-target", get(b"a/b", H), 400),
    case("asterisk-get", get(b"*", H), 400),
    case("authority-form-get", get(b"h:80", H), 400),
    case("absolute-userinfo", get(b"http://u:p@h/", H), 400),
    case("absolute-other-scheme", get(b"ftp://h/", H), 400),
    case("absolute-bad-authority", get(b"http://h h/", H), 400),
    case("absolute-empty-authority", get(b"http:///x", H), 400),
    case("target-too-long-line", get(b"/" + b"a" * 20000, H), 414),
    case("target-too-long", get(b"/" + b"a" * 8300, H), 414),
    # -- Host ------------------------------------------------------------------------
    case("host-missing", get(b"/"), 400),
    case("host-missing-http10", get(b"/", version=b"HTTP/1.0"), 400),
    case("host-duplicate", get(b"/", H, H), 400),
    case("host-duplicate-different", get(b"/", H, b"Host: other"), 400),
    case("host-comma", get(b"/", b"Host: a,b"), 400),
    case("host-userinfo", get(b"/", b"Host: u@h"), 400),
    case("host-path", get(b"/", b"Host: h/x"), 400),
    case("host-empty", get(b"/", b"Host: "), 400),
    case("host-space", get(b"/", b"Host: h x"), 400),
    case("host-tab", get(b"/", b"Host: h\tx"), 400),
    case("host-bad-port", get(b"/", b"Host: h:abc"), 400),
    case("host-port-range", get(b"/", b"Host: h:99999"), 400),
    case("host-two-colons", get(b"/", b"Host: h:1:2"), 400),
    case("host-backslash", get(b"/", b"Host: h\\x"), 400),
    case("host-ipv6-open", get(b"/", b"Host: [::1"), 400),
    case("host-non-ascii", get(b"/", b"Host: \xc3\xa9.test"), 400),
    case("host-query", get(b"/", b"Host: h?x"), 400),
    case("host-fragment", get(b"/", b"Host: h#x"), 400),
    case("host-space-before-colon", get(b"/", b"Host : h"), 400),
    case("host-obs-fold", get(b"/", b"Host:", b" h"), 400),
    # -- header syntax ---------------------------------------------------------------
    case("space-before-colon", get(b"/", H, b"X-A : 1"), 400),
    case("space-in-name", get(b"/", H, b"X A: 1"), 400),
    case("no-colon", get(b"/", H, b"X-A"), 400),
    case("empty-name", get(b"/", H, b": 1"), 400),
    case("obs-fold", get(b"/", H, b"X-A: 1", b" 2"), 400),
    case("obs-fold-tab", get(b"/", H, b"X-A: 1", b"\t2"), 400),
    case("first-header-folded", get(b"/", b" X-A: 1", H), 400),
    case("nul-in-value", get(b"/", H, b"X-A: a\x00b"), 400),
    case("cr-in-value", get(b"/", H, b"X-A: a\rb"), 400),
    case("lf-in-header", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\nX-B: b\r\n\r\n", 400),
    case("ctl-in-value", get(b"/", H, b"X-A: a\x01b"), 400),
    case("del-in-value", get(b"/", H, b"X-A: a\x7fb"), 400),
    case("at-in-name", get(b"/", H, b"X@A: 1"), 400),
    case("non-ascii-name", get(b"/", H, b"X-\xc3\xa9: 1"), 400),
    case("colon-only-line", get(b"/", H, b":"), 400),
    case("too-many-headers", get(b"/", H, *(b"X-%d: 1" % i for i in range(200))), 431, 400),
    case("header-line-too-long", get(b"/", H, b"X-A: " + b"a" * 20000), 431),
    case("header-block-too-large", get(b"/", H, *(b"X-%d: " % i + b"a" * 1000
                                                   for i in range(12))), 431),
    # -- Content-Length --------------------------------------------------------------
    case("cl-duplicate-different", post(b"Content-Length: 5", b"Content-Length: 6",
                                        body=b"hello!"), 400),
    case("cl-duplicate-same", post(b"Content-Length: 5", b"Content-Length: 5",
                                   body=b"hello"), 400),
    case("cl-list", post(b"Content-Length: 5, 5", body=b"hello"), 400),
    case("cl-plus", post(b"Content-Length: +5", body=b"hello"), 400),
    case("cl-minus", post(b"Content-Length: -5", body=b"hello"), 400),
    case("cl-inner-space", post(b"Content-Length: 1 0", body=b"hello"), 400),
    case("cl-hex", post(b"Content-Length: 0x5", body=b"hello"), 400),
    case("cl-empty", post(b"Content-Length: ", body=b"hello"), 400),
    case("cl-letters", post(b"Content-Length: 5a", body=b"hello"), 400),
    case("cl-fraction", post(b"Content-Length: 5.0", body=b"hello"), 400),
    case("cl-huge", post(b"Content-Length: 99999999999999999999999", body=b"x"), 400, 413),
    case("cl-over-limit", post(b"Content-Length: %d" % (MAX_BODY + 1), body=b"x"), 413),
    case("cl-space-before-colon", post(b"Content-Length : 5", body=b"hello"), 400),
    # -- Transfer-Encoding (smuggler's CL.TE, TE.CL, TE.TE) ----------------------------
    case("cl-te", post(b"Content-Length: 13", b"Transfer-Encoding: chunked",
                       body=b"0\r\n\r\nSMUGGLED"), 400),
    case("te-cl", post(b"Transfer-Encoding: chunked", b"Content-Length: 3",
                       body=b"5\r\nhello\r\n0\r\n\r\n"), 400),
    case("te-xchunked", post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), 400, 501),
    case("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity",
                                     body=b"0\r\n\r\n"), 400, 501),
    case("te-identity", post(b"Transfer-Encoding: identity", body=b""), 400, 501),
    case("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked",
                                 body=b"0\r\n\r\n"), 400, 501),
    case("te-vtab", post(b"Transfer-Encoding: chunked\x0b", body=b"0\r\n\r\n"), 400),
    case("te-ff", post(b"Transfer-Encoding: \x0cchunked", body=b"0\r\n\r\n"), 400),
    case("te-duplicate", post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                              body=b"0\r\n\r\n"), 400),
    case("te-te-obfuscated", post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: x",
                                  body=b"0\r\n\r\n"), 400, 501),
    case("te-http10", get(b"/", H, b"Transfer-Encoding: chunked", version=b"HTTP/1.0",
                          method=b"POST", body=b"0\r\n\r\n"), 400),
    case("te-quoted", post(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n"), 400),
    case("te-param", post(b"Transfer-Encoding: chunked;q=1", body=b"0\r\n\r\n"), 400, 501),
    case("te-space-before-colon", post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
         400),
    case("te-folded", post(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"), 400),
    case("te-x-space-chunked", post(b"Transfer-Encoding: x chunked", body=b"0\r\n\r\n"), 400),
    case("te-comma-only", post(b"Transfer-Encoding: ,", body=b"0\r\n\r\n"), 400),
    # -- chunked bodies ---------------------------------------------------------------
    case("chunk-size-invalid", chunked(b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    case("chunk-size-plus", chunked(b"+5\r\nhello\r\n0\r\n\r\n"), 400),
    case("chunk-size-minus", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    case("chunk-size-0x", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    # The pure-Python parser takes the huge size and waits for the bytes: body_timeout
    # ends it (408), still before any app saw the request (the first bytes are awaited).
    case("chunk-size-overflow", chunked(b"FFFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"), 400,
         408),
    case("chunk-size-leading-space", chunked(b" 5\r\nhello\r\n0\r\n\r\n"), 400),
    case("chunk-size-trailing-space", chunked(b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    case("chunk-size-empty", chunked(b"\r\nhello\r\n0\r\n\r\n"), 400),
    case("chunk-missing-crlf", chunked(b"5\r\nhelloX0\r\n\r\n"), 400),
    case("chunk-too-long", chunked(b"3\r\nhello\r\n0\r\n\r\n"), 400),
    case("chunk-bare-lf", chunked(b"5\nhello\n0\n\n"), 400),
    # The pure-Python parser ignores chunk extensions entirely; they never reach the app.
    case("chunk-ext-nul", chunked(b"5;a\x00b\r\nhello\r\n0\r\n\r\n"), 400, 200,
         reaches=None),
    case("chunk-ext-bare-lf", chunked(b"5;a\nhello\r\n0\r\n\r\n"), 400),
    case("chunked-over-limit", chunked(b"%x\r\n" % (MAX_BODY + 10) + b"a" * (MAX_BODY + 10)
                                       + b"\r\n0\r\n\r\n"), 413),
]

IDS = [c.id for c in CORPUS]
assert len(set(IDS)) == len(IDS)
