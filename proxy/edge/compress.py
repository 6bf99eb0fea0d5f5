"""Compression of app responses at the edge: the choice (pure) and a streaming encoder.

Theory of operation
-------------------
When the app's response head arrives, the flow asks ``choose`` whether to compress it.
The answer depends only on the request's ``Accept-Encoding`` and method, the response's
status and head fields, and the pool's ``Compression`` settings, so it is a pure
function, tested without sockets. A response is compressed when all of these hold:

- compression is enabled for the app's pool;
- the request is not ``HEAD`` and the status has a body that is the whole
  representation (not 1xx, 204, 206 or 304; no ``Content-Range``); the flow gives a
  ``HEAD`` the head a ``GET`` would get, without a length;
- the app did not encode it already (``Content-Encoding`` other than ``identity``) and
  did not forbid changes (``Cache-Control: no-transform``);
- its media type (parameters ignored) is one of the configured types; ``text/*`` covers
  every ``text/`` type except ``text/event-stream``, which is compressed only when named
  (an event stream is many small messages that must each go out at once);
- its length is unknown (streamed) or at least ``min_size``;
- the client accepts a coding we have (``br`` when the ``brotli`` package is importable,
  ``gzip``), by the q-values of ``Accept-Encoding`` (RFC 9110 12.5.3): the highest q wins,
  ``q=0`` refuses, ``*`` stands for every coding not named, ``x-gzip`` is ``gzip``, and
  an ``identity`` preferred over every coding we have means no compression. A request
  without ``Accept-Encoding`` is not compressed (as nginx does).

When the response qualifies by type, size and status, ``Vary: Accept-Encoding`` is added
whether or not this client gets it compressed, so that a cache keeps both variants
apart (nginx's ``gzip_vary``). A compressed answer loses ``Content-Length`` (HTTP/1.1
sends it chunked, HTTP/2 without a length) and ``Accept-Ranges``, and a strong ``ETag``
becomes weak (``W/``), as nginx does, because the bytes are no longer the app's.

The ``Encoder`` compresses as the body arrives: each piece read from the app is
compressed and flushed (``Z_SYNC_FLUSH``; brotli's ``flush``), so a streamed response
stays streamed and the edge never holds a whole large body. A body small enough to be
held whole (``flow.SMALL_BODY``) is compressed in one go (``whole``) and keeps a length.
"""

from __future__ import annotations

import zlib
from types import ModuleType
from typing import Final, Protocol, cast

from ..config.model import Compression

brotli: ModuleType | None
try:  # optional: brotli is offered only when the package is installed
    import brotli  # type: ignore[import-not-found, import-untyped, no-redef, unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

Headers = list[tuple[bytes, bytes]]

GZIP: Final = "gzip"
BROTLI: Final = "br"
NO_BODY_STATUSES: Final = frozenset({204, 206, 304})
STREAM_TYPE: Final = "text/event-stream"


def available() -> tuple[str, ...]:
    """The codings this process can produce, best first (brotli only when installed)."""
    return (BROTLI, GZIP) if brotli is not None else (GZIP,)


