"""One app's lifecycle: start, crash restart, rapid-fail, recycle, idle stop, app_offline.

Theory of operation
-------------------
An ``AppController`` owns the processes of one app and publishes an ``AppState`` snapshot
whenever anything changes. Its phase changes in one place, ``_go(event)``, through the
pure table of ``module.states`` (which also says what each phase is published as); every
change bumps ``version`` and publishes. The controller does the I/O around the table:
it launches and stops processes, and gathers the facts the table's guards and the rules
of ``module.policy`` need (psutil sampling and file reads live in ``module.probes``).
A crash or failed start is counted in the rapid-fail window; once the window is full the
phase is ``backoff`` until ``retry_at`` and needs are refused. A ready process that no
longer answers (failed health checks, request timeouts in a row: ``module.health``) is
replaced by the same overlapped recycle, for that one process.

Processes live in three lists: ``starting``, ``processes`` (ready: they are the published
endpoints) and ``draining`` (withdrawn, finishing their requests). ``need()`` is an
idempotent hint from the proxy. With ``processes_per_app: N`` a start launches N
processes and the app is ``ready`` as soon as one listens. A ready process that dies is a
crash: whatever it left behind is killed, it is counted, its endpoint withdrawn at once.

A recycle is always overlapped: replacements start while the old processes serve; each
old process is withdrawn only when a replacement is ready, then drains (no request in
flight by the workers' usage reports, or ``request_timeout`` passed) and is stopped.
``tick()`` (twice a second, from the supervisor) drives the time-based rules: recycle
triggers, idle stop, app_offline.htm, draining, and descendant tracking. The rules
themselves are pure functions in ``module.policy``.
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
from dataclasses import replace
from typing import Any

from . import health, policy, states
from .errors import LaunchError, StartFailed
from .keeper import Keeper
from .leftovers import Orphans
from .messages import AppState, Endpoint, ProcessUsage, State, UsageReport
from .output import AppOutput
from .ports import pick_free_port
from .probes import OFFLINE_FILE, read_offline_file, tree_usage
from .process import AppProcess, describe_exit
from .rapidfail import RapidFailWindow
from .spec import AppSpec, HealthCheck
from .states import Event, Phase

log = logging.getLogger("bastion.module")

PORT_RETRIES = 3
MEMORY_SAMPLE_EVERY = 2.0


def _without_health_check(spec: AppSpec) -> AppSpec:
    return replace(spec, settings=replace(spec.settings, health_check=None))


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
        self.phase: Phase = "stopped"
        self.version = 0
        self.processes: list[AppProcess] = []  # ready, taking requests
        self.starting: list[AppProcess] = []
        self.draining: list[AppProcess] = []
        self.restarts = 0
        self.recycles = 0
        self.last_exit = ""
        self.reason = ""
        self.detail = ""
        self.offline_body: str | None = None  # app_offline.htm's content while present
        self.last_active = time.monotonic()
        self._usage: dict[int, dict[int, ProcessUsage]] = {}  # worker -> pid -> usage
        self._retry_at_mono: float | None = None  # time.monotonic(), as published
        self._backoff = 0.0  # the first restart of an ``always`` app is immediate
        self._tasks: set[asyncio.Task[None]] = set()
        self._restart_handle: asyncio.TimerHandle | None = None
        self._last_memory_sample = 0.0
        self._tree_rss: dict[int, int] = {}
        self._liveness: dict[int, health.Liveness] = {}  # pid -> record, ready processes

    @property
    def state(self) -> State:
        """The published state (``module.messages.State``) of the current phase."""
        return states.PUBLISHED[self.phase]

    # -- the one place the phase changes --------------------------------------------
    def _facts(self) -> states.Facts:
        return states.Facts(
            serving=len(self.processes),
            launching=len(self.starting),
            resting=self.rapid.blocked_until(time.monotonic()) is not None,
            offline_file=self.offline_body is not None,
        )

    def _go(self, event: Event, reason: str | None = None, detail: str | None = None) -> Phase:
        """Apply ``event`` by the table, then bump the version and publish."""
        self.phase = states.transition(self.phase, event, self._facts())
        if reason is not None:
            self.reason = reason
        if detail is not None:
            self.detail = detail
        self.version += 1
        self._publish(self.snapshot())
        return self.phase

    @property
    def _live(self) -> bool:
        return self.phase not in ("closing", "closed")

    # -- publishing -----------------------------------------------------------------
    def snapshot(self) -> AppState:
        """The current picture of this app, as sent to proxy workers."""
        retry_at = self._retry_at_mono if self.phase == "backoff" else None
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
            offline_body=self.offline_body,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- messages from the proxy ----------------------------------------------------
    def need(self) -> None:
        """A request wants this app: start it unless it is starting, ready or resting."""
        self.last_active = time.monotonic()
        if self.phase in states.NO_PROCESSES or self.phase == "starting":
            return
        if self.phase in ("ready", "recycling") and not self._missing():
            return
        now = time.monotonic()
        until = self.rapid.blocked_until(now)
        if until is not None:
            if states.allowed(self.phase, "rest"):  # serving processes keep serving
                self._retry_at_mono = until
                self._go("rest")
            return
        self._start()

    def _missing(self) -> int:
        """Processes short of ``processes_per_app`` (not counting those starting)."""
        wanted = max(1, self.spec.settings.processes_per_app)
        return max(0, wanted - len(self.processes) - len(self.starting))

    def endpoint_failed(self, pid: int) -> None:
        """The proxy could not connect to ``pid``: withdraw it if it is really gone."""
        for proc in self.processes:
            if proc.pid == pid and not proc.alive:
                self._on_exit(proc)
                return

    def usage(self, report: UsageReport) -> None:
        """Take one worker's request counters for this app."""
        # A report is sent only when a count changed: a request began or ended. The
        # idle clock therefore runs from the end of the last request.
        self._usage[report.worker] = {u.pid: u for u in report.processes}
        self.last_active = time.monotonic()
        for proc in self.processes:
            record = self._liveness.get(proc.pid)
            if record is not None:
                record.completed(self.served(proc.pid) - self.in_flight(proc.pid))

    def request_timed_out(self, pid: int) -> None:
        """A worker's request to ``pid`` timed out (504); replace it after a few in a row."""
        proc = next((p for p in self.processes if p.pid == pid), None)
        if proc is None:
            return
        record = self._liveness_of(proc)
        if record.timed_out():
            why = f"{record.timeouts} request timeouts in a row"
            if self.replace(proc, why):
                record.replaced()

    def served(self, pid: int) -> int:
        """Requests sent to ``pid``, summed over workers."""
        return sum(w[pid].served for w in self._usage.values() if pid in w)

    def in_flight(self, pid: int) -> int:
        """Requests ``pid`` is serving now, summed over workers."""
        return sum(w[pid].in_flight for w in self._usage.values() if pid in w)

    # -- starting -------------------------------------------------------------------
    def _start(self) -> None:
        if self._missing() <= 0 or not self._live:
            return
        wanted = self._missing()
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None
        if not self.processes:
            self._go("start", reason="")
        for _ in range(wanted):
            self._spawn(self._start_one())

    def _new_process(self, avoid: set[int]) -> AppProcess:
        if self.spec.transport == "unix":
            directory = tempfile.mkdtemp(prefix=f"bastion-{self.spec.name}-")
            return AppProcess(self.spec, 0, os.path.join(directory, "app.sock"))
        return AppProcess(self.spec, pick_free_port(avoid))

    async def _launch_until_ready(self) -> AppProcess:
        """Start one process and wait until it listens (another port if its was taken)."""
        tried: set[int] = set()
        for attempt in range(PORT_RETRIES):
            proc = self._new_process(tried)
            tried.add(proc.port)
            self.starting.append(proc)
            try:
                await proc.launch(self.output, self._keeper)
                await proc.wait_ready(self.output)
                return proc
            except StartFailed as exc:
                self.last_exit = describe_exit(proc.returncode)
                await proc.stop(timeout=0)
                self.output.mark(f"pid {proc.pid} {describe_exit(proc.returncode)}")
                taken = exc.port_taken or "address already in use" in exc.detail.lower()
                if not taken or attempt + 1 == PORT_RETRIES:
                    raise
                log.warning("app %s: %s; trying another port", self.spec.name, exc.reason)
                self.output.mark(f"{exc.reason}; trying another port")
            finally:
                self.starting.remove(proc)
        raise AssertionError("unreachable")

    async def _start_one(self) -> None:
        try:
            proc = await self._launch_until_ready()
        except Exception as exc:  # noqa: BLE001 - any launch problem is a failed start
            reason = exc.reason if isinstance(exc, StartFailed) else str(exc) or repr(exc)
            detail = exc.detail if isinstance(exc, StartFailed) else ""
            if not isinstance(exc, StartFailed | LaunchError):
                log.exception("app %s: unexpected error while starting", self.spec.name)
            log.error("app %s failed to start: %s\n%s", self.spec.name, reason, detail)
            self.output.mark(f"start failed: {reason}")
            self._failure(reason, detail)
            return
        if not states.allowed(self.phase, "up"):
            await self._stop_one(proc)  # offline or stopped while it was starting
            return
        self.processes.append(proc)
        log.info("app %s ready: pid %d port %d", self.spec.name, proc.pid, proc.port)
        self._go("up", reason="", detail="")
        self._spawn(self._watch(proc))

    # -- crashes --------------------------------------------------------------------
    async def _watch(self, proc: AppProcess) -> None:
        await proc.wait()
        if not proc.stopping:
            self._on_exit(proc)
            await proc.clean_up()

    def _on_exit(self, proc: AppProcess) -> None:
        if proc not in self.processes:
            return
        self.processes.remove(proc)
        proc.kill_group_now()  # leftover children of a crashed leader
        status = describe_exit(proc.returncode)
        self.last_exit = status
        self.output.mark(f"pid {proc.pid} {status}")
        log.warning("app %s: pid %d %s", self.spec.name, proc.pid, status)
        uptime = time.monotonic() - proc.ready_at
        self._backoff = policy.backoff_after_exit(self._backoff, uptime)
        self._failure(f"process {status}", self.output.tail())

    def _failure(self, reason: str, detail: str) -> None:
        """Count a crash or failed start and let the table choose the next phase."""
        self.restarts += 1
        now = time.monotonic()
        self.rapid.record(now)
        until = self.rapid.blocked_until(now)
        if until is not None:
            self._retry_at_mono = until
        phase = self._go("failure", reason=reason, detail=detail)
        if phase in ("ready", "recycling"):  # others still serve: replace the lost one
            if until is None:
                self._start()
        elif phase in ("starting", "failed", "backoff") \
                and self.spec.settings.start_mode == "always":
            self._schedule_restart()

    def _schedule_restart(self) -> None:
        if not self._live or self._restart_handle is not None:
            return
        now = time.monotonic()
        delay = self._backoff
        self._backoff = policy.next_backoff(self._backoff)
        until = self.rapid.blocked_until(now)
        if until is not None:
            delay = max(delay, until - now)
        loop = asyncio.get_running_loop()
        self._restart_handle = loop.call_later(delay, self._restart_now)

    def _restart_now(self) -> None:
        # need() re-checks the rapid-fail window: still full, it rests again (and
        # publishes the new retry_at); else it starts.
        self._restart_handle = None
        self.need()

    def update_spec(self, spec: AppSpec) -> None:
        """A changed configuration: new processes use ``spec``; running ones recycle."""
        old = self.spec
        self.spec = spec
        self.rapid.limit = spec.settings.rapid_fails_per_minute
        if spec.stdout_log != old.stdout_log:
            self.output.path = spec.stdout_log
            self.output.reopen()
        log.info("app %s: configuration changed", spec.name)
        if _without_health_check(spec) == _without_health_check(old):
            return  # the next checks use the new settings; processes are kept
        if self.processes:
            self.recycle("configuration changed")
        elif spec.settings.start_mode == "always":
            self.need()

    # -- recycling ------------------------------------------------------------------
    def recycle(self, reason: str = "requested") -> bool:
        """Overlapped restart of every process; False when there is nothing to recycle."""
        if self.phase != "ready" or not self.processes:
            return False
        self.recycles += 1
        log.info("app %s: recycling (%s)", self.spec.name, reason)
        self.output.mark(f"recycle: {reason}")
        self._go("recycle")
        self._spawn(self._recycle(list(self.processes)))
        return True

    def replace(self, proc: AppProcess, reason: str) -> bool:
        """Overlapped restart of one ready process that stopped answering; False when
        that cannot begin now (another recycle is under way: it is checked again)."""
        if self.phase != "ready" or proc not in self.processes:
            return False
        self.recycles += 1
        log.warning("app %s: replacing pid %d (%s)", self.spec.name, proc.pid, reason)
        self.output.mark(f"replacing pid {proc.pid}: {reason}")
        self._go("recycle")
        self._spawn(self._recycle([proc]))
        return True

    async def _recycle(self, old: list[AppProcess]) -> None:
        try:
            for proc in old:
                if proc not in self.processes:
                    continue  # crashed meanwhile: the crash path replaced it
                try:
                    new = await self._launch_until_ready()
                except (StartFailed, LaunchError) as exc:
                    reason = exc.reason if isinstance(exc, StartFailed) else str(exc)
                    log.error("app %s: recycle start failed: %s", self.spec.name, reason)
                    self.output.mark(f"recycle start failed: {reason}; old process kept")
                    self.rapid.record(time.monotonic())
                    return
                if not states.allowed(self.phase, "up"):
                    await self._stop_one(new)
                    return
                self.processes.append(new)
                self._spawn(self._watch(new))
                if proc in self.processes:
                    self._withdraw(proc)
                self._go("up")
        finally:
            if self.phase == "recycling":
                self._go("recycled")

    def _withdraw(self, proc: AppProcess) -> None:
        """Stop sending requests to ``proc``; it drains, then ``tick`` stops it."""
        self.processes.remove(proc)
        proc.draining_since = time.monotonic()
        proc.stopping = True
        self.draining.append(proc)

    # -- the periodic tick ----------------------------------------------------------
    def tick(self, now: float, orphans: Orphans | None = None) -> None:
        """Time-based rules: app_offline, draining, recycle triggers, idle stop."""
        if not self._live:
            return
        self._check_offline()
        for proc in list(self.draining):
            if policy.drained(self.in_flight(proc.pid), proc.draining_since,
                              self.spec.settings.request_timeout, now):
                self.draining.remove(proc)
                self._spawn(self._stop_one(proc))
        for proc in self.processes:
            proc.refresh_descendants(orphans)
        self._check_health(now)
        self._check_recycle(now)
        if self.processes and not self.starting and policy.is_idle(
            self.spec.settings.idle_timeout, self.last_active,
            sum(self.in_flight(p.pid) for p in self.processes), now,
        ) and self.spec.settings.start_mode == "on_demand" \
                and states.allowed(self.phase, "idle"):
            log.info("app %s: idle for %gs, stopping", self.spec.name,
                     self.spec.settings.idle_timeout)
            self._spawn(self._stop_all("idle", "idle"))

    def _liveness_of(self, proc: AppProcess) -> health.Liveness:
        """The liveness record of a ready process, made when first needed: its first
        check one interval later, its timeout row counted from the requests done now."""
        record = self._liveness.get(proc.pid)
        if record is None:
            check = self.spec.settings.health_check
            record = self._liveness[proc.pid] = health.Liveness(
                next_check=time.monotonic() + (check.interval if check else 0.0),
                completed_mark=self.served(proc.pid) - self.in_flight(proc.pid))
        return record

    def _check_health(self, now: float) -> None:
        """Start the health checks that are due (``health_check``; off when None)."""
        ready = {p.pid for p in self.processes}
        for pid in [pid for pid in self._liveness if pid not in ready]:
            del self._liveness[pid]
        check = self.spec.settings.health_check
        if check is None:
            return
        for proc in self.processes:
            record = self._liveness_of(proc)
            if record.check_due(now):
                record.checking = True
                self._spawn(self._health_check(proc, record, check))

    async def _health_check(self, proc: AppProcess, record: health.Liveness,
                            check: HealthCheck) -> None:
        try:
            why = await health.probe(proc.port, proc.socket_path,
                                     self.spec.path_base + check.path, proc.token,
                                     check.timeout)
        finally:
            record.checking = False
            record.next_check = time.monotonic() + check.interval
        if proc not in self.processes:
            return  # withdrawn or gone meanwhile
        if why is None:
            record.check_passed()
            return
        log.warning("app %s: pid %d health check failed (%d of %d): %s", self.spec.name,
                    proc.pid, record.failed_checks + 1, check.failures, why)
        self.output.mark(f"pid {proc.pid} health check {check.path} failed: {why}")
        if record.check_failed(check.failures):
            if self.replace(proc, f"{record.failed_checks} failed health checks in a row"
                            f" (last: {why})"):
                record.replaced()

    def _check_recycle(self, now: float) -> None:
        rules = self.spec.settings.recycle
        if self.phase != "ready" or not self.processes:
            return
        if rules.max_memory > 0 and now - self._last_memory_sample >= MEMORY_SAMPLE_EVERY:
            self._last_memory_sample = now
            self._tree_rss = {p.pid: tree_usage(p.pid)[0] for p in self.processes}
        for proc in self.processes:
            facts = policy.ProcessFacts(now - proc.ready_at, self.served(proc.pid),
                                        self._tree_rss.get(proc.pid, 0))
            reason = policy.recycle_reason(rules, facts)
            if reason is not None:
                self.recycle(reason)
                return

    def _check_offline(self) -> None:
        try:
            body = read_offline_file(self.spec.cwd)
        except OSError:
            return  # unreadable for now: keep what we knew
        if body is None:
            if self.offline_body is not None:
                log.info("app %s: %s removed, back online", self.spec.name, OFFLINE_FILE)
                self.offline_body = None
                if not states.allowed(self.phase, "online"):
                    return  # its stop has not begun yet, or Bastion is stopping
                held = self.phase == "held"
                self._go("online", reason="stopped by the administrator" if held else "")
                if self.phase == "stopped" and self.spec.settings.start_mode == "always":
                    self.need()
            return
        if self.offline_body != body:
            first = self.offline_body is None
            self.offline_body = body
            if first:
                log.info("app %s: %s found, taking the app offline", self.spec.name, OFFLINE_FILE)
                self._spawn(self._stop_all("offline", f"{OFFLINE_FILE} present"))
            else:
                self._go("offline")

    # -- stopping -------------------------------------------------------------------
    async def _stop_all(self, event: Event, reason: str) -> None:
        """Withdraw and stop every process; ``event`` says which phase follows."""
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None
        if not states.allowed(self.phase, event):
            return  # closing: stop() takes care of the processes
        procs = self.processes + self.draining
        self.processes = []
        self.draining = []
        self._go(event, reason=reason, detail="")
        for proc in procs:
            proc.stopping = True
        await asyncio.gather(*(self._stop_one(p) for p in procs))

    async def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after shutdown_time_limit)."""
        if self.phase == "closed":
            return
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None
        procs = self.processes + self.starting + self.draining
        if procs:
            self._go("close")
        await asyncio.gather(*(self._stop_one(p) for p in procs))
        self.processes.clear()
        self.draining.clear()
        for task in list(self._tasks):
            task.cancel()
        self._go("closed")
        self.output.close()

    async def admin_stop(self) -> None:
        """``POST /apps/NAME/stop``: stop it; requests get 503 until ``admin_start``."""
        await self._stop_all("admin_stop", "stopped by the administrator")

    def admin_start(self) -> None:
        """``POST /apps/NAME/start``: allow it again, forget rapid failures, start it."""
        self.rapid.clear()
        if self.phase == "held":
            self._go("admin_start", reason=f"{OFFLINE_FILE} present"
                     if self.offline_body is not None else "")
        self.need()

    async def _stop_one(self, proc: AppProcess) -> None:
        await proc.stop()
        self.output.mark(f"pid {proc.pid} stopped: {describe_exit(proc.returncode)}")

    def kill_now(self) -> None:
        """SIGKILL every process group at once (emergency exit)."""
        for proc in self.processes + self.starting + self.draining:
            proc.kill_group_now()

    def signal(self, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to every ready process of this app; return their pids."""
        pids = []
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
                pids.append(proc.pid)
        return pids

    # -- observing ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-able description of this app for ``bastion status``."""
        now = time.monotonic()
        wall = time.time()
        procs = []
        groups = (("ready", self.processes), ("starting", self.starting),
                  ("draining", self.draining))
        for state, group in groups:
            for proc in group:
                if not proc.pid:
                    continue  # chosen a port, not launched yet: nothing to show
                rss, cpu = tree_usage(proc.pid)
                procs.append({
                    "pid": proc.pid,
                    "port": proc.port,
                    "socket": proc.socket_path,
                    "state": state,
                    "started": round(wall - (now - proc.started_at), 3),
                    "uptime": round(now - proc.started_at, 3),
                    "requests": self.served(proc.pid),
                    "in_flight": self.in_flight(proc.pid),
                    "rss": rss,
                    "cpu_percent": cpu,
                })
        retry_at = None  # shown as wall-clock time
        if self.phase == "backoff" and self._retry_at_mono is not None:
            retry_at = wall + max(0.0, self._retry_at_mono - now)
        return {
            "name": self.spec.name,
            "pool": self.spec.pool,
            "state": self.state,
            "phase": self.phase,
            "restarts": self.restarts,
            "recycles": self.recycles,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "retry_at": retry_at,
            "processes": procs,
        }
