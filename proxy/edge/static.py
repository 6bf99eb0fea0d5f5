"""Static files served by the workers: the I/O around ``proxy.edge.staticrules``.

Theory of operation
-------------------
A request routed to a ``static`` location (or an app's answer carrying
``X-Accel-Redirect``, see ``proxy.edge.flow``) comes here as a target path. ``answer``
makes it a ``FileAnswer``:

* the target becomes a path below ``root`` (``staticrules.relative_path``: refused
  spellings are a 404), which is opened (``O_NONBLOCK``, so a FIFO in the tree cannot
  block the worker); the path the kernel actually opened, symbolic links resolved, is
  read back from ``/proc/self/fd`` and must still lie inside ``root`` (else 404). A
  directory without its ``/`` is a 301 to it; with it, its ``index`` file, never a
  listing (403 without one, as nginx); anything but a regular file is a 404.
* with ``precompressed``, a ``name.br`` / ``name.gz`` sibling the client accepts is
  opened instead (same checks) and sent with ``Content-Encoding``; ``Vary:
  Accept-Encoding`` goes on every answer of such a location.
* ``staticrules.plan`` decides 200 / 206 / 304 / 412 / 416 from the file's size and
  time and the request's conditional and range fields.

A body up to ``SMALL`` bytes is read at once and goes out with the head in one write.
A larger one is a ``FileSender``: on a plain HTTP/1.1 connection it is sent with
``os.sendfile`` (zero copy) straight on the client's socket once the transport's own
buffer is empty (uvloop has no ``loop.sendfile``; a duplicate of the socket's descriptor
is watched with ``add_writer`` from the first full socket buffer to the end, so the
transport's own registration is untouched); over TLS and HTTP/2 it is read with ``os.pread`` in
``CHUNK`` pieces, each handed to the protocol, pausing while the protocol says the
client is behind (``pause``/``resume``). Either way at most ``TICK`` bytes go per turn
of the event loop, so one fast download does not starve the other connections, and
memory stays flat whatever the file's size; a client that takes nothing for
``SEND_TIMEOUT`` seconds is cut off. Failures to open or read map to statuses in
``errors.from_file_error``.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from email.utils import formatdate
from typing import Protocol

from ..config.model import StaticLocation
from . import staticrules as rules
from .errors import (
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    ProxyError,
    RangeNotSatisfiable,
    from_file_error,
)

SMALL = 64 * 1024  # a body up to this size is read at once and sent with its head
CHUNK = 256 * 1024  # pread size over TLS and HTTP/2
SENDFILE_MAX = 4 * 1024 * 1024  # bytes asked of one sendfile call
TICK = 8 * 1024 * 1024  # bytes sent per turn of the event loop before yielding
SEND_TIMEOUT = 60.0  # seconds a client may take no byte of a file (nginx's send_timeout)
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
# The header fields of an app's answer kept when X-Accel-Redirect replaces its body
# (those nginx keeps: its upstream header table's "redirect" flag).
ACCEL_KEPT = frozenset({b"content-type", b"content-disposition", b"cache-control",
                        b"expires", b"set-cookie"})


class Owner(Protocol):
    """The flow a ``FileSender`` works for."""

    def static_end(self, sent: int) -> None:
        """The whole body went out."""

    def static_abort(self, sent: int) -> None:
        """The body broke off (a read error, the client gone): cut the client off."""


class Sink(Protocol):
    """Where a ``FileSender`` puts the body (the flow's ``Downstream``)."""

    def respond_body(self, body: list[bytes], end: bool) -> None: ...


class FileAnswer:
    """A static answer: head, the body read so far, and the sender for the rest.

    (A plain class, made once per answer: a dataclass's ``__init__`` runs as Python
    even when this module is compiled.)"""

    status: int
    headers: list[tuple[bytes, bytes]]
    length: int | None
    bodyless: bool
    body: list[bytes]
    fd: int  # the open file, when a ``FileSender`` must send the rest (else -1)
    offset: int
    remaining: int

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None,
                 bodyless: bool, body: list[bytes], fd: int = -1, offset: int = 0,
                 remaining: int = 0) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self.bodyless = bodyless
        self.body = body
        self.fd = fd
        self.offset = offset
        self.remaining = remaining


