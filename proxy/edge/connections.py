"""The open client connections of one worker, counted against ``max_connections``.

Every client-side protocol (``h1.H1Connection``, ``h2server.H2Protocol``) reports when
it opens and closes; at the limit ``Connections`` tells its owner (``listeners``) to
stop accepting, and to resume once a connection ends. A graceful stop reaches every
open connection through it (``drain``).

A connection the kernel handed over is *arriving* from the moment its protocol is made
(the event loop calls the factory at accept) until it opens: the event loop reports
``connection_made`` one loop iteration later, a TLS one only after its handshake. A
graceful stop waits for arriving connections as for open ones, so a client accepted
just before the stop is answered, never closed unanswered when the worker exits.
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
        self.arriving = 0
        self.draining = False
        self._on_full = on_full
        self._full = False

    def arrive(self) -> None:
        """A connection was accepted; its protocol is not open yet."""
        self.arriving += 1

    def gone(self) -> None:
        """An arriving connection ended before it opened (a failed TLS handshake)."""
        if self.arriving:
            self.arriving -= 1

    @property
    def settled(self) -> bool:
        """Nothing open, nothing arriving: a graceful stop may end."""
        return not self.open and not self.arriving

    def opened(self, conn: Drainable) -> None:
        if self.arriving:
            self.arriving -= 1
        self.open.add(conn)
        if self.limit and len(self.open) >= self.limit and not self._full:
            self._full = True
            self._on_full(True)

    def closed(self, conn: Drainable) -> None:
        self.open.discard(conn)
        if self._full and len(self.open) < self.limit:
            self._full = False
            self._on_full(False)
