"""The open client connections of one worker, counted against ``max_connections``.

Every client-side protocol (``h1.H1Connection``, ``h2server.H2Protocol``) reports when
it opens and closes; at the limit ``Connections`` tells its owner (``listeners``) to
stop accepting, and to resume once a connection ends. A graceful stop reaches every
open connection through it (``drain``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Drainable(Protocol):
    """A client connection a graceful stop can drain."""

    def drain(self) -> None: ...


class Connections:
    """The open client connections of one worker, against ``max_connections``."""

    def __init__(self, limit: int, on_full: Callable[[bool], None]) -> None:
        self.limit = limit
        self.open: set[Drainable] = set()
        self.draining = False
        self._on_full = on_full
        self._full = False

    def opened(self, conn: Drainable) -> None:
        self.open.add(conn)
        if self.limit and len(self.open) >= self.limit and not self._full:
            self._full = True
            self._on_full(True)

    def closed(self, conn: Drainable) -> None:
        self.open.discard(conn)
        if self._full and len(self.open) < self.limit:
            self._full = False
            self._on_full(False)
