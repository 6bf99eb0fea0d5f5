"""Pure, framework-independent logic shared by the ASGI, WSGI and aiohttp flavours.

Theory of operation
-------------------
Bastion starts every app process with a random ``BASTION_TOKEN`` in its environment and sends that
token in the ``X-Bastion-Token`` header of every request it forwards.  A request
that carries the right token is *paired*: it certainly came through Bastion, so the
``X-Forwarded-*`` headers Bastion set can be trusted and applied to the request the app sees
(scheme, client address, server host/port, root path).  A request without the right token did not
come through Bastion (someone reached the loopback port directly) and is refused with 400 before the
app is called.  Without a token in the environment the middleware does nothing at all.

This module only parses strings and makes decisions; it does no I/O and imports only the standard
library.  Each flavour translates its own request representation into a ``dict`` of the relevant
lower-cased header names (see :func:`collect_headers`), calls :func:`decide`, and applies the
resulting :class:`Decision` in its own way.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BAD_REQUEST_BODY",
    "CERT_HEADER",
    "ORIGINAL_FOR_HEADER",
    "ORIGINAL_PROTO_HEADER",
    "RELEVANT_HEADERS",
    "TOKEN_HEADER",
    "Decision",
    "Settings",
    "collect_headers",
    "decide",
    "forwarded_for",
    "forwarded_port",
    "forwarded_proto",
    "log_rejection",
    "normalize_path_base",
    "split_host",
    "split_path",
    "token_matches",
]

logger = logging.getLogger("integration_middleware")

TOKEN_HEADER = "x-bastion-token"
CERT_HEADER = "x-bastion-client-cert"
ORIGINAL_FOR_HEADER = "x-original-for"
ORIGINAL_PROTO_HEADER = "x-original-proto"
_XFF = "x-forwarded-for"
_XFP = "x-forwarded-proto"
_XFH = "x-forwarded-host"
_XFPORT = "x-forwarded-port"

#: The lower-cased header names :func:`decide` looks at.
RELEVANT_HEADERS = frozenset({TOKEN_HEADER, CERT_HEADER, _XFF, _XFP, _XFH, _XFPORT})

#: Body of the 400 response sent to requests that did not come through Bastion.
BAD_REQUEST_BODY = b"400 Bad Request: not paired with Bastion"


def normalize_path_base(value: str | None) -> str:
    """Return the path base as ``""`` (for ``/``) or ``"/x[/y]"`` without a trailing slash."""
    if not value:
        return ""
    value = value.strip()
    if not value.startswith("/"):
        value = "/" + value
    return value.rstrip("/")


@dataclass(frozen=True, slots=True)
class Settings:
    """What a middleware instance was configured with.

    ``token`` is ``None`` when there is no ``BASTION_TOKEN``: the middleware is then a no-op.
    """

    token: str | None
    path_base: str

    @classmethod
    def load(cls, token: str | None = None, path_base: str | None = None) -> Settings:
        """Build settings from explicit values, falling back to the process environment.

        ``token`` falls back to ``BASTION_TOKEN`` and ``path_base`` to ``BASTION_PATH_BASE``.
        An empty token counts as no token.
        """
        if token is None:
            token = os.environ.get("BASTION_TOKEN")
        if path_base is None:
            path_base = os.environ.get("BASTION_PATH_BASE", "")
        return cls(token=token or None, path_base=normalize_path_base(path_base))

    @property
    def enabled(self) -> bool:
        """True when a token is configured, i.e. the middleware does anything at all."""
        return self.token is not None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide` for one request.

    When ``paired`` is false only ``reason`` is meaningful and the request must be refused.
    Every other field is ``None`` when the corresponding value should be left as it is.
    """

    paired: bool
    reason: str = ""
    scheme: str | None = None
    client_ip: str | None = None
    server: tuple[str, int] | None = None
    client_cert: str | None = None
    #: ``(root, rest)`` where ``root + rest`` is the full path, or ``None`` when the path is not
    #: under the path base (or there is no path base).
    path_split: tuple[str, str] | None = None


