"""The narrow message interface between the module and the proxy workers.

Theory of operation
-------------------
The module is the only authority over app processes. It tells proxy workers what it
knows by publishing ``AppState`` snapshots: one whole snapshot of an app (its state and
every endpoint that may take requests) each time anything about it changes. A worker
keeps the latest snapshot per app and never needs history, so a late-joining worker
only needs the current snapshots (``Module.snapshot()``).

Workers talk back with ``NeedApp`` ("a request wants app X and no endpoint is ready"),
``EndpointFailed`` ("I could not reach process P of app X"), ``RequestTimedOut`` ("process
P of app X did not answer within request_timeout") and ``UsageReport`` (requests served
and in flight per process, sent when they change, at most a few times a second). All are
hints; the module decides what to do. For an in-process app (called inside the workers,
no process of its own) a worker also sends ``HostedReport`` (it imported the app, or
failed to, with the traceback) and, with a ``health_check``, ``HealthReport`` (a check
it made of the app in-process failed, or passed again after failing).

Request slots (``SlotWanted`` / ``SlotGranted`` / ``SlotRefused`` / ``SlotFreed``) are
the one exchange that is not for the module: the main process's slot granter
(``proxy/slots.py``) answers them, so that ``max_concurrency`` and ``max_queue`` hold
for the whole Bastion, whatever the number of worker processes. A worker asks for a slot
whenever a request must wait (a limit is set, or the app is not ready); the answer goes
to that worker only. ``(worker, ticket)`` names one request; ``SlotFreed`` gives back a
granted slot or withdraws a request still waiting, whichever it is.

Every message is a frozen dataclass that turns into a JSON-able dict and back
(``to_wire`` / ``from_wire``), so the same messages can cross a pipe to worker
processes unchanged; with ``workers: 1`` they are passed as objects in one event loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

State = Literal[
    "stopped",  # no process; the next request starts one (on_demand)
    "starting",  # a process is starting; requests wait for it
    "ready",  # at least one endpoint takes requests
    "failed",  # the last start failed or the process crashed; the next request retries
    "backoff",  # rapid-fail protection: refuse with 503 until ``retry_at``
    "offline",  # app_offline.htm present: 503 with ``offline_body``
    "draining",  # stopping: no new requests
]


@dataclass(frozen=True)
class Endpoint:
    """One app process that takes requests."""

    pid: int
    port: int  # 0 for a unix socket
    token: str
    socket_path: str | None = None


@dataclass(frozen=True)
class AppState:
    """Module -> proxy: the whole current picture of one app.

    ``version`` grows by one on every change of that app, so a waiting request can tell
    a failure that happened after it began waiting from an older one. ``retry_at`` is a
    ``time.monotonic()`` time: on Linux that is CLOCK_MONOTONIC, one clock for every
    process of the machine, so it crosses process boundaries and, unlike the wall clock,
    does not move when the system time is stepped. The proxy turns it into a
    ``Retry-After`` delay.
    """

    app: str
    version: int
    state: State
    endpoints: tuple[Endpoint, ...] = ()
    retry_at: float | None = None
    reason: str = ""  # short, safe to show: "exited with status 3", "did not listen in 5s"
    detail: str = ""  # last output lines, shown only with detailed_errors
    offline_body: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        data = asdict(self)
        data["kind"] = "state"
        return data


@dataclass(frozen=True)
class NeedApp:
    """Proxy -> module: a request is waiting for ``app``; start it if nothing runs."""

    app: str

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        return {"kind": "need", "app": self.app}


@dataclass(frozen=True)
class EndpointFailed:
    """Proxy -> module: connecting to process ``pid`` of ``app`` failed."""

    app: str
    pid: int
    error: str = ""

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        return {"kind": "failed", "app": self.app, "pid": self.pid, "error": self.error}


@dataclass(frozen=True)
class RequestTimedOut:
    """Proxy -> module: process ``pid`` of ``app`` did not answer a request in time (504).

    ``module.health.TIMEOUTS_IN_A_ROW`` of these in a row replace the process."""

    app: str
    pid: int

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        return {"kind": "timeout", "app": self.app, "pid": self.pid}


@dataclass(frozen=True)
class ProcessUsage:
    """What one worker counted for one app process."""

    pid: int
    served: int  # requests sent to it by this worker, since the worker started
    in_flight: int  # requests it is serving for this worker right now


@dataclass(frozen=True)
class UsageReport:
    """Proxy -> module: a worker's request counters for one app, sent when they change.

    The module uses them for ``idle_timeout``, ``max_requests`` recycling, draining an
    old process before stopping it, and ``bastion status``. ``worker`` tells reports of
    different worker processes apart.
    """

    app: str
    worker: int
    processes: tuple[ProcessUsage, ...]

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        return {
            "kind": "usage",
            "app": self.app,
            "worker": self.worker,
            "processes": [asdict(p) for p in self.processes],
        }


@dataclass(frozen=True)
class SlotWanted:
    """Proxy -> main: request ``ticket`` of ``worker`` wants a process of ``app``.

    Sent when the request cannot be served at once by the worker alone: ``app`` has a
    ``max_concurrency``, or no process ready. Answered by ``SlotGranted`` or
    ``SlotRefused`` (queue full), in the order the main process received the wants.
    """

    app: str
    worker: int
    ticket: int  # unique within the worker

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        return {"kind": "slot_wanted", "app": self.app, "worker": self.worker,
                "ticket": self.ticket}


@dataclass(frozen=True)
class SlotGranted:
    """Main -> that proxy worker: ``ticket`` may send its request to ``endpoint``.

    The endpoint travels whole so the worker needs no newer ``AppState`` to use it.
    """

    app: str
    worker: int
    ticket: int
    endpoint: Endpoint

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        return {"kind": "slot_granted", "app": self.app, "worker": self.worker,
                "ticket": self.ticket, "endpoint": asdict(self.endpoint)}


@dataclass(frozen=True)
class SlotRefused:
    """Main -> that proxy worker: ``ticket`` cannot wait (``max_queue`` requests of the
    whole Bastion already wait): 503 with ``Retry-After: retry_after``."""

    app: str
    worker: int
    ticket: int
    retry_after: int = 1
    reason: str = "queue full"

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        data = asdict(self)
        data["kind"] = "slot_refused"
        return data


@dataclass(frozen=True)
class SlotFreed:
    """Proxy -> main: ``ticket`` is done: its request ended (the granted slot is free
    again) or stopped waiting (timed out, cancelled, failed). Idempotent."""

    app: str
    worker: int
    ticket: int

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        return {"kind": "slot_freed", "app": self.app, "worker": self.worker,
                "ticket": self.ticket}


@dataclass(frozen=True)
class HostedReport:
    """Proxy -> module: what worker ``worker`` (process ``pid``) made of an in-process app.

    ``status`` is ``loading`` (a load began: ``bastion status`` shows the worker
    starting), ``loaded`` (imported, lifespan started) or ``failed`` (``reason`` short,
    ``detail`` the traceback). A failed load counts in the app's rapid-fail window like
    a failed start of an app process; the module publishes the outcome as ``AppState``.
    """

    app: str
    worker: int
    pid: int
    status: Literal["loading", "loaded", "failed"]
    reason: str = ""
    detail: str = ""

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        data = asdict(self)
        data["kind"] = "hosted"
        return data


@dataclass(frozen=True)
class HealthReport:
    """Proxy -> module: worker ``worker`` (process ``pid``) called the ``health_check``
    path of an in-process app (in-process, no socket) and it failed (``healthy`` False,
    ``reason`` short), or it passed after failing (``healthy`` True). Failures in a row
    are counted by the module as for an app process's checks (``module.health``)."""

    app: str
    worker: int
    pid: int
    healthy: bool
    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict of this message."""
        data = asdict(self)
        data["kind"] = "health"
        return data


ToModule = (NeedApp | EndpointFailed | RequestTimedOut | UsageReport | HostedReport
            | HealthReport)
FromProxy = ToModule | SlotWanted | SlotFreed  # everything a proxy worker sends
ToProxy = AppState | SlotGranted | SlotRefused  # everything a proxy worker is told
Message = FromProxy | ToProxy


def from_wire(data: dict[str, Any]) -> Message:
    """Rebuild a message from its ``to_wire`` form."""
    kind = data.get("kind")
    if kind == "slot_wanted":
        return SlotWanted(app=data["app"], worker=data["worker"], ticket=data["ticket"])
    if kind == "slot_granted":
        return SlotGranted(app=data["app"], worker=data["worker"], ticket=data["ticket"],
                           endpoint=Endpoint(**data["endpoint"]))
    if kind == "slot_refused":
        return SlotRefused(app=data["app"], worker=data["worker"], ticket=data["ticket"],
                           retry_after=data.get("retry_after", 1),
                           reason=data.get("reason", ""))
    if kind == "slot_freed":
        return SlotFreed(app=data["app"], worker=data["worker"], ticket=data["ticket"])
    if kind == "state":
        fields = {k: v for k, v in data.items() if k != "kind"}
        fields["endpoints"] = tuple(Endpoint(**e) for e in fields.get("endpoints", ()))
        return AppState(**fields)
    if kind == "need":
        return NeedApp(app=data["app"])
    if kind == "failed":
        return EndpointFailed(app=data["app"], pid=data["pid"], error=data.get("error", ""))
    if kind == "timeout":
        return RequestTimedOut(app=data["app"], pid=data["pid"])
    if kind == "hosted":
        return HostedReport(app=data["app"], worker=data["worker"], pid=data["pid"],
                            status=data["status"], reason=data.get("reason", ""),
                            detail=data.get("detail", ""))
    if kind == "health":
        return HealthReport(app=data["app"], worker=data["worker"], pid=data["pid"],
                            healthy=data["healthy"], reason=data.get("reason", ""))
    if kind == "usage":
        return UsageReport(
            app=data["app"],
            worker=data["worker"],
            processes=tuple(ProcessUsage(**p) for p in data.get("processes", ())),
        )
    raise ValueError(f"unknown message kind {kind!r}")
