"""What an in-process app is given for one request: the ASGI scope, the WSGI environ.

Theory of operation
-------------------
Pure functions of the parsed request and the facts of the listener and the app's
mount point. Out of process, Bastion sends ``X-Forwarded-*`` and a pairing token and
the integration middleware restores the scheme, the client and the path base inside
the app; in process there is nothing to restore: the real values go into the scope
directly, and no ``X-Bastion-*`` or Bastion-made forwarding header is added. The
client's headers go through the same hygiene as out of process (hop-by-hop fields,
names with ``_``, ``X-Bastion-*`` and, unless the peer is a trusted proxy, forwarding
headers are dropped).

ASGI (``http_scope``): ``path`` is the full decoded path and ``root_path`` the app's
path base, the ASGI rule that Starlette and FastAPI follow. WSGI (``wsgi_environ``):
``SCRIPT_NAME`` is the path base and ``PATH_INFO`` the rest, as PEP 3333 strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..headers import FORWARDED, HOP_BY_HOP, connection_listed

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}


class Facts:
    """What one request's scope needs beyond the request itself.

    (Plain classes here, not named tuples: compiled, one is made in a native call.)"""

    scheme: str  # "http" or "https": the listener's
    server_host: str  # the Host the client asked for, without its port
    server_port: int  # the listener's port
    root_path: str  # the app's path base: "" or "/api"

    def __init__(self, scheme: str, server_host: str, server_port: int,
                 root_path: str) -> None:
        self.scheme = scheme
        self.server_host = server_host
        self.server_port = server_port
        self.root_path = root_path


class Head:
    """The parts of a request head the scope is made of."""

    method: str
    target: str  # origin-form as received: raw path and query
    path: str  # decoded (and normalised) path
    headers: list[tuple[bytes, bytes]]
    client_ip: str
    client_port: int
    http_version: str  # "1.1", "1.0" or "2"
    trusted: bool  # the peer is a trusted proxy: its forwarding headers are kept

    def __init__(self, method: str, target: str, path: str,
                 headers: list[tuple[bytes, bytes]], client_ip: str, client_port: int,
                 http_version: str, trusted: bool) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.headers = headers
        self.client_ip = client_ip
        self.client_port = client_port
        self.http_version = http_version
        self.trusted = trusted


def app_headers(headers: Iterable[tuple[bytes, bytes]], trusted: bool
                ) -> list[tuple[bytes, bytes]]:
    """The request headers an in-process app sees, names lower-cased (ASGI's rule)."""
    kept: list[tuple[bytes, bytes]] = []
    listed: set[bytes] | None = None  # named by Connection: dropped after the pass
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP:
            if low == b"connection":
                if listed is None:
                    listed = set()
                listed.update(connection_listed([(name, value)]))
            continue
        if name.find(b"_") != -1 or low.startswith(b"x-bastion-"):  # (not `in`: see headers)
            continue
        if not trusted and low in FORWARDED:
            continue
        kept.append((low, value))
    if listed:
        listed.discard(b"host")  # end-to-end, whatever Connection says
        if listed:
            kept = [(n, v) for n, v in kept if n not in listed]
    return kept


def split_target(target: str) -> tuple[bytes, bytes]:
    """(raw path, query string) of an origin-form target."""
    raw = target.encode("latin-1")
    path, _, query = raw.partition(b"?")
    return path, query


def host_name(host: str) -> str:
    """The host part of a Host header value (``[::1]:8443`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    colon = host.find(":")
    if colon == -1 or host.find(":", colon + 1) != -1:
        return host  # no port, or not a name with one port
    return host[:colon]


def http_scope(head: Head, facts: Facts, state: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """The ASGI ``http`` scope of one request."""
    raw_path, query = split_target(head.target)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": dict(ASGI_VERSION),
        "http_version": head.http_version,
        "method": head.method,
        "scheme": facts.scheme,
        "path": head.path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": facts.root_path,
        "headers": app_headers(head.headers, head.trusted),
        "client": (head.client_ip, head.client_port),
        "server": (facts.server_host, facts.server_port),
        "extensions": {},
    }
    if state is not None:
        scope["state"] = dict(state)  # a shallow copy per request, as the spec asks
    return scope


def websocket_scope(head: Head, facts: Facts, state: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The ASGI ``websocket`` scope of an upgrade request."""
    scope = http_scope(head, facts, state)
    scope["type"] = "websocket"
    scope["scheme"] = "wss" if facts.scheme == "https" else "ws"
    del scope["method"]
    protocols = [p.strip().decode("latin-1")
                 for n, v in scope["headers"] if n == b"sec-websocket-protocol"
                 for p in v.split(b",") if p.strip()]
    scope["subprotocols"] = protocols
    return scope


def path_info(path: str, root_path: str) -> str:
    """``PATH_INFO``: the path below the app's path base."""
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        return path[len(root_path):]
    return path


def wsgi_environ(head: Head, facts: Facts) -> dict[str, Any]:
    """The WSGI environ of one request, without ``wsgi.input`` / ``wsgi.errors``
    (the caller adds its streams). Strings are PEP 3333's: latin-1 "bytes as str"."""
    _, query = split_target(head.target)
    path = head.path.encode("utf-8").decode("latin-1")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": head.method,
        "SCRIPT_NAME": facts.root_path,
        "PATH_INFO": path_info(path, facts.root_path),
        "QUERY_STRING": query.decode("latin-1"),
        "RAW_URI": head.target,
        "SERVER_NAME": facts.server_host,
        "SERVER_PORT": str(facts.server_port),
        "SERVER_PROTOCOL": f"HTTP/{head.http_version}" if head.http_version != "2"
        else "HTTP/2.0",
        "REMOTE_ADDR": head.client_ip,
        "REMOTE_PORT": str(head.client_port),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": facts.scheme,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,  # read wsgi.input to its end, whatever the framing
    }
    for name, value in app_headers(head.headers, head.trusted):
        text = value.decode("latin-1")
        if name == b"content-type":
            environ["CONTENT_TYPE"] = text
            continue
        if name == b"content-length":
            environ["CONTENT_LENGTH"] = text
            continue
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        if key in environ:
            joiner = "; " if key == "HTTP_COOKIE" else ","
            environ[key] = environ[key] + joiner + text
        else:
            environ[key] = text
    return environ
