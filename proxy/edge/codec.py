"""The HTTP/1.1 head codec shared by both sides of the edge: pure, bytes in and out.

Parsing is llhttp's (``httptools``): the client side drives ``HttpRequestParser``
(``proxy.edge.h1``), the upstream side ``HttpResponseParser`` (``proxy.edge.upstream``),
and the strict rules on top of llhttp live in ``proxy.edge.strict``. Here: the request
line check llhttp is lenient about (spaces, HTTP/0.9), and the heads we write, each
built in one join: a request head for the app, a response head for the client.
"""

from __future__ import annotations

import http
from urllib.parse import unquote

from . import strict

_REASONS = {s.value: s.phrase.encode("ascii") for s in http.HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %b\r\n" % (code, phrase)
                 for code, phrase in _REASONS.items()}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (b"" for an unknown one)."""
    return _REASONS.get(status, b"")


def status_line(status: int, reason: bytes = b"") -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n`` (the standard phrase when none is given)."""
    if not reason:
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
    return b"HTTP/1.1 %d %b\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))


def request_head(method: str, target: str, headers: list[tuple[bytes, bytes]],
                 framing: bytes | None) -> bytes:
    """A request head for the app; ``framing`` is a last header line
    (``Content-Length: N`` or ``Transfer-Encoding: chunked``) or None."""
    parts = [b"%s %s HTTP/1.1" % (method.encode("ascii"), target.encode("latin-1"))]
    parts += [name + b": " + value for name, value in headers]
    if framing is not None:
        parts.append(framing)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                  extra: bytes, framing: bytes) -> bytes:
    """A response head for the client: status line, the app's fields, ``extra`` (our
    own, already as lines) and ``framing`` (the framing and connection lines)."""
    parts = [status_line(status, reason)]
    parts += [name + b": " + value + b"\r\n" for name, value in headers]
    parts.append(extra)
    parts.append(framing)
    parts.append(b"\r\n")
    return b"".join(parts)


def decoded_path(target: str) -> str:
    """The path of an origin-form ``target``, percent-decoded, for routing (``*`` stays)."""
    path = target.split("?", 1)[0]
    if "%" not in path:
        return path
    return unquote(path, errors="surrogateescape")


def check_request_line(first: bytes) -> None:
    """The raw request line (up to its LF) is strict ``method SP target SP HTTP/1.x``;
    raises ``strict.StrictError`` (400, 505) otherwise."""
    strict.check_request_line(first.removesuffix(b"\r"))
