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


class Router:
    """Chooses the app for a host and path.

    For each host seen, the routes it may reach are put in the order the rules above
    give (host rank, then path length, best first) once, and kept (up to ``MEMO`` hosts);
    a request then takes the first of them whose path base matches."""

    MEMO = 1024

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._by_host: dict[str, tuple[Route, ...]] = {}  # raw Host -> candidates

    def candidates(self, host: str) -> tuple[Route, ...]:
        """The routes ``host`` (raw Host header) may reach, best first."""
        found = self._by_host.get(host)
        if found is not None:
            return found
        name = normalise_host(host)
        ranked: list[tuple[int, int, int, Route]] = []
        for index, route in enumerate(self.routes):
            if route.hosts:
                rank = max(host_rank(normalise_host(p), name) for p in route.hosts)
                if rank < 0:
                    continue
            else:
                rank = 0
            # Ties keep the configured order (the first route wins, as before).
            ranked.append((-rank, -len(route.path), index, route))
        ranked.sort(key=lambda item: item[:3])
        found = tuple(item[3] for item in ranked)
        if len(self._by_host) < self.MEMO:
            self._by_host[host] = found
        return found

    def match(self, host: str, path: str) -> Route | None:
        """The best route for ``host`` (raw Host header) and ``path``, or None (404)."""
        for route in self.candidates(host):
            if path_matches(route.path, path):
                return route
        return None
