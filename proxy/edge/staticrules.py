"""The rules of serving a static file: pure, no I/O (``proxy.edge.static`` does the I/O).

Theory of operation
-------------------
A request for a static location goes through four decisions, each a function here:

1. ``relative_path``: the request target becomes a path below the location's ``root``,
   or None (404). The path is percent-decoded exactly once; encoded slashes and
   backslashes (``%2F``, ``%5C``), NUL, backslashes and ``.`` / ``..`` segments are
   refused rather than resolved, so no spelling of a path can climb out of ``root``.
   (``inside`` is the second guard, applied by the I/O side to the path the kernel
   actually opened, after symbolic links: a link that points outside is a 404.)
2. ``choose_encoding``: with ``precompressed``, which sibling (``name.br``,
   ``name.gz``) the client's ``Accept-Encoding`` takes, by q-value (ties: br first).
3. ``plan``: the answer for the file's ``FileMeta`` and the request's conditional and
   range headers, the way nginx answers them (its not_modified and range filters):
   ``If-Unmodified-Since`` / ``If-Match`` that fail give 412; ``If-Modified-Since``
   (exact match of the time, nginx's default) and ``If-None-Match`` give 304 when
   every one present says "not modified"; then one ``Range`` gives 206, a range that
   cannot be satisfied 416, and several ranges the whole file (200), as RFC 9110
   allows; ``If-Range`` that does not match gives the whole file.
4. ``content_type``: the MIME type by the standard library's ``mimetypes``.

``etag`` is nginx's (``"hex mtime-hex size"``), so a cache that moved from nginx to
Bastion keeps validating.
"""

from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import unquote_to_bytes

# Encoded characters a path must never carry: "/" and "\" (they would change which
# directory is meant) and NUL (it ends a name in the kernel).
_FORBIDDEN_ENCODED = ("%2f", "%5c", "%00")
PRECOMPRESSED = (("br", ".br"), ("gzip", ".gz"))  # preference order on equal q
_MIME = mimetypes.MimeTypes()


@dataclass(frozen=True)
class Relative:
    """A request path below a static location: its segments, and whether it ended with
    ``/`` (a directory was asked for)."""

    segments: tuple[str, ...]
    trailing_slash: bool

    @property
    def path(self) -> str:
        """The segments joined with ``/`` (empty for the location's root)."""
        return "/".join(self.segments)


def relative_path(target: str, base: str) -> Relative | None:
    """The part of origin-form ``target`` below path base ``base``, or None (404)."""
    raw = target.split("?", 1)[0]
    lowered = raw.lower()
    if any(code in lowered for code in _FORBIDDEN_ENCODED):
        return None
    try:
        decoded = os.fsdecode(unquote_to_bytes(raw)) if "%" in raw else raw
    except ValueError:
        return None
    if "\0" in decoded or "\\" in decoded:
        return None
    if base != "/":
        if decoded != base and not decoded.startswith(base + "/"):
            return None
        decoded = decoded[len(base):]
    parts = decoded.split("/")
    segments = tuple(part for part in parts if part)
    if any(part in (".", "..") for part in segments):
        return None
    return Relative(segments, decoded.endswith("/"))


def inside(root: str, real: str) -> bool:
    """True when resolved path ``real`` is ``root`` or lies below it (both resolved)."""
    return real == root or real.startswith(root.rstrip("/") + "/")


def accepted(header: str | None) -> dict[str, float]:
    """``Accept-Encoding`` as {coding: q}; ``*`` stands for codings not named."""
    result: dict[str, float] = {}
    if not header:
        return result
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(value.strip())))
                except ValueError:
                    q = 0.0
        result[name] = q
    return result


def choose_encoding(header: str | None) -> list[tuple[str, str]]:
    """The precompressed siblings to try, best first: [(coding, suffix), ...]; q=0 refuses."""
    codings = accepted(header)
    star = codings.get("*", 0.0)
    ranked: list[tuple[float, int, str, str]] = []
    for order, (coding, suffix) in enumerate(PRECOMPRESSED):
        q = codings.get(coding, codings.get("x-gzip", star) if coding == "gzip" else star)
        if q > 0:
            ranked.append((-q, order, coding, suffix))
    ranked.sort()
    return [(coding, suffix) for _, _, coding, suffix in ranked]


def content_type(name: str) -> str:
    """The MIME type of a file called ``name`` (application/octet-stream when unknown,
    or when the name says it is compressed: a ``.gz`` asked for is served as is)."""
    kind, encoding = _MIME.guess_type(name, strict=False)
    if kind is None or encoding is not None:
        return "application/octet-stream"
    return kind


@dataclass(frozen=True)
class FileMeta:
    """What the answer needs to know of an opened file: its size and time, and the
    validators made from them (``etag``: nginx's strong tag, hex mtime-hex size, quoted;
    ``last_modified``: the IMF-fixdate)."""

    size: int
    mtime: int  # whole seconds, as Last-Modified has them
    etag: str = field(init=False, compare=False)
    last_modified: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "etag", f'"{self.mtime:x}-{self.size:x}"')
        object.__setattr__(self, "last_modified", formatdate(self.mtime, usegmt=True))


