"""Routing by host and path: pure, no I/O.

A route names an app, the host patterns it answers (empty: any host) and its path base.
For a request, only routes whose host matches and whose path base is a prefix of the
path *on a segment boundary* are candidates (``/api`` takes ``/api`` and ``/api/x``,
never ``/apix``). Among them the most specific host wins (exact name, then the longest
``*.`` wildcard, then any host), and within that the longest path base, the way IIS
picks a site by its binding, then an application by its path. A host with no matching
path falls back to the apps that answer any host, so one catch-all app can sit behind
several named ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ..config.model import Route


def normalise_host(host: str) -> str:
    """Lower-case, without port and trailing dot: ``Shop.Example.com.:443`` -> ``shop.example.com``.

    An IPv6 literal comes out bracketed and in its compressed form, whether it was
    written ``[0:0::1]:8080`` (a Host header) or ``::1`` (a configured host).
    """
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal, perhaps with a port
        end = host.find("]")
        if end == -1:
            return host
        inner = host[1:end]
    elif host.count(":") > 1:  # a bare IPv6 literal (no port possible)
        inner = host
    else:
        if ":" in host:
            host = host.split(":", 1)[0]
        return host.rstrip(".")
    try:
        return f"[{ipaddress.IPv6Address(inner).compressed}]"
    except ValueError:
        return host[: host.find("]") + 1] if host.startswith("[") else host


def host_rank(pattern: str, host: str) -> int:
    """How specifically ``pattern`` matches ``host``: -1 no match, 0 any, else larger = better."""
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        if host.endswith(suffix) and len(host) > len(suffix):
            return len(suffix)
        return -1
    return 100_000 if pattern == host else -1


def path_matches(base: str, path: str) -> bool:
    """True when ``path`` is ``base`` or lies under it on a segment boundary."""
    if base == "/":
        return True
    return path == base or path.startswith(base + "/")


@dataclass(frozen=True)
class Match:
    """The route chosen for a request."""

    route: Route
    host_rank: int


class Router:
    """Chooses the app for a host and path."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._hosts: dict[str, str] = {}  # raw Host -> normalised (bounded memo)

    def match(self, host: str, path: str) -> Route | None:
        """The best route for ``host`` (raw Host header) and ``path``, or None (404)."""
        name = self._hosts.get(host)
        if name is None:
            name = normalise_host(host)
            if len(self._hosts) < 1024:
                self._hosts[host] = name
        best: tuple[int, int] | None = None
        chosen: Route | None = None
        for route in self.routes:
            if not path_matches(route.path, path):
                continue
            if route.hosts:
                rank = max(host_rank(normalise_host(p), name) for p in route.hosts)
                if rank < 0:
                    continue
            else:
                rank = 0
            key = (rank, len(route.path))
            if best is None or key > best:
                best, chosen = key, route
        return chosen
