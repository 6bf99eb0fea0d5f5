"""One app's lifecycle: start on demand (or always), restart on crash, rapid-fail, stop.

Theory of operation
-------------------
An ``AppController`` owns the processes of one app and publishes an ``AppState`` snapshot
whenever anything changes. Its states (see ``module.messages.State``):

    stopped --need--> starting --listening--> ready --crash--> failed --need--> starting
                          |                     |                 \\ (always: after a delay)
                          +--exit/timeout--> failed               +--> starting
    failed/backoff: a crash or failed start is counted in the rapid-fail window; once the
    window is full the state is ``backoff`` until ``retry_at`` and needs are refused.
    any --stop--> draining --all exited--> stopped

``need()`` is an idempotent hint from the proxy: while starting or ready it does nothing.
With ``processes_per_app: N`` a start launches up to N processes; the app is ``ready`` as
soon as one listens. A process that dies while ready is a crash: its group is killed
(leftover children included), it is counted, and its endpoint is withdrawn at once.
``start_mode: always`` restarts immediately, with exponential backoff (0.5 s doubling,
capped at 30 s, reset once a process stayed up 60 s), and never beyond rapid-fail limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .errors import LaunchError, StartFailed
from .keeper import Keeper
from .messages import AppState, Endpoint, State
from .output import AppOutput
from .ports import pick_free_port
from .process import AppProcess, describe_exit
from .rapidfail import RapidFailWindow
from .spec import AppSpec

log = logging.getLogger("bastion.module")

BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
HEALTHY_UPTIME = 60.0
PORT_RETRIES = 3


class AppController:
    """Keeps one app's processes alive and tells the world where they listen."""

    def __init__(
        self, spec: AppSpec, keeper: Keeper, publish: Callable[[AppState], None]
    ) -> None:
        self.spec = spec
        self._keeper = keeper
        self._publish = publish
        self.output = AppOutput(spec.name, spec.stdout_log)
        self.rapid = RapidFailWindow(spec.settings.rapid_fails_per_minute)
        self.state: State = "stopped"
        self.version = 0
        self.processes: list[AppProcess] = []  # ready, taking requests
        self.starting: list[AppProcess] = []
        self.restarts = 0
        self.last_exit = ""
        self.reason = ""
        self.detail = ""
        self._retry_at_mono: float | None = None
        self._backoff = BACKOFF_FIRST
        self._tasks: set[asyncio.Task[None]] = set()
        self._restart_handle: asyncio.TimerHandle | None = None
        self._closed = False

    # -- publishing -----------------------------------------------------------------
    def snapshot(self) -> AppState:
        """The current picture of this app, as sent to proxy workers."""
        retry_at = None
        if self.state == "backoff" and self._retry_at_mono is not None:
            retry_at = time.time() + max(0.0, self._retry_at_mono - time.monotonic())
        return AppState(
            app=self.spec.name,
            version=self.version,
            state=self.state,
            endpoints=tuple(
                Endpoint(p.pid, p.port, p.token, p.socket_path) for p in self.processes
            ),
            retry_at=retry_at,
            reason=self.reason,
            detail=self.detail,
        )

    def _set(self, state: State, reason: str | None = None, detail: str | None = None) -> None:
        self.state = state
        if reason is not None:
            self.reason = reason
        if detail is not None:
            self.detail = detail
        self.version += 1
        self._publish(self.snapshot())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests from the proxy ----------------------------------------------------
    def need(self) -> None:
        """A request wants this app: start it unless it is starting, ready or resting."""
        if self._closed or self.state in ("starting", "ready", "draining", "offline"):
            return
        now = time.monotonic()
        until = self.rapid.blocked_until(now)
        if until is not None:
            self._retry_at_mono = until
            if self.state != "backoff":
                self._set("backoff")
            else:
                self._publish(self.snapshot())
            return
        self._start()

    def endpoint_failed(self, pid: int) -> None:
        """The proxy could not connect to ``pid``: withdraw it if it is really gone."""
        for proc in self.processes:
            if proc.pid == pid and not proc.alive:
                self._on_exit(proc)
                return

    # -- starting -------------------------------------------------------------------
    def _start(self) -> None:
        wanted = max(1, self.spec.settings.processes_per_app) - len(self.processes)
        wanted -= len(self.starting)
        if wanted <= 0:
            return
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None
        if not self.processes:
            self._set("starting", reason="")
        for _ in range(wanted):
            self._spawn(self._start_one())

    def _new_process(self, avoid: set[int]) -> AppProcess:
        if self.spec.transport == "unix":
            directory = tempfile.mkdtemp(prefix=f"bastion-{self.spec.name}-")
            return AppProcess(self.spec, 0, os.path.join(directory, "app.sock"))
        return AppProcess(self.spec, pick_free_port(avoid))

    async def _start_one(self) -> None:
        tried: set[int] = set()
        proc: AppProcess | None = None
        try:
            for attempt in range(PORT_RETRIES):
                proc = self._new_process(tried)
                tried.add(proc.port)
                self.starting.append(proc)
                try:
                    await proc.launch(self.output, self._keeper)
                    await proc.wait_ready(self.output)
                    break
                except StartFailed as exc:
                    await self._reap(proc)
                    if "address already in use" in exc.detail.lower() and attempt + 1 < PORT_RETRIES:
                        self.starting.remove(proc)
                        continue  # the port was taken between our check and its bind
                    raise
        except (StartFailed, LaunchError) as exc:
            reason = exc.reason if isinstance(exc, StartFailed) else str(exc)
            detail = exc.detail if isinstance(exc, StartFailed) else ""
            if proc is not None:
                with contextlib.suppress(ValueError):
                    self.starting.remove(proc)
                self.last_exit = describe_exit(proc.returncode)
            log.error("app %s failed to start: %s\n%s", self.spec.name, reason, detail)
            self.output.mark(f"start failed: {reason}")
            self._failure(reason, detail)
            return
        assert proc is not None
        self.starting.remove(proc)
        if self._closed:
            await proc.stop()
            return
        self.processes.append(proc)
        log.info("app %s ready: pid %d port %d", self.spec.name, proc.pid, proc.port)
        self._set("ready", reason="", detail="")
        self._spawn(self._watch(proc))

    async def _reap(self, proc: AppProcess) -> None:
        if proc.pid:
            await proc.stop(timeout=0)
            self._keeper.forget(proc.pid)
            self.output.mark(f"pid {proc.pid} {describe_exit(proc.returncode)}")

    # -- crashes --------------------------------------------------------------------
    async def _watch(self, proc: AppProcess) -> None:
        await proc.wait()
        if not proc.stopping:
            self._on_exit(proc)

    def _on_exit(self, proc: AppProcess) -> None:
        if proc not in self.processes:
            return
        self.processes.remove(proc)
        proc.kill_group_now()  # leftover children of a crashed leader
        self._keeper.forget(proc.pid)
        status = describe_exit(proc.returncode)
        self.last_exit = status
        self.output.mark(f"pid {proc.pid} {status}")
        log.warning("app %s: pid %d %s", self.spec.name, proc.pid, status)
        if time.monotonic() - proc.ready_at >= HEALTHY_UPTIME:
            self._backoff = BACKOFF_FIRST
        self._failure(f"process {status}", self.output.tail())

    def _failure(self, reason: str, detail: str) -> None:
        """Count a crash or failed start and choose the next state."""
        self.restarts += 1
        now = time.monotonic()
        self.rapid.record(now)
        if self.processes:  # others still serve
            self._set("ready", reason=reason, detail=detail)
        else:
            until = self.rapid.blocked_until(now)
            if until is not None:
                self._retry_at_mono = until
                self._set("backoff", reason=reason, detail=detail)
            elif self.starting:
                self._set("starting", reason=reason, detail=detail)
            else:
                self._set("failed", reason=reason, detail=detail)
        if self.spec.settings.start_mode == "always":
            self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._closed or self._restart_handle is not None:
            return
        now = time.monotonic()
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_CAP)
        until = self.rapid.blocked_until(now)
        if until is not None:
            delay = max(delay, until - now)
        loop = asyncio.get_running_loop()
        self._restart_handle = loop.call_later(delay, self._restart_now)

    def _restart_now(self) -> None:
        self._restart_handle = None
        if self.state == "backoff":
            self.state = "failed"  # need() re-checks the window and publishes
        self.need()

    # -- stopping -------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after shutdown_time_limit)."""
        self._closed = True
        if self._restart_handle is not None:
            self._restart_handle.cancel()
        procs = self.processes + self.starting
        if procs:
            self._set("draining")
        await asyncio.gather(*(self._stop_one(p) for p in procs))
        self.processes.clear()
        for task in list(self._tasks):
            task.cancel()
        self._set("stopped")
        self.output.close()

    async def _stop_one(self, proc: AppProcess) -> None:
        await proc.stop()
        self._keeper.forget(proc.pid)
        self.output.mark(f"pid {proc.pid} stopped: {describe_exit(proc.returncode)}")

    def kill_now(self) -> None:
        """SIGKILL every process group at once (emergency exit)."""
        for proc in self.processes + self.starting:
            proc.kill_group_now()

    def signal(self, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to every process of this app; return their pids (fault injection)."""
        pids = []
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
                pids.append(proc.pid)
        return pids

    # -- observing ------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """A JSON-able description of this app for ``bastion status``."""
        now = time.monotonic()
        procs = []
        for proc in self.processes:
            procs.append(
                {
                    "pid": proc.pid,
                    "port": proc.port,
                    "socket": proc.socket_path,
                    "state": "ready",
                    "uptime": round(now - proc.started_at, 3),
                    "requests": proc.requests,
                }
            )
        for proc in self.starting:
            procs.append({"pid": proc.pid, "port": proc.port, "socket": proc.socket_path,
                          "state": "starting", "uptime": round(now - proc.started_at, 3),
                          "requests": 0})
        snap = self.snapshot()
        return {
            "name": self.spec.name,
            "pool": self.spec.pool,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "retry_at": snap.retry_at,
            "processes": procs,
        }