@dataclass(frozen=True)
class Conditions:
    """The request's header values that decide the answer (None: absent)."""

    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_unmodified_since: str | None = None
    range: str | None = None
    if_range: str | None = None

    @classmethod
    def from_headers(cls, headers: list[tuple[bytes, bytes]]) -> Conditions:
        """The conditions among a request's header fields (the first of each counts)."""
        found: dict[str, str] = {}
        for name, value in headers:
            key = _CONDITION_FIELDS.get(name.lower())
            if key is not None and key not in found:
                found[key] = value.decode("latin-1")
        return cls(**found) if found else _NO_CONDITIONS


_CONDITION_FIELDS = {b"if-match": "if_match", b"if-none-match": "if_none_match",
                     b"if-modified-since": "if_modified_since",
                     b"if-unmodified-since": "if_unmodified_since", b"range": "range",
                     b"if-range": "if_range"}
_NO_CONDITIONS = Conditions()


class Plan:
    """The answer: status, the fields that go with it, and the part of the file sent
    (``start`` and ``length``; length 0 and no body for 304 / 412 / 416).

    (A plain class: one is made per request, and a compiled dataclass's ``__init__``
    would run as Python.)"""

    status: int
    headers: list[tuple[str, str]]
    start: int
    length: int

    def __init__(self, status: int, headers: list[tuple[str, str]] | None = None,
                 start: int = 0, length: int = 0) -> None:
        self.status = status
        self.headers = headers if headers is not None else []
        self.start = start
        self.length = length

    def __repr__(self) -> str:
        return (f"Plan(status={self.status}, headers={self.headers!r}, start={self.start}, "
                f"length={self.length})")


def http_time(value: str) -> int | None:
    """Seconds since the epoch of an HTTP date, or None when it is not one."""
    try:
        moment = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    return int(moment.timestamp())


def _etag_matches(header: str, etag: str, weak: bool) -> bool:
    """nginx's test: ``*``, or ``etag`` among the listed tags (weak comparison drops W/)."""
    if header.strip() == "*":
        return True
    own = etag
    if own.startswith("W/"):
        if not weak:
            return False
        own = own[2:]
    for tag in header.split(","):
        tag = tag.strip()
        if weak and tag.startswith("W/"):
            tag = tag[2:]
        if tag == own:
            return True
    return False


def parse_range(header: str, size: int) -> tuple[int, int] | str:
    """One ``Range`` header against a file of ``size`` bytes, as nginx reads it: a
    (start, end-exclusive) pair, "whole" (serve everything: not bytes, several ranges,
    or a range of the whole file), or "unsatisfiable" (416)."""
    text = header.strip()
    if text[:6].lower() != "bytes=":
        return "whole"
    ranges: list[tuple[int, int]] = []
    total = 0
    for item in text[6:].split(","):
        spec = item.strip()
        first, dash, last = spec.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) \
                or (not first and not last):
            return "unsatisfiable"
        if not first:  # suffix: the last N bytes
            count = int(last)
            start = size - count if count < size else 0
            end = size
            if count == 0:
                start = size
        else:
            start = int(first)
            end = size if not last else min(int(last) + 1, size)
        if start < end:
            ranges.append((start, end))
            total += end - start
        elif start == 0:
            return "whole"
    if not ranges:
        return "unsatisfiable"
    if len(ranges) > 1 or total > size:
        return "whole"
    return ranges[0]


def plan(meta: FileMeta, conditions: Conditions) -> Plan:
    """The answer to a GET or HEAD for a file: see the module's rules."""
    etag = meta.etag
    validators = [("ETag", etag), ("Last-Modified", meta.last_modified)]
    if conditions.if_unmodified_since is not None:
        since = http_time(conditions.if_unmodified_since)
        if since is None or since < meta.mtime:
            return Plan(412)
    if conditions.if_match is not None and not _etag_matches(conditions.if_match, etag, False):
        return Plan(412)
    if conditions.if_modified_since is not None or conditions.if_none_match is not None:
        modified = False
        if conditions.if_modified_since is not None:
            modified = http_time(conditions.if_modified_since) != meta.mtime
        if not modified and conditions.if_none_match is not None:
            modified = not _etag_matches(conditions.if_none_match, etag, True)
        if not modified:
            return Plan(304, validators)
    whole = Plan(200, [*validators, ("Accept-Ranges", "bytes")], 0, meta.size)
    if conditions.range is None:
        return whole
    if conditions.if_range is not None:
        value = conditions.if_range.strip()
        if value.endswith('"'):
            if value != etag:
                return whole
        elif http_time(value) != meta.mtime:
            return whole
    chosen = parse_range(conditions.range, meta.size)
    if chosen == "whole":
        return whole
    if chosen == "unsatisfiable":
        return Plan(416, [("Content-Range", f"bytes */{meta.size}")])
    assert isinstance(chosen, tuple)
    start, end = chosen
    return Plan(206, [*validators, ("Content-Range", f"bytes {start}-{end - 1}/{meta.size}")],
                start, end - start)


def redirect_to_directory(target: str) -> str:
    """Where a directory asked for without its ``/`` goes (301, as nginx does)."""
    path, sep, query = target.partition("?")
    return path + "/" + (sep + query)
