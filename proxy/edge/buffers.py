"""The per-worker budget of memory for buffering slow clients (``limits.buffer_memory``).

Theory of operation
-------------------
Buffering lets the edge hold more of a request or a response than the normal streaming
windows, so that an app's process is freed while a slow client uploads or downloads
(``pools.NAME.buffering``, used by ``proxy.edge.flow``). Each worker has one
``BufferBudget``; a flow takes bytes from it (``acquire``) before it holds them beyond
the streaming windows, and gives them back (``release``) once they have gone on: the
request body to the app, the response to the client (when the client's connection has
drained what was written to it; the connection keeps the charge after the flow ends).

When the budget is spent, ``acquire`` says no and the flow falls back to what Bastion
does without buffering: it streams with backpressure. A request is never refused for
want of buffer memory; ``refusals`` counts how often the budget said no, and ``used``,
``peak`` and ``cap`` go to ``/metrics``.
"""

from __future__ import annotations


class BufferBudget:
    """Bytes held by one worker's buffered requests and responses, up to ``cap``."""

    __slots__ = ("cap", "used", "peak", "refusals")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.peak = 0
        self.refusals = 0  # acquisitions refused because the cap was reached

    def acquire(self, size: int) -> bool:
        """Take ``size`` bytes; False (and nothing taken) when that would pass the cap."""
        used = self.used + size
        if used > self.cap:
            self.refusals += 1
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def release(self, size: int) -> None:
        """Give back ``size`` bytes taken before."""
        self.used = max(0, self.used - size)


class Held:
    """A charge on a budget that outlives its flow: a response's bytes still in a
    client connection's buffer, given back by ``release`` (once; then it is empty)."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: BufferBudget, size: int) -> None:
        self.budget = budget
        self.size = size

    def release(self) -> None:
        """Give the bytes back (idempotent)."""
        if self.size:
            self.budget.release(self.size)
            self.size = 0
