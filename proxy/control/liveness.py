"""Worker liveness: heartbeats from worker processes and the main process's check.

Theory of operation
-------------------
A worker process whose event loop is blocked (a CPU-bound bug, a deadlock, a SIGSTOP)
still holds its share of the listening sockets and the connections it accepted, but
serves nothing; its process is alive, so waiting for its exit never notices. As
gunicorn's arbiter does, the main process therefore expects a sign of life: every
worker process sends a HEARTBEAT frame over its channel every ``heartbeat_interval``
(a quarter of ``worker_timeout``, at most one second), from a task of its own event
loop, so the frame proves that the loop runs. The main process notes the
``time.monotonic()`` of every frame it reads from the worker; its check, as often as
the heartbeats, kills (SIGKILL) a ready worker that has been silent for more than
``worker_timeout``, and the ordinary replacement of a dead worker follows.

A worker that is still starting has its own limit (it must say READY in time), and a
worker that is draining is bounded by the stop's own deadline, so only ready, serving
workers are checked. The in-process worker (``workers: 1``) shares the main process's
loop, which systemd's watchdog covers. The rules are pure functions of numbers.
"""

from __future__ import annotations

MAX_INTERVAL = 1.0
MIN_INTERVAL = 0.05


def heartbeat_interval(timeout: float) -> float:
    """How often a worker sends a heartbeat (and the main process checks)."""
    return max(MIN_INTERVAL, min(MAX_INTERVAL, timeout / 4))


def overdue(last_seen: float, now: float, timeout: float) -> bool:
    """True when a worker last heard of at ``last_seen`` is silent for too long."""
    return now - last_seen > timeout
