"""The proxy's exceptions, and the one place where upstream failures become statuses.

Every failure on a request's way is a ``ProxyError`` carrying the HTTP status the client
gets; ``from_upstream`` maps what the upstream side raised (``proxy.edge.upstream``'s
errors, OSError, timeouts) to 502 or 504, the way httpcore's ``map_exceptions`` does.
"""

from __future__ import annotations

import asyncio
import errno

from .upstream import Closed, ConnectFailed, InvalidResponse, UpstreamBroken


class ProxyError(Exception):
    """A request that ends with an error page."""

    status = 500
    title = "Internal Server Error"

    def __init__(self, message: str = "", *, app: str = "", detail: str = "",
                 retry_after: int | None = None, body: str | None = None) -> None:
        super().__init__(message or self.title)
        self.message = message or self.title
        self.app = app
        self.detail = detail  # shown only with detailed_errors
        self.retry_after = retry_after
        self.body = body  # a complete HTML body that replaces the error page (app_offline)
        self.pid = 0  # the app process it concerns, when there is one
        self.extra_headers: list[tuple[bytes, bytes]] = []  # e.g. 416's Content-Range


class BadRequest(ProxyError):
    """400: malformed or ambiguous request; never forwarded."""

    status = 400
    title = "Bad Request"


class NotFound(ProxyError):
    """404: no app for this host and path."""

    status = 404
    title = "Not Found"


class Forbidden(ProxyError):
    """403: a static file the workers may not read, or a directory without its index."""

    status = 403
    title = "Forbidden"


class MethodNotAllowed(ProxyError):
    """405: a method other than GET or HEAD on a static file."""

    status = 405
    title = "Method Not Allowed"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.extra_headers = [(b"Allow", b"GET, HEAD")]


class PreconditionFailed(ProxyError):
    """412: a static file's If-Match / If-Unmodified-Since did not hold."""

    status = 412
    title = "Precondition Failed"


class RangeNotSatisfiable(ProxyError):
    """416: no part of a static file's Range lies within it."""

    status = 416
    title = "Range Not Satisfiable"


class BadGateway(ProxyError):
    """502: the app failed to start, exited, refused or reset the connection."""

    status = 502
    title = "Bad Gateway"


class Unavailable(ProxyError):
    """503: app offline, rapid-fail protection, or queue full."""

    status = 503
    title = "Service Unavailable"


class GatewayTimeout(ProxyError):
    """504: no response from the app within request_timeout."""

    status = 504
    title = "Gateway Timeout"


class ConnectRefused(BadGateway):
    """502, and nothing reached the app: the request may go to another process."""


class UpstreamGone(BadGateway):
    """502: a kept-alive connection broke and its process refuses new ones (it is gone).
    Only raised for idempotent requests without a body, which may go to another
    process that was already serving."""


def from_upstream(exc: BaseException, app: str, timeout: float) -> ProxyError:
    """Map a failure talking to the app to the status the client gets."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ProxyError):
            return cause
        cause = cause.__cause__
    if isinstance(exc, asyncio.TimeoutError):
        return GatewayTimeout(f"the app {app!r} did not answer within {timeout:g}s", app=app)
    if isinstance(exc, ConnectFailed | ConnectionRefusedError):
        return ConnectRefused(f"the app {app!r} refused the connection", app=app,
                              detail=str(exc))
    if isinstance(exc, Closed | UpstreamBroken | OSError):
        return BadGateway(f"the app {app!r} closed the connection", app=app, detail=str(exc))
    if isinstance(exc, InvalidResponse):
        return BadGateway(f"the app {app!r} sent an invalid response", app=app, detail=str(exc))
    return BadGateway(f"the app {app!r} failed", app=app, detail=repr(exc))


def from_file_error(exc: OSError, name: str) -> ProxyError:
    """Map a failure opening or reading a static file to the status the client gets:
    missing (or not a plain name) 404, not readable 403, anything else 500."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG,
                     errno.EINVAL, errno.ENXIO):
        return NotFound("no such file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Forbidden("the file is not readable by Bastion", detail=name)
    return ProxyError("the file could not be read", detail=f"{name}: {exc.strerror or exc}")


class RequestRejected(ProxyError):
    """A request refused at the edge (strict parsing, limits): 400, 405, 408, 413, 414,
    431, 501 or 505; never forwarded, and the connection closes after the answer."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.title = _phrase(status)


def _phrase(status: int) -> str:
    import http

    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class AppFailed(ProxyError):
    """500: an in-process app raised (or returned no answer) before its response began."""

    status = 500
    title = "Internal Server Error"


class StateError(RuntimeError):
    """A move the HTTP/1.1 connection state table (``proxy.edge.h1state``) does not allow:
    a bug in the connection, shown at once rather than as a connection that silently
    does the wrong thing."""
