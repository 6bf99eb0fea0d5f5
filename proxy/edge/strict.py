"""Strict HTTP/1.1 request validation beyond what aiohttp's parser rejects: pure, no I/O.

aiohttp's parser (llhttp, or the pure-Python one) already refuses most broken framing:
bad request lines, bare LF, obs-fold, invalid chunk sizes, header names with spaces.
What it lets through, or accepts leniently, is decided here, on the parsed pieces of one
request head (method, raw target, version, raw header pairs), the way h11 does: either a
``Verdict`` (the request may go on) or a ``StrictError`` carrying the status to send
(400, 405, 413, 414, 431, 501, 505). The caller always closes the connection after one.

Rules (RFC 9110 / 9112):

- Version: HTTP/1.0 and HTTP/1.1 only; HTTP/2.0 or 3.0 in an HTTP/1 request line: 505.
- Method: a token; CONNECT and TRACE are refused with 405 (a reverse proxy tunnels for no
  one, and TRACE would echo credentials).
- Target: origin-form (``/path?query``), absolute-form (``http://authority/path``), or
  ``*`` with OPTIONS only. No fragment, no whitespace, controls or non-ASCII bytes.
  An absolute-form target is routed by its authority, which wins over ``Host``
  (RFC 9112 3.2.3); the app gets origin-form and a matching ``Host``.
- Host: exactly one, a valid ``host[:port]`` (no userinfo, path, comma, spaces), even
  for HTTP/1.0 (every app is routed by host).
- Framing: ``Transfer-Encoding`` only as a single ``chunked`` on HTTP/1.1 (anything else
  400, unknown codings 501), never together with ``Content-Length``; ``Content-Length``
  once, digits only. Header values without NUL, CR or LF.
- ``Upgrade: h2c`` and ``HTTP2-Settings`` are removed (``strip_h2c``): HTTP/2 is only
  spoken after ALPN on TLS, never by cleartext upgrade.
"""

from __future__ import annotations

import re

