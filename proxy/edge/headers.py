"""Header hygiene between the client and the app: pure functions on bytes, no I/O.

Headers travel as ``(name, value)`` pairs of bytes, as the parsers hand them over, and
are rewritten in one pass. Order matters: first every header that the client's
``Connection`` header names, and the hop-by-hop headers; then client headers that could
forge what we vouch for (``X-Bastion-*``, ``X-Forwarded-*``, ``Forwarded``,
``X-Real-IP``) and any name with an underscore (some frameworks fold ``_`` and ``-``
together, so ``X_Forwarded_For`` could pose as ``X-Forwarded-For``); then ours are
added. From a trusted proxy the ``X-Forwarded-*`` chain is kept and our values appended
to it. ``Content-Length`` is dropped both ways: bodies are re-framed by the edge.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
FORWARDED = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"forwarded",
        b"x-real-ip",
    }
)
# Dropped from every response: hop-by-hop, framing (re-framed here), and the app's
# own Server (the edge names itself, as nginx hides upstream server software).
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"server"}

Headers = list[tuple[bytes, bytes]]


class ForwardInfo:
    """What Bastion vouches for about one request.

    (A plain class, made once per proxied request: a named tuple's ``__new__`` runs as
    Python even when this module is compiled.)"""

    client_ip: str
    scheme: str  # "http" or "https"
    host: str  # the client's Host header
    port: int  # the listener port the client reached
    path_base: str  # "" or "/shop"
    token: str
    client_cert_b64: str | None
    trusted: bool  # the peer is a trusted proxy: keep and extend its chain

    def __init__(self, client_ip: str, scheme: str, host: str, port: int, path_base: str,
                 token: str, client_cert_b64: str | None = None,
                 trusted: bool = False) -> None:
        self.client_ip = client_ip
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path_base = path_base
        self.token = token
        self.client_cert_b64 = client_cert_b64
        self.trusted = trusted


def connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Lower-case names listed in every ``Connection`` header."""
    names: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":  # (length first: no copy)
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return names


def upstream_headers(client: Iterable[tuple[bytes, bytes]], info: ForwardInfo) -> Headers:
    """The header list to send to the app for a request with ``client`` headers."""
    client = client if isinstance(client, list) else list(client)
    # Host is end-to-end and goes to the app unchanged, even if Connection names it.
    listed = connection_listed(client)
    listed.discard(b"host")
    kept: Headers = []
    chain: dict[bytes, list[bytes]] = {}
    for name, value in client:
        low = name.lower()
        if low in HOP_BY_HOP or low == b"content-length" or (listed and low in listed):
            continue
        # (find, not `in`: `in` on bytes first tries the needle as an int, and raises and
        # clears a TypeError inside every time)
        if low.startswith(b"x-bastion-") or name.find(b"_") != -1:
            continue
        if low in FORWARDED:
            if info.trusted and low.startswith(b"x-forwarded-"):
                chain.setdefault(low, []).append(value)
            continue
        kept.append((name, value))

    kept.append((b"X-Forwarded-For",
                 _joined(chain, b"x-forwarded-for", info.client_ip.encode())))
    proto = chain.get(b"x-forwarded-proto") if info.trusted else None
    if proto:
        # Behind a trusted load balancer the original scheme is the first hop's.
        kept.append((b"X-Forwarded-Proto", proto[0].split(b",")[0].strip()))
    else:
        kept.append((b"X-Forwarded-Proto", info.scheme.encode()))
    kept.append((b"X-Forwarded-Host", info.host.encode("latin-1")))
    kept.append((b"X-Forwarded-Port", b"%d" % info.port))
    if info.path_base:
        kept.append((b"X-Forwarded-Prefix", info.path_base.encode("latin-1")))
    kept.append((b"X-Bastion-Token", info.token.encode()))
    if info.client_cert_b64:
        kept.append((b"X-Bastion-Client-Cert", info.client_cert_b64.encode()))
    return kept


def _joined(chain: dict[bytes, list[bytes]], key: bytes, ours: bytes) -> bytes:
    """``ours`` after the values a trusted proxy sent in ``key``, comma-joined."""
    previous = chain.get(key)
    return b", ".join([*previous, ours]) if previous else ours


def downstream_headers(app: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The app's response headers without hop-by-hop ones, framing and ``Server``."""
    app = app if isinstance(app, list) else list(app)
    listed = connection_listed(app)
    drop = _RESPONSE_DROP | listed if listed else _RESPONSE_DROP
    return [(name, value) for name, value in app if name.lower() not in drop]


def is_upgrade(method: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """True for a WebSocket upgrade request (RFC 6455 4.1)."""
    if method != "GET":
        return False
    upgrade: bytes | None = None
    for name, value in headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            if upgrade is not None:
                return False  # more than one Upgrade header
            upgrade = value
    if upgrade is None:
        return False
    tokens = {t.strip().lower() for t in upgrade.split(b",")}
    return b"websocket" in tokens and b"upgrade" in connection_listed(headers)
