"""HTTP/2 request and response heads <-> the HTTP/1.1 the app speaks: pure, no I/O.

Theory of operation
-------------------
The ``h2`` library checks the framing and much of RFC 9113 section 8 (pseudo-headers
before regular ones, lower-case names, no ``connection``), but what a request *means*
is left to the server. Before anything is forwarded, :func:`request_from_h2` checks:

* pseudo-headers: exactly one each of ``:method``, ``:scheme``, ``:path`` and at most one
  ``:authority``, nothing else (no ``:status``, no ``:protocol``; CONNECT is refused);
* ``:method`` is a token; ``:scheme`` is the listener's (``https``); ``:path`` is
  origin-form (``*`` only for OPTIONS) with no space, control byte, non-ASCII byte or
  ``#``; ``:authority`` (or ``Host`` when absent) is ``host[:port]`` without userinfo,
  and a ``Host`` header that names another authority makes the request malformed;
* field names are lower-case tokens, values carry no control character (0x00-0x1f but
  HTAB, and 0x7f: as on HTTP/1.1) and no surrounding whitespace; connection-specific
  fields (RFC 9113 8.2.2) are refused, ``te`` only as ``trailers``;
* ``content-length`` values agree and are digits; :func:`check_body_length` compares
  it with the DATA actually received.

The result is an :class:`H1Request`: ``Host`` rebuilt from ``:authority`` first, the
``cookie`` fields joined with ``"; "`` (RFC 9113 8.2.3), every other field as received.
:func:`response_to_h2` does the way back: ``:status`` first, lower-case names, no
connection-specific fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
LOWER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# reg-name / IPv4 (unreserved, sub-delims, pct-encoded), or an IPv6 literal; optional port.
AUTHORITY = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{1,5})?"
)
CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
     "http2-settings"}
)
PSEUDO_REQUEST = frozenset({":method", ":scheme", ":path", ":authority"})
# NUL, CR, LF (RFC 9113 8.2.1) and the other controls but HTAB: the HTTP/1.1 edge refuses
# them too, and the app gets HTTP/1.1.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_RESPONSE_VALUE = re.compile(r"[\x00\r\n]")
# Field names and authorities already found valid (pure functions of the string, so
# remembering them is exact; bounded, so endless distinct ones cannot grow them).
_GOOD_NAMES: dict[str, bool] = {}
_GOOD_AUTHORITIES: dict[str, bool] = {}
_REMEMBERED = 512
_PLAIN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def _remember(seen: dict[str, bool], value: str) -> None:
    if len(seen) < _REMEMBERED:
        seen[value] = True


class Malformed(ValueError):
    """An HTTP/2 request that must not be forwarded (a stream error PROTOCOL_ERROR)."""


class H1Request:
    """An HTTP/2 request as the HTTP/1.1 request the app gets.

    (A plain class: one is made per stream, and a compiled dataclass's ``__init__``
    would run as Python.)"""

    method: str
    target: str  # origin-form, as received
    authority: str  # becomes Host
    headers: list[tuple[str, str]]  # Host first, then the regular fields
    content_length: int | None

    def __init__(self, method: str, target: str, authority: str,
                 headers: list[tuple[str, str]], content_length: int | None) -> None:
        self.method = method
        self.target = target
        self.authority = authority
        self.headers = headers
        self.content_length = content_length

    def __repr__(self) -> str:
        return (f"H1Request(method={self.method!r}, target={self.target!r}, "
                f"authority={self.authority!r}, headers={self.headers!r}, "
                f"content_length={self.content_length})")


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def request_from_h2(
    fields: Sequence[tuple[bytes | str, bytes | str]], scheme: str = "https"
) -> H1Request:
    """Check an HTTP/2 request head and translate it; raises :class:`Malformed`."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in fields:
        name, value = _text(raw_name), _text(raw_value)
        if name.startswith(":"):
            if regular:
                raise Malformed(f"pseudo-header {name} after a regular field")
            if name not in PSEUDO_REQUEST:
                raise Malformed(f"pseudo-header {name} is not allowed in a request")
            if name in pseudo:
                raise Malformed(f"pseudo-header {name} repeated")
            pseudo[name] = value
            continue
        if name not in _GOOD_NAMES:
            if not LOWER_TOKEN.fullmatch(name):
                raise Malformed(f"field name {name!r} is not a lower-case token")
            _remember(_GOOD_NAMES, name)
        # (printable ASCII has no control at all: the pattern only for the rest)
        if not (value.isascii() and value.isprintable()) and _BAD_VALUE.search(value):
            raise Malformed(f"field {name} has a bad value")
        if value and (value[0] in " \t" or value[-1] in " \t"):
            raise Malformed(f"field {name} has a bad value")
        if name in CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific field {name}")
        if name == "te" and value.strip().lower() != "trailers":
            raise Malformed("te other than trailers")
        regular.append((name, value))

    method = pseudo.get(":method")
    if method is None or (method not in _PLAIN_METHODS and not TOKEN.fullmatch(method)):
        raise Malformed("missing or malformed :method")
    if method == "CONNECT":
        raise Malformed("CONNECT is not supported")
    if pseudo.get(":scheme") != scheme:
        raise Malformed(f":scheme must be {scheme}")
    path = pseudo.get(":path")
    if not path:
        raise Malformed("missing or empty :path")
    if path == "*":
        if method != "OPTIONS":
            raise Malformed(":path * is only for OPTIONS")
    elif not path.startswith("/") or not (path.isascii() and path.isprintable()) \
            or " " in path or "#" in path:  # (no control, space, '#' or non-ASCII byte)
        raise Malformed(":path is not origin-form")

    hosts = [value for name, value in regular if name == "host"]
    authority = pseudo.get(":authority")
    if len(hosts) > 1:
        raise Malformed("repeated host field")
    if authority is None:
        if not hosts:
            raise Malformed("no :authority and no host")
        authority = hosts[0]
    elif hosts and hosts[0].lower() != authority.lower():
        raise Malformed("host differs from :authority")
    if authority not in _GOOD_AUTHORITIES:
        if not AUTHORITY.fullmatch(authority):
            raise Malformed(":authority is not host[:port]")
        _remember(_GOOD_AUTHORITIES, authority)

    lengths = {value for name, value in regular if name == "content-length"}
    content_length: int | None = None
    if lengths:
        if len(lengths) > 1:
            raise Malformed("conflicting content-length")
        text = lengths.pop()
        if not text.isdigit() or len(text) > 18:
            raise Malformed("malformed content-length")
        content_length = int(text)

    cookies = [value for name, value in regular if name == "cookie"]
    headers: list[tuple[str, str]] = [("Host", authority)]
    cookie_done = False
    for name, value in regular:
        if name == "host":
            continue
        if name == "cookie":
            if not cookie_done:
                headers.append(("cookie", "; ".join(cookies)))
                cookie_done = True
            continue
        headers.append((name, value))
    return H1Request(method, path, authority, headers, content_length)


def check_body_length(expected: int | None, received: int, ended: bool) -> None:
    """Raise :class:`Malformed` when the DATA received contradicts ``content-length``."""
    if expected is None:
        return
    if received > expected or (ended and received != expected):
        raise Malformed(f"content-length {expected} but {received} bytes of DATA")


def response_to_h2(
    status: int, fields: Iterable[tuple[str, str]], content_length: int | None
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 response head for an app's answer (fields already without hop-by-hop)."""
    head: list[tuple[bytes, bytes]] = [(b":status", str(status).encode("ascii"))]
    for name, value in fields:
        low = name.lower()
        if low in CONNECTION_SPECIFIC or low in ("te", "content-length", "trailer"):
            continue
        if not LOWER_TOKEN.fullmatch(low) or _BAD_RESPONSE_VALUE.search(value):
            continue
        head.append((low.encode("latin-1"), value.strip(" \t").encode("latin-1")))
    if content_length is not None:
        head.append((b"content-length", str(content_length).encode("ascii")))
    return head