def collect_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Group the relevant headers by lower-cased name, keeping every value in order."""
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        key = name.lower()
        if key in RELEVANT_HEADERS:
            found.setdefault(key, []).append(value)
    return found


def token_matches(expected: str, presented: list[str] | None) -> tuple[bool, str]:
    """Compare the presented token header(s) with ``expected`` in constant time.

    Returns ``(ok, reason)``; more than one token header is refused as ambiguous.
    """
    if not presented:
        return False, "missing token"
    if len(presented) != 1:
        return False, "duplicate token headers"
    ok = hmac.compare_digest(presented[0].strip().encode("utf-8"), expected.encode("utf-8"))
    return ok, "" if ok else "wrong token"


def forwarded_proto(values: list[str] | None, websocket: bool = False) -> str | None:
    """Return the scheme named by ``X-Forwarded-Proto`` (right-most entry).

    Only ``http`` and ``https`` are accepted; for a WebSocket they become ``ws`` and ``wss``.
    Anything else gives ``None`` (leave the scheme unchanged).
    """
    entry = _rightmost(values)
    if entry is None:
        return None
    proto = entry.lower()
    if proto not in ("http", "https"):
        return None
    if websocket:
        return "wss" if proto == "https" else "ws"
    return proto


def forwarded_for(values: list[str] | None) -> str | None:
    """Return the right-most ``X-Forwarded-For`` entry if it is a valid IP address, else ``None``.

    Bastion replaces the header with the single client IP; behind a trusted load balancer it
    appends, so the right-most entry is the one Bastion vouches for.  IPv6 addresses may come
    bracketed; a zone (``%eth0``) is kept as :mod:`ipaddress` accepts it.
    """
    entry = _rightmost(values)
    if entry is None:
        return None
    if entry.startswith("[") and entry.endswith("]"):
        entry = entry[1:-1]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def forwarded_port(values: list[str] | None) -> int | None:
    """Return the ``X-Forwarded-Port`` as an int in 1..65535, else ``None``."""
    entry = _rightmost(values)
    if entry is None:
        return None
    return _parse_port(entry)


def split_host(host: str) -> tuple[str, int | None]:
    """Split a ``Host``-style value into ``(host, port)``; IPv6 brackets are removed."""
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        if end == -1:
            return host, None
        name, rest = host[1:end], host[end + 1 :]
        if rest.startswith(":"):
            return name, _parse_port(rest[1:])
        return name, None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, _parse_port(port)
    return host, None


def split_path(path_base: str, path: str) -> tuple[str, str] | None:
    """Split ``path`` into ``(path_base, rest)`` when it lies under ``path_base``.

    The match must end on a segment boundary: with ``/shop``, ``/shop`` and ``/shop/a`` match
    (rest ``""`` and ``"/a"``) but ``/shopping`` does not.  Returns ``None`` when there is no path
    base or the path is not under it.
    """
    if not path_base:
        return None
    if path == path_base:
        return path_base, ""
    if path.startswith(path_base + "/"):
        return path_base, path[len(path_base) :]
    return None


def decide(
    settings: Settings,
    headers: dict[str, list[str]],
    path: str,
    *,
    websocket: bool = False,
) -> Decision:
    """Decide what to do with one request.

    ``headers`` comes from :func:`collect_headers`; ``path`` is the full (decoded) request path.
    Must only be called when ``settings.enabled``.
    """
    if settings.token is None:  # pragma: no cover - callers check settings.enabled
        raise ValueError("decide() called without a token")
    ok, reason = token_matches(settings.token, headers.get(TOKEN_HEADER))
    if not ok:
        return Decision(paired=False, reason=reason)

    scheme = forwarded_proto(headers.get(_XFP), websocket=websocket)
    server: tuple[str, int] | None = None
    host_value = _rightmost(headers.get(_XFH))
    if host_value:
        host, host_port = split_host(host_value)
        port = forwarded_port(headers.get(_XFPORT)) or host_port
        if port is None:
            port = 443 if scheme in ("https", "wss") else 80
        if host:
            server = (host, port)
    certs = headers.get(CERT_HEADER)
    cert = certs[-1].strip() if certs else None
    return Decision(
        paired=True,
        scheme=scheme,
        client_ip=forwarded_for(headers.get(_XFF)),
        server=server,
        client_cert=cert or None,
        path_split=split_path(settings.path_base, path),
    )


def log_rejection(client: str | None, path: str, reason: str) -> None:
    """Log one WARNING line for a refused request (never includes any token value)."""
    logger.warning(
        "refused request not paired with Bastion (%s): client=%s path=%s",
        reason,
        client or "-",
        path,
    )


def _rightmost(values: list[str] | None) -> str | None:
    if not values:
        return None
    entries = [e.strip() for e in ",".join(values).split(",")]
    entries = [e for e in entries if e]
    return entries[-1] if entries else None


def _parse_port(value: str) -> int | None:
    value = value.strip()
    if not value.isdigit() or len(value) > 5:
        return None
    port = int(value)
    return port if 0 < port < 65536 else None