def _open(root: str, relative: str) -> tuple[int, os.stat_result]:
    """Open ``relative`` below ``root``; NotFound when what was opened lies outside."""
    name = os.path.join(root, relative) if relative else root
    fd = os.open(name, _OPEN_FLAGS)
    try:
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: resolve by name
            real = os.path.realpath(name)
        if not rules.inside(root, real):
            raise NotFound("no such file")
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _open_file(root: str, relative: str) -> tuple[int, os.stat_result]:
    """Open a regular file (not a directory); errors mapped to statuses."""
    try:
        fd, info = _open(root, relative)
    except OSError as exc:
        raise from_file_error(exc, relative) from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotFound("no such file")
    return fd, info


class _Found:
    """A resolved file: open (``fd``), or read whole (``data``: a small file, then
    kept in ``SmallFiles`` for ``SmallFiles.VALID`` seconds)."""

    __slots__ = ("fd", "data", "meta", "kind", "coding", "path", "expires")

    def __init__(self, fd: int, data: bytes | None, meta: rules.FileMeta, kind: bytes,
                 coding: bytes | None, path: str) -> None:
        self.fd = fd
        self.data = data
        self.meta = meta
        self.kind = kind  # Content-Type by the name
        self.coding = coding  # Content-Encoding of a precompressed sibling
        self.path = path  # below root, for messages
        self.expires = 0.0


class SmallFiles:
    """Small files read recently, whole, with their metadata: a request for one within
    ``VALID`` seconds of its reading opens, checks and reads nothing (as nginx's
    ``open_file_cache`` keeps descriptors and metadata; a change to a file is seen at
    most ``VALID`` seconds late, a replaced file at once after that). Bounded by
    ``MAX_BYTES`` of file data and ``MAX_ENTRIES`` entries per worker."""

    VALID = 1.0
    MAX_BYTES = 8 * 1024 * 1024
    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str, str, str], _Found] = {}
        self._bytes = 0

    def get(self, key: tuple[str, str, str, str, str], now: float) -> _Found | None:
        """The entry for ``key`` while it is valid."""
        found = self._entries.get(key)
        if found is None:
            return None
        if found.expires <= now:
            self._drop(key)
            return None
        return found

    def put(self, key: tuple[str, str, str, str, str], found: _Found, now: float) -> None:
        """Keep ``found`` (its ``data`` read) for ``VALID`` seconds, room permitting."""
        size = len(found.data or b"")
        if size > self.MAX_BYTES // 16:
            return
        self._drop(key)
        entries = self._entries
        if len(entries) >= self.MAX_ENTRIES or self._bytes + size > self.MAX_BYTES:
            for old in [k for k, v in entries.items() if v.expires <= now]:
                self._drop(old)
            while entries and (len(entries) >= self.MAX_ENTRIES
                               or self._bytes + size > self.MAX_BYTES):
                self._drop(next(iter(entries)))  # the oldest
        found.expires = now + self.VALID
        entries[key] = found
        self._bytes += size

    def _drop(self, key: tuple[str, str, str, str, str]) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= len(found.data or b"")


SMALL_FILES = SmallFiles()  # one per worker process


class _Clock:
    """The ``Date`` field of the current second."""

    def __init__(self) -> None:
        self.second = -1
        self.field = (b"Date", b"")


_CLOCK = _Clock()


def date_field() -> tuple[bytes, bytes]:
    """``Date`` (RFC 9110 6.6.1: an origin server with a clock sends it), made once a
    second."""
    now = int(time.time())
    clock = _CLOCK
    if clock.second != now:
        clock.second = now
        clock.field = (b"Date", formatdate(now, usegmt=True).encode("ascii"))
    return clock.field


def _resolve(location: StaticLocation, target: str, base: str,
             accept: str | None) -> _Found | FileAnswer:
    """The file ``target`` names (open), or the 301 of a directory without its ``/``;
    ProxyError for 403 / 404."""
    relative = rules.relative_path(target, base)
    if relative is None:
        raise NotFound("no such file")
    root = location.root
    path = relative.path
    try:
        fd, info = _open(root, path)
    except OSError as exc:
        raise from_file_error(exc, path) from None
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        if not relative.trailing_slash:
            location_value = rules.redirect_to_directory(target).encode("latin-1")
            return FileAnswer(301, [(b"Location", location_value), date_field()], 0, False,
                              [])
        if location.index is None:
            raise Forbidden("directory listings are not served")
        path = f"{path}/{location.index}" if path else location.index
        try:
            fd, info = _open_file(root, path)
        except NotFound:
            raise Forbidden("directory listings are not served") from None
    elif not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotFound("no such file")
    kind = rules.content_type(path).encode("latin-1")
    coding: bytes | None = None
    if location.precompressed:
        for name, suffix in rules.choose_encoding(accept):
            try:
                sibling, sibling_info = _open_file(root, path + suffix)
            except ProxyError:
                continue
            os.close(fd)
            fd, info = sibling, sibling_info
            coding = name.encode("ascii")
            break
    return _Found(fd, None, rules.FileMeta(info.st_size, int(info.st_mtime)), kind, coding,
                  path)


