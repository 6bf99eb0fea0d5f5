"""Header hygiene between the client and the app: pure functions, no I/O.

Order matters (SPEC section 5): first every header that the client's ``Connection``
header names, and the hop-by-hop headers; then client headers that could forge what we
vouch for (``X-Bastion-*``, ``X-Forwarded-*``, ``Forwarded``) and any name with an
underscore (some frameworks fold ``_`` and ``-`` together, so ``X_Forwarded_For`` could
pose as ``X-Forwarded-For``); then ours are added. From a trusted proxy the
``X-Forwarded-*`` chain is kept and our values appended to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)
FORWARDED = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "forwarded",
        "x-real-ip",
    }
)

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class ForwardInfo:
    """What Bastion vouches for about one request."""

    client_ip: str
    scheme: str  # "http" or "https"
    host: str  # the client's Host header
    port: int  # the listener port the client reached
    path_base: str  # "" or "/shop"
    token: str
    client_cert_b64: str | None = None
    trusted: bool = False  # the peer is a trusted proxy: keep and extend its chain


def connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Lower-case names listed in every ``Connection`` header."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


def upstream_headers(client: Iterable[tuple[str, str]], info: ForwardInfo) -> Headers:
    """The header list to send to the app for a request with ``client`` headers."""
    client = list(client)
    # Host is end-to-end and goes to the app unchanged (SPEC 5), even if Connection names it.
    listed = connection_listed(client) - {"host"}
    kept: Headers = []
    chain: dict[str, list[str]] = {}
    for name, value in client:
        low = name.lower()
        if low in listed or low in HOP_BY_HOP:
            continue
        if low == "content-length":
            continue  # the body is re-framed; the forwarder sets its own length
        if low.startswith("x-bastion-") or "_" in name:
            continue
        if low in FORWARDED:
            if info.trusted and low.startswith("x-forwarded-"):
                chain.setdefault(low, []).append(value)
            continue
        kept.append((name, value))

    def joined(key: str, ours: str) -> str:
        previous = chain.get(key)
        return ", ".join([*previous, ours]) if previous else ours

    kept.append(("X-Forwarded-For", joined("x-forwarded-for", info.client_ip)))
    if info.trusted and "x-forwarded-proto" in chain:
        # Behind a trusted load balancer the original scheme is the first hop's.
        kept.append(("X-Forwarded-Proto", chain["x-forwarded-proto"][0].split(",")[0].strip()))
    else:
        kept.append(("X-Forwarded-Proto", info.scheme))
    kept.append(("X-Forwarded-Host", info.host))
    kept.append(("X-Forwarded-Port", str(info.port)))
    if info.path_base:
        kept.append(("X-Forwarded-Prefix", info.path_base))
    kept.append(("X-Bastion-Token", info.token))
    if info.client_cert_b64:
        kept.append(("X-Bastion-Client-Cert", info.client_cert_b64))
    return kept


def downstream_headers(app: Iterable[tuple[str, str]]) -> Headers:
    """The app's response headers without hop-by-hop ones and framing (re-framed by us)."""
    app = list(app)
    listed = connection_listed(app)
    return [
        (name, value)
        for name, value in app
        if name.lower() not in listed
        and name.lower() not in HOP_BY_HOP
        and name.lower() != "content-length"
    ]