def parse_accept_encoding(value: bytes) -> dict[str, float]:
    """``Accept-Encoding`` as coding -> q (lower-case names; a malformed q counts as 0)."""
    result: dict[str, float] = {}
    for item in value.decode("latin-1").split(","):
        parts = item.split(";")
        name = parts[0].strip().lower()
        if not name:
            continue
        q = 1.0
        for param in parts[1:]:
            key, _, number = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(number.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:  # out of range or NaN: not acceptable
                    q = 0.0
        if name == "x-gzip":
            name = GZIP
        result[name] = max(q, result.get(name, q))
    return result


def accepted_coding(value: bytes | None, offered: tuple[str, ...]) -> str | None:
    """The coding of ``offered`` (best first) the client prefers, or None for none."""
    if value is None:
        return None
    accepted = parse_accept_encoding(value)
    star = accepted.get("*")
    best: str | None = None
    best_q = 0.0
    for coding in offered:
        q = accepted.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    if best is None:
        return None
    identity = accepted.get("identity")
    if identity is not None and identity > best_q:
        return None  # the client prefers the body as it is
    return best


def type_matches(content_type: bytes, types: tuple[str, ...]) -> bool:
    """Whether the media type of ``content_type`` (parameters ignored) is listed."""
    media = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
    if "/" not in media:
        return False
    major = media.split("/", 1)[0]
    for pattern in types:
        if pattern == media:
            return True
        if media == STREAM_TYPE:
            continue  # streamed events: only when named
        if pattern == "*/*" or (pattern.endswith("/*") and pattern[:-2] == major):
            return True
    return False


def _field(headers: Headers, name: bytes) -> bytes | None:
    """The values of field ``name`` (lower-case) joined by commas, or None."""
    values = [v for n, v in headers if n.lower() == name]
    if not values:
        return None
    return b", ".join(values)


def _tokens(value: bytes | None) -> set[bytes]:
    if value is None:
        return set()
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def eligible(method: str, status: int, headers: Headers, length: int | None,
             settings: Compression) -> bool:
    """Whether the response qualifies for compression at all, whoever asks for it
    (method, status, type, size, the app's own encoding and ``no-transform``)."""
    if not settings.enabled or method == "HEAD" or status < 200 or status in NO_BODY_STATUSES:
        return False
    if length is not None and length < settings.min_size:
        return False
    content_type = content_encoding = cache_control = None
    for name, value in headers:
        low = name.lower()
        if low == b"content-type":
            content_type = value
        elif low == b"content-encoding":
            content_encoding = value if content_encoding is None else content_encoding + b"," + value
        elif low == b"cache-control":
            cache_control = value if cache_control is None else cache_control + b"," + value
        elif low == b"content-range":
            return False
    if content_type is None or not type_matches(content_type, settings.types):
        return False
    if content_encoding is not None and _tokens(content_encoding) - {b"identity"}:
        return False
    return b"no-transform" not in _tokens(cache_control)


def choose(method: str, accept_encoding: bytes | None, status: int, headers: Headers,
           length: int | None, settings: Compression,
           offered: tuple[str, ...] | None = None) -> tuple[str | None, bool]:
    """``(coding or None, vary)``: how to send this response, and whether it needs
    ``Vary: Accept-Encoding`` (it qualifies, whatever this client accepts)."""
    if not eligible(method, status, headers, length, settings):
        return None, False
    coding = accepted_coding(accept_encoding, available() if offered is None else offered)
    return coding, True


def with_vary(headers: Headers) -> Headers:
    """``headers`` with ``Accept-Encoding`` in ``Vary`` (merged into the app's)."""
    present = _tokens(_field(headers, b"vary"))
    if b"accept-encoding" in present or b"*" in present:
        return headers
    out = list(headers)
    for index, (name, value) in enumerate(out):
        if name.lower() == b"vary" and value.strip():
            out[index] = (name, value + b", Accept-Encoding")
            return out
    out = [(n, v) for n, v in out if n.lower() != b"vary"]  # an empty Vary goes
    out.append((b"Vary", b"Accept-Encoding"))
    return out


def encoded_headers(headers: Headers, coding: str) -> Headers:
    """The head of a response compressed with ``coding``: no length or ranges, the
    coding named, ``Vary`` merged, a strong ``ETag`` weakened."""
    out: Headers = []
    for name, value in headers:
        low = name.lower()
        if low in (b"content-length", b"accept-ranges", b"content-encoding"):
            continue
        if low == b"etag" and not value.startswith(b"W/"):
            value = b"W/" + value
        out.append((name, value))
    out.append((b"Content-Encoding", coding.encode("ascii")))
    return with_vary(out)


class _Brotli(Protocol):
    """What ``brotli.Compressor`` offers."""

    def process(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> bytes: ...


class Encoder:
    """Compresses one response body as it arrives (``chunk`` per piece, then ``finish``)."""

    __slots__ = ("coding", "_zlib", "_brotli")

    def __init__(self, coding: str, settings: Compression) -> None:
        self.coding = coding
        self._zlib: zlib._Compress | None = None
        self._brotli: _Brotli | None = None
        if coding == GZIP:
            self._zlib = zlib.compressobj(settings.level, zlib.DEFLATED, 31, 8)
        elif coding == BROTLI and brotli is not None:
            self._brotli = cast(_Brotli, brotli.Compressor(quality=settings.brotli_level))
        else:
            raise ValueError(f"cannot encode {coding!r} here")

    def chunk(self, data: bytes) -> bytes:
        """``data`` compressed and flushed, so the client can decode all of it now."""
        if not data:
            return b""
        if self._zlib is not None:
            return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        compressor = self._brotli
        assert compressor is not None
        return compressor.process(data) + compressor.flush()

    def finish(self) -> bytes:
        """The end of the compressed stream."""
        if self._zlib is not None:
            return self._zlib.flush(zlib.Z_FINISH)
        assert self._brotli is not None
        return self._brotli.finish()

    def whole(self, data: bytes) -> bytes:
        """A whole body compressed in one go (no flush points: the best ratio)."""
        if self._zlib is not None:
            return self._zlib.compress(data) + self._zlib.flush(zlib.Z_FINISH)
        compressor = self._brotli
        assert compressor is not None
        return compressor.process(data) + compressor.finish()