MAX_TARGET = 8192  # a request target longer than this is 414

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_REG_NAME = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+;=]+$|^(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9\-._~])+$")
_IPV6 = re.compile(r"^\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9\-._~]+)?\]$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"^[0-9]+$")
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
# Methods known to be tokens and allowed: the common case skips the token pattern.
_PLAIN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_PLAIN_METHODS_RAW = frozenset(m.encode("ascii") for m in _PLAIN_METHODS)
# Bytes never allowed in a request target: controls, space and DEL (and '#', separately).
_NOT_IN_TARGET = bytes(range(0x21)) + b"\x7f"
# Host values already found valid (a pure function of the string, so remembering them is
# exact); bounded, so a client sending endless distinct names cannot grow it.
_GOOD_HOSTS: dict[str, bool] = {}
_GOOD_HOSTS_MAX = 512
# Request lines already found valid, the same way (short ones only: at most 128 KiB).
_GOOD_LINES: dict[bytes, bool] = {}
_GOOD_LINES_MAX = 512
_GOOD_LINE_MAX = 256


class StrictError(Exception):
    """A request refused before it reaches any app; ``status`` is what the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Verdict:
    """What a valid request head means for routing and forwarding.

    (A plain class, not a dataclass: compiled, it is made in one native call.)"""

    host: str  # the effective host (authority of an absolute-form target, else Host)
    target: str  # origin-form target for the app ("*" for OPTIONS *)
    absolute: bool  # the client sent absolute-form
    host_replaced: bool  # the app must get ``host`` as its Host header
    content_length: int | None  # None: no Content-Length header
    chunked: bool  # Transfer-Encoding: chunked

    def __init__(self, host: str, target: str, absolute: bool, host_replaced: bool,
                 content_length: int | None, chunked: bool) -> None:
        self.host = host
        self.target = target
        self.absolute = absolute
        self.host_replaced = host_replaced
        self.content_length = content_length
        self.chunked = chunked

    def __repr__(self) -> str:
        return (f"Verdict(host={self.host!r}, target={self.target!r}, "
                f"absolute={self.absolute}, host_replaced={self.host_replaced}, "
                f"content_length={self.content_length}, chunked={self.chunked})")


def check_host(value: str) -> str:
    """``value`` if it is a valid ``host[:port]`` (RFC 9110 7.2), else raise 400."""
    if value in _GOOD_HOSTS:
        return value
    _check_host(value)
    if len(_GOOD_HOSTS) < _GOOD_HOSTS_MAX:
        _GOOD_HOSTS[value] = True
    return value


def _check_host(value: str) -> None:
    if not value:
        raise StrictError(400, "empty Host")
    if any(c in value for c in "@/\\?#, \t") or not value.isascii():
        raise StrictError(400, "malformed Host")
    host, port = value, None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise StrictError(400, "malformed Host")
        host, rest = value[: end + 1], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise StrictError(400, "malformed Host")
            port = rest[1:]
        if not _IPV6.match(host):
            raise StrictError(400, "malformed Host")
    else:
        if value.count(":") > 1:
            raise StrictError(400, "malformed Host")
        if ":" in value:
            host, port = value.split(":", 1)
        if not host or not _REG_NAME.match(host):
            raise StrictError(400, "malformed Host")
    if port is not None and (not _PORT.match(port) or int(port) > 65535):
        raise StrictError(400, "malformed Host port")


def check_version(version: tuple[int, int]) -> None:
    """Only HTTP/1.0 and HTTP/1.1 are spoken on an HTTP/1 connection."""
    if version in ((1, 0), (1, 1)):
        return
    if version[0] >= 2:
        raise StrictError(505, f"HTTP/{version[0]}.{version[1]} is not spoken here")
    raise StrictError(400, "unsupported HTTP version")


def check_method(method: str) -> None:
    """A token, and not one of the refused methods (405)."""
    if method in _PLAIN_METHODS:
        return
    if not _TOKEN.match(method.encode("latin-1", "replace")):
        raise StrictError(400, "malformed method")
    if method.upper() in REFUSED_METHODS:
        raise StrictError(405, f"{method} is not allowed")


def split_target(method: str, target: str) -> tuple[str | None, str]:
    """(authority or None, origin-form target) of a request target; raise when invalid."""
    if len(target) > MAX_TARGET:
        raise StrictError(414, "request target too long")
    if not target:
        raise StrictError(400, "empty request target")
    if "#" in target:
        raise StrictError(400, "fragment in request target")
    if not (target.isascii() and target.isprintable()) or " " in target:
        raise StrictError(400, "invalid character in request target")
    if target == "*":
        if method != "OPTIONS":
            raise StrictError(400, "asterisk-form is only for OPTIONS")
        return None, "*"
    if target.startswith("/"):
        if target.startswith("//"):
            # Not ambiguous per se, but never an authority: keep as a path.
            return None, target
        return None, target
    lower = target[:8].lower()
    for scheme in ("http://", "https://"):
        if lower.startswith(scheme):
            rest = target[len(scheme) :]
            cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            authority, origin = rest[:cut], rest[cut:]
            if "@" in authority:
                raise StrictError(400, "userinfo in request target")
            check_host(authority)
            if not origin.startswith("/"):
                origin = "/" + origin
            return authority, origin
    raise StrictError(400, "malformed request target")


def check_framing(version: tuple[int, int],
                  headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked) of a request; raise on anything ambiguous."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low == b"content-length":
            lengths.append(value)
        elif low == b"transfer-encoding":
            codings.append(value)
    if codings:
        if version != (1, 1):
            raise StrictError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise StrictError(400, "both Transfer-Encoding and Content-Length")
        if len(codings) > 1:
            raise StrictError(400, "repeated Transfer-Encoding")
        tokens = [t.strip(b" \t").lower() for t in codings[0].split(b",")]
        if tokens != [b"chunked"] or codings[0] != codings[0].strip(b" \t"):
            if all(_TOKEN.match(t) for t in tokens) and tokens[-1] != b"chunked":
                raise StrictError(501, "unsupported transfer coding")
            raise StrictError(400, "only Transfer-Encoding: chunked is accepted")
        return None, True
    if len(lengths) > 1:
        raise StrictError(400, "repeated Content-Length")
    if lengths:
        if not _DIGITS.match(lengths[0]) or len(lengths[0]) > 18:
            raise StrictError(400, "malformed Content-Length")
        return int(lengths[0]), False
    return None, False


def check_headers(headers: list[tuple[bytes, bytes]], max_size: int,
                  tokens_checked: bool = False) -> None:
    """Names are tokens, values have no NUL/CR/LF; the whole block fits ``max_size`` (431).

    ``tokens_checked``: the parser (llhttp, strict) refused bad names and control bytes
    in values already; only the size is left."""
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        if tokens_checked:
            continue
        if not _TOKEN.match(name):
            raise StrictError(400, "malformed header name")
        if _CTL.search(value):
            raise StrictError(400, "control character in a header value")
    if size > max_size:
        raise StrictError(431, "request header block too large")


_REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])$")


def check_request_line(line: bytes) -> None:
    """The raw request line (without CRLF) is ``method SP target SP HTTP/d.d``, for
    HTTP/1.0 or 1.1 (505 for a higher major version); llhttp is lenient about spaces."""
    if line in _GOOD_LINES:
        return
    # The common line ("GET /path HTTP/1.1") is checked with a few byte operations; any
    # other goes through the full pattern, which also says what is wrong with it.
    if line.endswith(b" HTTP/1.1") or line.endswith(b" HTTP/1.0"):
        space = line.find(b" ")
        end = len(line) - 9
        if 0 < space < end and line.find(b" ", space + 1) == end:
            method = line[:space]
            target = line[space + 1:end]
            if (method in _PLAIN_METHODS_RAW or _TOKEN.match(method)) and target.isascii() \
                    and len(target.translate(None, _NOT_IN_TARGET)) == len(target):
                if len(line) <= _GOOD_LINE_MAX and len(_GOOD_LINES) < _GOOD_LINES_MAX:
                    _GOOD_LINES[line] = True
                return
    match = _REQUEST_LINE.match(line)
    if match is None:
        raise StrictError(400, "malformed request line")
    check_version((int(match.group(3)), int(match.group(4))))


def check_request(method: str, target: str, version: tuple[int, int],
                  headers: list[tuple[bytes, bytes]], *, max_header_size: int,
                  tokens_checked: bool = False) -> Verdict:
    """The verdict on one parsed request head; raises ``StrictError`` with the status.
    (``tokens_checked``: see ``check_headers``.)"""
    check_version(version)
    check_method(method)
    authority, origin = split_target(method, target)
    check_headers(headers, max_header_size, tokens_checked)
    # Host, Content-Length and Transfer-Encoding in one pass; the names' lengths sort
    # out nearly every other header before any lower-casing.
    host_value: bytes | None = None
    hosts = 0
    framing = False
    for name, value in headers:
        size = len(name)
        if size == 4:
            if name.lower() == b"host":
                hosts += 1
                host_value = value
        elif size == 14 or size == 17:
            framing = True
    if not hosts or host_value is None:
        raise StrictError(400, "missing Host header")
    if hosts > 1:
        raise StrictError(400, "repeated Host header")
    host = check_host(host_value.decode("latin-1"))
    length, chunked = check_framing(version, headers) if framing else (None, False)
    effective = authority if authority is not None else host
    return Verdict(effective, origin, authority is not None,
                   authority is not None and authority != host, length, chunked)


def strip_h2c(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers without ``HTTP2-Settings`` and without ``h2c`` among the Upgrade tokens."""
    if not any(n.lower() in (b"upgrade", b"http2-settings") for n, _ in headers):
        return headers
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        low = name.lower()
        if low == b"http2-settings":
            continue
        if low == b"upgrade":
            kept = [t.strip() for t in value.split(b",")
                    if t.strip().lower() not in (b"h2c", b"")]
            if not kept:
                continue
            value = b", ".join(kept)
        out.append((name, value))
    return out
