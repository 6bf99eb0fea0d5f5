"""One in-process app as the module sees it: hosted by the proxy workers, not launched.

Theory of operation
-------------------
An app with ``hosting_model: in_process`` has no process of its own: every proxy worker
imports it and calls it (``proxy/edge/hosting``), the way IIS's in-process model runs
ASP.NET Core inside the IIS worker process. The module stays the one authority over
whether it may take requests, and keeps the same rules as for an app process:

* the workers report each load (``HostedReport``: loading, loaded, or failed with the
  traceback) and their usage (``UsageReport`` for their own pid); the controller
  keeps, per worker pid, what came of it, and publishes ``ready`` while loads succeed,
  ``failed`` (reason and traceback) after a failure;
* a failed load and a worker that died while hosting the app (an ``os._exit``, a
  segfault, the OOM killer, the watchdog's SIGKILL for a blocked loop:
  ``worker_gone``) count in the rapid-fail window; once it is full the app is in
  ``backoff`` (503 with ``Retry-After`` from every worker) until the oldest failure
  leaves the window. A worker that dies takes every app it hosts with it; the crash
  is counted for the apps it was still loading or serving requests for when it died
  (for all of them when there were none);
* ``app_offline.htm`` in ``cwd`` and ``bastion stop/start APP`` publish ``offline``;
* with a ``health_check``, each worker calls the app's health path itself, in-process,
  every ``interval`` and reports failures (``HealthReport``); the module counts them
  per worker pid with the rules of an app process's checks (``module.health.Liveness``:
  ``failures`` in a row, a pass resets the row) and then replaces that one worker
  (``roll`` of its pid), counting it in the rapid-fail window like a crash;
* recycling (on demand, ``recycle.max_requests`` / ``max_age`` / ``max_memory`` of a
  worker) asks the host to replace the workers one at a time (``roll``): the host owns
  the worker processes, the module only decides;
* ``bastion restart APP`` is a recycle that also forgets the rapid failures and an
  administrator's stop: fresh worker processes import the code on disk now, one at a
  time, each taking over only once it has loaded the app (as IIS restarts an
  application, or Passenger after ``restart.txt``).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from . import health
from .messages import AppState, HealthReport, HostedReport, State, UsageReport
from .output import AppOutput
from .probes import OFFLINE_FILE, read_offline_file
from .process import AppProcess, describe_exit
from .rapidfail import RapidFailWindow
from .spec import AppSpec

log = logging.getLogger("bastion.module")

Roll = Callable[[str, frozenset[int] | None], bool]
MEMORY_SAMPLE_EVERY = 2.0


@dataclass
class _Worker:
    """What one worker process made of the app."""

    pid: int
    worker: int
    loaded: bool
    since: float  # time.monotonic() of the report
    reason: str = ""
    served: int = 0
    in_flight: int = 0
    rss: int = 0
    loading: bool = False  # a load is under way there


class HostedController:
    """The module's side of one in-process app."""

    def __init__(self, spec: AppSpec, publish: Callable[[AppState], None],
                 roll: Roll | None = None) -> None:
        self.spec = spec
        self._publish = publish
        self._roll = roll
        self.output = AppOutput(spec.name, None)  # its output is Bastion's own
        self.rapid = RapidFailWindow(spec.settings.rapid_fails_per_minute)
        self.version = 0
        self.state: State = "ready"
        self.phase = "hosted"
        self.reason = ""
        self.detail = ""
        self.offline_body: str | None = None
        self.held = False  # stopped by the administrator
        self.closing = False
        self.workers: dict[int, _Worker] = {}  # pid -> its report
        self.restarts = 0  # worker crashes while hosting it
        self.recycles = 0
        self.last_exit = ""
        self._retry_at: float | None = None
        self._last_memory_sample = 0.0
        self._liveness: dict[int, health.Liveness] = {}  # worker pid -> its checks' row
        self._restart_due = False  # a restart waits for a roll under way to end
        # An app process controller's lists: an in-process app has no process of its own.
        self.processes: list[AppProcess] = []
        self.starting: list[AppProcess] = []
        self.draining: list[AppProcess] = []

    # -- publishing -----------------------------------------------------------------
    def snapshot(self) -> AppState:
        """The app's current picture for the workers."""
        return AppState(self.spec.name, self.version, self.state, (), self._retry_at,
                        self.reason, self.detail, self.offline_body)

    def _set(self, state: State, reason: str | None = None, detail: str | None = None) -> None:
        self.state = state
        if reason is not None:
            self.reason = reason
        if detail is not None:
            self.detail = detail
        if state != "backoff":
            self._retry_at = None
        self.version += 1
        self._publish(self.snapshot())

    def _serving_state(self) -> State | None:
        """offline / draining when that overrides everything, else None."""
        if self.closing:
            return "draining"
        if self.held or self.offline_body is not None:
            return "offline"
        return None

    # -- from the workers -----------------------------------------------------------
    def hosted(self, report: HostedReport) -> None:
        """A worker began loading the app, loaded it, or failed to."""
        now = time.monotonic()
        previous = self.workers.get(report.pid)
        record = _Worker(report.pid, report.worker, report.status == "loaded", now,
                         report.reason, loading=report.status == "loading")
        if previous is not None:
            record.served, record.in_flight = previous.served, previous.in_flight
        self.workers[report.pid] = record
        if report.status == "loading":
            return
        if report.status == "failed":
            self.output.mark(f"worker pid {report.pid}: {report.reason}")
            self._failure(report.reason, report.detail)
        elif self.state in ("failed", "ready") and self._serving_state() is None:
            if self.state != "ready" or self.reason:
                self._set("ready", reason="", detail="")

    def usage(self, report: UsageReport) -> None:
        """A worker's request counters for its own pid."""
        for usage in report.processes:
            record = self.workers.get(usage.pid)
            if record is not None:
                record.served, record.in_flight = usage.served, usage.in_flight

    def worker_gone(self, pid: int, returncode: int | None, culprit: bool) -> None:
        """Worker ``pid`` exited; ``returncode`` None: it was told to stop. A crash of a
        worker this app was ``culprit`` for counts as this app's crash."""
        self.workers.pop(pid, None)
        self._liveness.pop(pid, None)
        if returncode is None or not culprit:
            return
        how = describe_exit(returncode)
        self.restarts += 1
        self.last_exit = f"worker pid {pid} {how}"
        self.output.mark(f"worker pid {pid} hosting the app {how}")
        self._failure(f"the worker process hosting it (pid {pid}) {how}", "")

    def health(self, report: HealthReport) -> None:
        """Worker ``report.pid``'s health check of the app failed, or passed again:
        ``failures`` in a row replace that worker (and count as a failure)."""
        check = self.spec.settings.health_check
        if check is None or report.pid not in self.workers:
            return
        record = self._liveness.setdefault(report.pid, health.Liveness())
        if report.healthy:
            record.check_passed()
            return
        log.warning("app %s: worker pid %d health check failed (%d of %d): %s",
                    self.spec.name, report.pid, record.failed_checks + 1, check.failures,
                    report.reason)
        self.output.mark(f"worker pid {report.pid} health check {check.path} failed: "
                         f"{report.reason}")
        if not record.check_failed(check.failures):
            return
        if self.state == "backoff" or self._serving_state() is not None:
            return  # resting or not serving: replaced, if still failing, once it serves
        why = (f"worker pid {report.pid} failed {record.failed_checks} health checks in a "
               f"row (last: {report.reason})")
        if self._roll is None or not self._roll(f"app {self.spec.name}: {why}",
                                                frozenset({report.pid})):
            return  # a roll is under way: the next failed check tries again
        record.replaced()
        self.recycles += 1
        log.warning("app %s: replacing worker pid %d: %s", self.spec.name, report.pid, why)
        self._failure(why, "")

    def culprit(self, pid: int) -> bool | None:
        """Whether a death of worker ``pid`` is likely this app's doing: True while it
        was loading there or serving requests, None otherwise (idle, or its import had
        failed and was over)."""
        record = self.workers.get(pid)
        if record is None or record.loading:
            return True  # the worker died loading it (or before)
        if record.loaded and record.in_flight:
            return True
        return None

    def _failure(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        self.rapid.record(now)
        blocked = self.rapid.blocked_until(now)
        override = self._serving_state()
        if override is not None:
            self.reason = reason
            return
        if blocked is not None:
            log.error("app %s: rapid-fail protection, refused until %.0fs from now",
                      self.spec.name, blocked - now)
            self._retry_at = blocked
            self.state = "backoff"
            self.reason, self.detail = reason, detail
            self.version += 1
            self._publish(self.snapshot())
        else:
            self._set("failed", reason=reason, detail=detail)

    # -- what an app process controller is told too ---------------------------------
    def need(self) -> None:
        """A request wants the app: the workers load it themselves; nothing to start."""

    def endpoint_failed(self, pid: int) -> None:
        """Not sent for an in-process app (there is no connection)."""
        del pid

    def request_timed_out(self, pid: int) -> None:
        """A request of the app timed out in worker ``pid`` (the worker answered 504)."""
        del pid

    def tick(self, now: float, orphans: object = None) -> None:
        """Backoff expiry, app_offline.htm, recycle triggers."""
        del orphans
        if self.state == "backoff" and self.rapid.blocked_until(now) is None:
            self._set("failed")  # the next request loads it again
        if self._restart_due:
            self._begin_restart()
        self._check_offline()
        self._check_recycle(now)

    def _check_offline(self) -> None:
        try:
            body = read_offline_file(self.spec.cwd)
        except OSError:
            return
        if body == self.offline_body:
            return
        first = self.offline_body is None
        self.offline_body = body
        if body is None:
            log.info("app %s: %s removed, back online", self.spec.name, OFFLINE_FILE)
            if self._serving_state() is None:
                self._set("ready", reason="")
        else:
            if first:
                log.info("app %s: %s found, taking the app offline", self.spec.name,
                         OFFLINE_FILE)
            if not self.closing:
                self._set("offline", reason=f"{OFFLINE_FILE} present")

    def _check_recycle(self, now: float) -> None:
        settings = self.spec.settings.recycle
        if not (settings.max_age or settings.max_requests or settings.max_memory):
            return
        if settings.max_memory and now - self._last_memory_sample >= MEMORY_SAMPLE_EVERY:
            self._last_memory_sample = now
            for record in self.workers.values():
                try:
                    record.rss = psutil.Process(record.pid).memory_info().rss
                except psutil.Error:
                    record.rss = 0
        due = frozenset(
            r.pid for r in self.workers.values() if r.loaded and (
                (settings.max_age and now - r.since >= settings.max_age)
                or (settings.max_requests and r.served >= settings.max_requests)
                or (settings.max_memory and r.rss >= settings.max_memory)))
        if due and self._roll is not None and self._roll(
                f"app {self.spec.name}: recycle limit reached", due):
            self.recycles += 1

    # -- administration -------------------------------------------------------------
    def update_spec(self, spec: AppSpec) -> None:
        """A reload changed the app: the new generation of workers loads the new one."""
        self.spec = spec
        self.rapid = RapidFailWindow(spec.settings.rapid_fails_per_minute)
        if self.state in ("failed", "backoff") and self._serving_state() is None:
            self._set("ready", reason="", detail="")

    def recycle(self, reason: str = "requested") -> bool:
        """Replace the workers hosting the app one at a time."""
        if self._roll is None or not self._roll(f"app {self.spec.name}: {reason}", None):
            return False
        self.recycles += 1
        return True

    def restart(self) -> bool:
        """``POST /apps/NAME/restart``: allowed again (as ``admin_start``), and every
        worker replaced, one at a time, by one that imports the app afresh. When the
        workers are being replaced already (a roll that may have begun before the code
        changed), the restart's own roll begins as soon as that one ends (``tick``).
        False when there is no host to replace workers."""
        if self._roll is None:
            return False
        self.admin_start()
        self._restart_due = True
        self._begin_restart()
        return True

    def _begin_restart(self) -> None:
        if self._roll is not None and self._roll(
                f"app {self.spec.name}: restart (the code on disk loaded afresh)", None):
            self._restart_due = False
            self.recycles += 1

    async def admin_stop(self) -> None:
        """``POST /apps/NAME/stop``: 503 until ``admin_start``."""
        self.held = True
        if not self.closing:
            self._set("offline", reason="stopped by the administrator", detail="")

    def admin_start(self) -> None:
        """``POST /apps/NAME/start``: allowed again, rapid failures forgotten."""
        self.held = False
        self.rapid.clear()
        override = self._serving_state()
        self._set(override or "ready",
                  reason=f"{OFFLINE_FILE} present" if override == "offline" else "",
                  detail="")

    async def stop(self) -> None:
        """Bastion stops: the workers stop calling it (they run its shutdown)."""
        self.closing = True
        self._set("draining")
        self._set("stopped")
        self.output.close()

    def kill_now(self) -> None:
        """Nothing of its own to kill: its workers are the host's."""

    def signal(self, sig: signal.Signals) -> list[int]:
        """An in-process app has no process of its own to signal."""
        del sig
        return []

    def served(self, pid: int) -> int:
        """Requests served by worker ``pid``."""
        record = self.workers.get(pid)
        return record.served if record is not None else 0

    def in_flight(self, pid: int) -> int:
        """Requests worker ``pid`` is serving now."""
        record = self.workers.get(pid)
        return record.in_flight if record is not None else 0

    # -- observing ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-able description for ``bastion status``: the workers hosting it."""
        now = time.monotonic()
        wall = time.time()
        procs = []
        for record in sorted(self.workers.values(), key=lambda r: r.worker):
            try:
                rss = psutil.Process(record.pid).memory_info().rss
            except psutil.Error:
                rss = 0
            procs.append({
                "pid": record.pid,
                "worker": record.worker,
                "port": None,
                "socket": None,
                "state": "ready" if record.loaded
                else "starting" if record.loading else "failed",
                "reason": record.reason,
                "started": round(wall - (now - record.since), 3),
                "uptime": round(now - record.since, 3),
                "requests": record.served,
                "in_flight": record.in_flight,
                "rss": rss,
                "cpu_percent": 0.0,
            })
        retry_at = None
        if self.state == "backoff" and self._retry_at is not None:
            retry_at = wall + max(0.0, self._retry_at - now)
        return {
            "name": self.spec.name,
            "pool": self.spec.pool,
            "hosting_model": "in_process",
            "app": self.spec.app,
            "interface": self.spec.interface,
            "state": self.state,
            "phase": self.phase,
            "restarts": self.restarts,
            "recycles": self.recycles,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "detail": self.detail,
            "retry_at": retry_at,
            "processes": procs,
        }