def answer(location: StaticLocation, method: str, target: str, base: str,
           headers: list[tuple[bytes, bytes]],
           kept: list[tuple[bytes, bytes]] | None = None) -> FileAnswer:
    """The answer of ``location`` (mounted at ``base``) to ``method`` on ``target``,
    with the request's ``headers``; ``kept``: an app's fields an X-Accel-Redirect
    keeps. Raises ProxyError for 403 / 404 / 405 / 412 / 416."""
    if method not in ("GET", "HEAD"):
        raise MethodNotAllowed("static files answer GET and HEAD only")
    accept = _field(headers, b"accept-encoding") if location.precompressed else None
    key = (location.name, location.root, base, target.split("?", 1)[0], accept or "")
    now = time.monotonic()
    found = SMALL_FILES.get(key, now)
    if found is None:
        resolved = _resolve(location, target, base, accept)
        if isinstance(resolved, FileAnswer):
            return resolved
        found = resolved
        if found.meta.size <= SMALL:
            try:
                data = os.pread(found.fd, found.meta.size, 0)
            except OSError as exc:
                raise from_file_error(exc, found.path) from None
            finally:
                os.close(found.fd)
                found.fd = -1
            if len(data) != found.meta.size:  # the file changed since fstat
                raise ProxyError("the file changed while it was read", detail=found.path)
            found.data = data
            SMALL_FILES.put(key, found, now)
    try:
        return _reply(found, location, method, headers, kept)
    except BaseException:
        if found.fd >= 0:
            os.close(found.fd)
        raise


def _reply(found: _Found, location: StaticLocation, method: str,
           headers: list[tuple[bytes, bytes]],
           kept: list[tuple[bytes, bytes]] | None) -> FileAnswer:
    """The answer for a resolved file; its descriptor (if any) is the answer's, or closed."""
    fields: list[tuple[bytes, bytes]] = [date_field()]
    kind = found.kind
    for name, value in kept or ():
        if name.lower() == b"content-type":
            kind = value  # the app's own type wins, as in nginx
    fields.append((b"Content-Type", kind))
    if found.coding is not None:
        fields.append((b"Content-Encoding", found.coding))
    chosen = rules.plan(found.meta, rules.Conditions.from_headers(headers))
    if chosen.status in (412, 416):
        if chosen.status == 412:
            raise PreconditionFailed("the file does not meet the request's preconditions")
        error = RangeNotSatisfiable("no part of the range lies within the file")
        error.extra_headers = [(n.encode("latin-1"), v.encode("latin-1"))
                               for n, v in chosen.headers]
        raise error
    fields += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in chosen.headers]
    own_cache = False
    for name, value in kept or ():
        low = name.lower()
        if low != b"content-type":
            fields.append((name, value))
            own_cache = own_cache or low == b"cache-control"
    if location.cache_control is not None and not own_cache:
        fields.append((b"Cache-Control", location.cache_control.encode("latin-1")))
    if location.precompressed:
        fields.append((b"Vary", b"Accept-Encoding"))
    data = found.data
    if chosen.status == 304 or method == "HEAD" or chosen.length == 0 or data is not None:
        if found.fd >= 0:
            os.close(found.fd)
            found.fd = -1
        if chosen.status == 304:
            fields = [(n, v) for n, v in fields
                      if n not in (b"Content-Type", b"Content-Encoding")]
            return FileAnswer(304, fields, None, True, [])
        if method == "HEAD" or chosen.length == 0:
            return FileAnswer(chosen.status, fields, chosen.length, method == "HEAD", [])
        assert data is not None
        body = data if chosen.length == len(data) \
            else data[chosen.start:chosen.start + chosen.length]
        return FileAnswer(chosen.status, fields, chosen.length, False, [body])
    fd = found.fd
    found.fd = -1
    return FileAnswer(chosen.status, fields, chosen.length, False, [], fd, chosen.start,
                      chosen.length)


