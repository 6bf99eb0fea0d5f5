"""The node's own health answer, for load balancers, and whether the node drains: pure.

Theory of operation
-------------------
A load balancer in front of several Bastion nodes asks each one ``health.path`` (by
default ``/.well-known/bastion/health``) on every listener; Bastion answers it itself,
before routing, so no app is involved. The answer is 200 while the node serves, and 503
while it drains (``bastion drain``, or the ``health.drain_delay`` at SIGTERM) or while an
app of ``health.require_apps`` has no ready process. The balancer stops sending new
connections after its checks see 503; the node still serves every request it gets
while draining, answering HTTP/1.1 ones with ``Connection: close`` (and HTTP/2 ones with
GOAWAY), so clients with kept-alive connections move to another node.

``NodeState`` is one worker's view of the drain (the main process tells every worker,
replacements and new generations included, through the control channel); ``answer``
turns it and the apps' published states into the status line and body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bastion.module.messages import AppState


class NodeState:
    """Whether this node drains (shared by every listener of one worker)."""

    __slots__ = ("draining",)

    def __init__(self, draining: bool = False) -> None:
        self.draining = draining


@dataclass(frozen=True)
class HealthAnswer:
    """What the health endpoint says."""

    status: int  # 200 or 503
    body: bytes


def _ready(state: AppState | None) -> bool:
    return state is not None and state.state == "ready" and bool(state.endpoints)


def answer(node: NodeState, required: Iterable[str],
           state_of: Callable[[str], AppState | None]) -> HealthAnswer:
    """The health answer of a node in ``node``'s drain state, whose ``required`` apps'
    published states ``state_of`` gives."""
    if node.draining:
        return HealthAnswer(503, b"draining\n")
    missing = [name for name in required if not _ready(state_of(name))]
    if missing:
        return HealthAnswer(503, ("not ready: " + ", ".join(missing) + "\n").encode())
    return HealthAnswer(200, b"serving\n")
