"""The module's front door: every app controller, the keeper, and the message interface.

Theory of operation
-------------------
The host (``proxy.main``) makes one ``Supervisor`` from the app specs, subscribes to its
``AppState`` snapshots and feeds it ``NeedApp`` / ``EndpointFailed`` /
``RequestTimedOut`` / ``UsageReport`` (and, for in-process apps, ``HostedReport`` /
``HealthReport``) messages through ``handle``. That is the whole
interface: the supervisor never sees a request, and the proxy never sees a process. ``start`` makes Bastion a child subreaper
(orphans of apps come back to it), launches the keeper and every ``always`` app, and
starts the tick that drives time-based rules; ``stop`` stops every app, then the keeper.
``status`` is the one query that the admin interface, ``bastion status`` and tests use.

What an app leaves behind is killed with it: each app process runs in a cgroup of its
own where cgroups can be used (``module.cgroups``); else, and in addition, the tick
looks at Bastion's children. Every child Bastion did not start itself came from an app
(``module.leftovers``): one carrying an app process's token or in its session is that
app process's and dies with it; one that names no app is guarded by the keeper and
killed at Bastion's stop at the latest. A child counts as a stray only when two ticks
in a row saw it, so a process Bastion is starting at that very moment (forked, not yet
registered) is never mistaken for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from .cgroups import CgroupRoot
from .controller import AppController
from .errors import UnknownApp
from .hosted import HostedController
from .keeper import Keeper
from .leftovers import (
    Orphans,
    become_subreaper,
    note_descendants,
    note_own_child,
    orphans_by_token,
    reap_children,
    reap_orphan_zombies,
    scan_strays,
    session_of,
)
from .messages import (
    AppState,
    HealthReport,
    HostedReport,
    NeedApp,
    RequestTimedOut,
    ToModule,
    UsageReport,
)
from .periodic import Guard, every
from .spec import AppSpec

log = logging.getLogger("bastion.module")

Subscriber = Callable[[AppState], None]
Controller = AppController | HostedController
# How the host replaces its worker processes one at a time (reason, pids or None: all);
# False when it cannot now. Recycling an in-process app is that.
Roll = Callable[[str, frozenset[int] | None], bool]
TICK = 0.5


class Supervisor:
    """The single authority over app processes."""

    def __init__(self, specs: Iterable[AppSpec]) -> None:
        self._keeper = Keeper()
        self._subscribers: list[Subscriber] = []
        self._ticker: asyncio.Task[None] | None = None
        self._guard = Guard(log)
        self._cgroups: CgroupRoot | None = None
        self._seen_strays: dict[int, float] = {}  # pid -> creation time, last tick
        self._unattributed: dict[int, float] = {}  # strays of no known app: killed at stop
        self.started_at = time.time()
        self.roll_workers: Roll | None = None  # set by the host (proxy.control.main)
        self.apps: dict[str, Controller] = {spec.name: self._controller(spec) for spec in specs}

    def _controller(self, spec: AppSpec) -> Controller:
        if spec.in_process:
            return HostedController(spec, self._broadcast, self._roll)
        return AppController(spec, self._keeper, self._broadcast)

    def _roll(self, reason: str, pids: frozenset[int] | None) -> bool:
        return self.roll_workers is not None and self.roll_workers(reason, pids)

    # -- the message interface ------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> list[AppState]:
        """Receive every future ``AppState``; returns the current snapshots."""
        self._subscribers.append(callback)
        return self.snapshot()

    def unsubscribe(self, callback: Subscriber) -> None:
        """Stop sending states to ``callback``."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    def snapshot(self) -> list[AppState]:
        """The current state of every app."""
        return [app.snapshot() for app in self.apps.values()]

    def handle(self, message: ToModule) -> None:
        """Act on a message from a proxy worker."""
        app = self.app(message.app)
        if isinstance(message, HostedReport):
            if isinstance(app, HostedController):
                app.hosted(message)
        elif isinstance(message, HealthReport):
            if isinstance(app, HostedController):
                app.health(message)
        elif isinstance(message, NeedApp):
            app.need()
        elif isinstance(message, UsageReport):
            app.usage(message)
        elif isinstance(message, RequestTimedOut):
            app.request_timed_out(message.pid)
        else:
            app.endpoint_failed(message.pid)

    def _broadcast(self, state: AppState) -> None:
        for callback in list(self._subscribers):
            try:
                callback(state)
            except Exception:  # a broken subscriber must not stop the module
                log.exception("state subscriber failed")

    def worker_gone(self, pid: int, returncode: int | None) -> None:
        """A proxy worker process exited (``returncode`` None: it was told to stop).
        A crash counts for the in-process apps it was loading or serving requests for
        (for every in-process app when it was doing neither)."""
        hosted = [a for a in self.apps.values() if isinstance(a, HostedController)]
        culprits = {a.spec.name for a in hosted if a.culprit(pid)}
        for app in hosted:
            app.worker_gone(pid, returncode, not culprits or app.spec.name in culprits)

    def app(self, name: str) -> Controller:
        """The controller of app ``name`` (``UnknownApp`` when there is none)."""
        app = self.apps.get(name)
        if app is None:
            raise UnknownApp(name)
        return app

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the keeper, every ``always`` app, and the periodic tick."""
        if not become_subreaper():
            log.warning("could not become a child subreaper: setsid grandchildren may escape")
        self._keeper.start()
        if self._keeper.pid is not None:
            note_own_child(self._keeper.pid)
        self._cgroups = CgroupRoot.create()
        if self._cgroups is not None:
            self._keeper.watch_cgroup(self._cgroups.path)
            log.info("app processes run in cgroups under %s", self._cgroups.path)
        else:
            log.info("no usable cgroup v2: app leftovers are found as orphans (subreaper)")
        self._keeper.cgroups = self._cgroups
        for app in self.apps.values():
            app.tick(time.monotonic())  # app_offline.htm before the first start
            if app.spec.settings.start_mode == "always":
                app.need()
        self._ticker = asyncio.create_task(every("module tick", TICK, self._tick, log))

    def _tick(self) -> None:
        """One tick. Its parts fail on their own (logged, rate-limited): an orphan scan
        that fails (EMFILE, say) leaves app_offline, draining, recycle and idle rules
        working, and the next tick tries everything again."""
        now = time.monotonic()
        orphans: Orphans = {}
        try:
            orphans = orphans_by_token()
            self._attribute_strays(orphans)
            self._guard.succeeded("orphan scan")
        except Exception:  # noqa: BLE001 - see above
            self._guard.failed("orphan scan")
        for app in self.apps.values():
            part = f"app {app.spec.name}: periodic check"
            try:
                app.tick(now, orphans)
                self._guard.succeeded(part)
            except Exception:  # noqa: BLE001
                self._guard.failed(part)
        try:
            reap_orphan_zombies()
            self._guard.succeeded("zombie sweep")
        except Exception:  # noqa: BLE001
            self._guard.failed("zombie sweep")

    def _attribute_strays(self, orphans: Orphans) -> None:
        """Add strays in an app process's session to ``orphans`` under its token (the
        tick then has that process track them); the keeper guards the ones that no
        app names, and the stop kills them."""
        processes = [p for app in self.apps.values()
                     for p in app.processes + app.starting + app.draining if p.pid]
        by_session = {p.pid: p.token for p in processes}
        live_tokens = {p.token for p in processes}
        carried = {child.pid: token for token, children in orphans.items()
                   for child in children}
        seen_now: dict[int, float] = {}
        for stray in scan_strays():
            try:
                created = stray.create_time()
            except psutil.Error:
                continue
            seen_now[stray.pid] = created
            if self._seen_strays.get(stray.pid) != created:
                continue  # seen once: maybe a child Bastion is registering right now
            if carried.get(stray.pid) in live_tokens:
                continue  # carries a live app process's token: that process tracks it
            token = by_session.get(session_of(stray.pid) or -1)
            if token is not None:
                orphans.setdefault(token, []).append(stray)
            elif stray.pid not in self._unattributed:
                self._unattributed[stray.pid] = created
                note_descendants([stray.pid])  # reaped by the sweep when it exits
                self._keeper.watch_pid(stray.pid)
                log.warning("process %d (%s) came from an app that cannot be told: "
                            "it is killed at Bastion's stop at the latest", stray.pid,
                            _describe(stray))
        self._seen_strays = seen_now
        for pid in [p for p in self._unattributed if p not in seen_now]:
            del self._unattributed[pid]
            self._keeper.forget_pid(pid)

    async def _kill_strays(self) -> None:
        """At the stop: SIGKILL every child Bastion did not start itself (all came from
        apps), whether or not a tick saw it, and reap them; then remove the cgroups."""
        victims = []
        for stray in scan_strays():
            with contextlib.suppress(psutil.Error):
                stray.kill()
                victims.append(stray.pid)
                log.info("stop: killed process %d left behind by an app", stray.pid)
        await reap_children(victims)
        for pid in self._unattributed:
            self._keeper.forget_pid(pid)
        self._unattributed.clear()
        if self._cgroups is not None:
            await self._cgroups.remove()
            self._keeper.forget_cgroup(self._cgroups.path)

    async def stop(self) -> None:
        """Stop every app gracefully, then the keeper."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        results = await asyncio.gather(*(app.stop() for app in self.apps.values()),
                                       return_exceptions=True)
        for app, result in zip(self.apps.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("app %s: stop failed: %r", app.spec.name, result)
        try:
            await self._kill_strays()
        except Exception:  # noqa: BLE001 - the keeper still kills what is left
            log.exception("stop: killing what apps left behind failed")
        self._keeper.stop()

    def kill_now(self) -> None:
        """SIGKILL every app process group (used when a graceful stop is abandoned)."""
        for app in self.apps.values():
            app.kill_now()
        with contextlib.suppress(Exception):
            if self._cgroups is not None:
                self._cgroups.kill_all()
            for stray in scan_strays():
                with contextlib.suppress(psutil.Error):
                    stray.kill()
        self._keeper.stop()

    def apply(self, specs: Iterable[AppSpec]) -> None:
        """A new configuration: add, change (recycled overlapped) and remove apps.

        Apps whose spec did not change are not touched at all.
        """
        new = {spec.name: spec for spec in specs}
        for name in [n for n in self.apps if n not in new]:
            removed = self.apps.pop(name)
            log.info("app %s removed from the configuration: stopping it", name)
            asyncio.ensure_future(removed.stop())
        for name, spec in new.items():
            existing = self.apps.get(name)
            if existing is not None and existing.spec.in_process != spec.in_process:
                log.info("app %s changes its hosting model: replaced", name)
                asyncio.ensure_future(existing.stop())
                existing = None
            if existing is None:
                added = self.apps[name] = self._controller(spec)
                self._broadcast(added.snapshot())
                if spec.settings.start_mode == "always":
                    added.need()
            elif existing.spec != spec:
                existing.update_spec(spec)

    # -- administration -------------------------------------------------------------
    def recycle(self, name: str) -> bool:
        """Overlapped restart of app ``name``; False when it runs no process."""
        return self.app(name).recycle("requested by the administrator")

    async def stop_app(self, name: str) -> None:
        """Stop app ``name`` until ``start_app``."""
        await self.app(name).admin_stop()

    def start_app(self, name: str) -> None:
        """Allow and start app ``name`` again."""
        self.app(name).admin_start()

    async def restart_app(self, name: str) -> bool:
        """Restart app ``name``: an app process controller stops every process, then
        starts; an in-process app has its worker processes replaced one at a time,
        importing the code afresh (False when Bastion cannot replace its workers)."""
        app = self.app(name)
        if isinstance(app, HostedController):
            return app.restart()
        await app.admin_stop()
        app.admin_start()
        return True

    # -- observing and fault injection ----------------------------------------------
    def status(self) -> dict[str, Any]:
        """Pools, apps and processes, JSON-able."""
        pools: dict[str, list[str]] = {}
        for app in self.apps.values():
            pools.setdefault(app.spec.pool, []).append(app.spec.name)
        return {
            "pid": os.getpid(),
            "started": self.started_at,
            "pools": pools,
            "apps": {name: app.status() for name, app in self.apps.items()},
        }

    def signal_app(self, name: str, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to every process of app ``name``."""
        return self.app(name).signal(sig)


def _describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())[:120] or proc.name()
    return "?"