def _field(headers: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    for name, value in headers:
        if name.lower() == wanted:
            return value.decode("latin-1")
    return None


def accel_target(value: bytes) -> str | None:
    """The path of an ``X-Accel-Redirect`` value (a path, perhaps with a query, which is
    dropped); None for anything else (nginx's named locations ``@x`` included)."""
    text = value.decode("latin-1").strip()
    if not text.startswith("/"):
        return None
    return text.split("?", 1)[0]


class FileSender:
    """Sends the rest of a static body: ``sendfile`` on a plain socket, else ``pread``."""

    def __init__(self, owner: Owner, down: Sink, fd: int, offset: int, remaining: int,
                 transport: asyncio.Transport | None) -> None:
        self.owner = owner
        self.down = down
        self.fd = fd
        self.offset = offset
        self.remaining = remaining
        self.sent = 0
        self.loop = asyncio.get_running_loop()
        self.transport = transport
        self.sock = -1  # a duplicate of the client socket's descriptor (sendfile)
        self.paused = False
        self.closed = False
        self.scheduled: asyncio.Handle | None = None
        self.watching = False
        self.progress_at = time.monotonic()
        self.watchdog: asyncio.TimerHandle | None = self.loop.call_later(
            SEND_TIMEOUT, self._check_progress)

    def start(self) -> None:
        """Begin sending (the head went out already)."""
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() == 0:
            sock = transport.get_extra_info("socket")
            fileno = sock.fileno() if sock is not None else -1
            if fileno >= 0:
                self.sock = os.dup(fileno)
                self._sendfile()
                return
        self._pump()

    def pause(self) -> None:
        """The client is behind (the protocol's write buffer is full)."""
        self.paused = True

    def resume(self) -> None:
        """The client can take more."""
        if self.paused:
            self.paused = False
            if self.sock < 0 and self.scheduled is None and not self.closed:
                self.scheduled = self.loop.call_soon(self._pump)

    def close(self) -> None:
        """Stop and release the file (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.scheduled is not None:
            self.scheduled.cancel()
            self.scheduled = None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.watching:
            self.loop.remove_writer(self.sock)
            self.watching = False
        if self.sock >= 0:
            os.close(self.sock)
            self.sock = -1
        os.close(self.fd)

    def _pump(self) -> None:
        self.scheduled = None
        budget = TICK
        while not self.paused and not self.closed:
            try:
                data = os.pread(self.fd, min(CHUNK, self.remaining), self.offset)
            except OSError:
                self._abort()
                return
            if not data:  # the file shrank since it was opened
                self._abort()
                return
            self.offset += len(data)
            self.remaining -= len(data)
            self.sent += len(data)
            self.progress_at = time.monotonic()
            last = self.remaining == 0
            self.down.respond_body([data], last)
            if last:
                self._end()
                return
            budget -= len(data)
            if budget <= 0:
                break
        if not self.paused and not self.closed:
            self.scheduled = self.loop.call_soon(self._pump)

    def _sendfile(self) -> None:
        """Send until the socket is full (or ``TICK`` bytes went); the socket stays
        watched until the end, so each writable event costs no re-registration."""
        budget = TICK
        while not self.closed:
            try:
                count = os.sendfile(self.sock, self.fd, self.offset,
                                    min(SENDFILE_MAX, self.remaining))
            except BlockingIOError:
                break
            except OSError:
                self._abort()
                return
            if count == 0:  # the file shrank since it was opened
                self._abort()
                return
            self.offset += count
            self.remaining -= count
            self.sent += count
            self.progress_at = time.monotonic()
            if self.remaining == 0:
                self._end()
                return
            budget -= count
            if budget <= 0:
                break  # the loop's other work first; the writer brings us back
        if not self.closed and not self.watching:
            self.watching = True
            self.loop.add_writer(self.sock, self._sendfile)

    def _check_progress(self) -> None:
        """A client that took nothing for ``SEND_TIMEOUT`` seconds is cut off. (Over TLS
        and HTTP/2, progress is a piece handed to the protocol, which happens only
        when the client took the ones before.)"""
        self.watchdog = None
        if self.closed:
            return
        idle = time.monotonic() - self.progress_at
        if idle >= SEND_TIMEOUT:
            self._abort()
            return
        self.watchdog = self.loop.call_later(SEND_TIMEOUT - idle, self._check_progress)

    def _end(self) -> None:
        self.close()
        self.owner.static_end(self.sent)

    def _abort(self) -> None:
        self.close()
        self.owner.static_abort(self.sent)
