"""The module's front door: every app controller, the keeper, and the message interface.

Theory of operation
-------------------
The host (``proxy.main``) makes one ``Supervisor`` from the app specs, subscribes to its
``AppState`` snapshots and feeds it ``NeedApp`` / ``EndpointFailed`` / ``UsageReport``
messages through ``handle``. That is the whole interface: the supervisor never sees a
request, and the proxy never sees a process. ``start`` makes Bastion a child subreaper
(orphans of apps come back to it), launches the keeper and every ``always`` app, and
starts the tick that drives time-based rules; ``stop`` stops every app, then the keeper.
``status`` is the one query that the admin interface, ``bastion status`` and tests use.
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

from .controller import AppController
from .errors import UnknownApp
from .keeper import Keeper
from .leftovers import Orphans, become_subreaper, orphans_by_token, reap_orphan_zombies
from .messages import AppState, EndpointFailed, NeedApp, UsageReport
from .periodic import Guard, every
from .spec import AppSpec

log = logging.getLogger("bastion.module")

Subscriber = Callable[[AppState], None]
TICK = 0.5


class Supervisor:
    """The single authority over app processes."""

    def __init__(self, specs: Iterable[AppSpec]) -> None:
        self._keeper = Keeper()
        self._subscribers: list[Subscriber] = []
        self._ticker: asyncio.Task[None] | None = None
        self._guard = Guard(log)
        self.started_at = time.time()
        self.apps: dict[str, AppController] = {
            spec.name: AppController(spec, self._keeper, self._broadcast) for spec in specs
        }

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

    def handle(self, message: NeedApp | EndpointFailed | UsageReport) -> None:
        """Act on a message from a proxy worker."""
        app = self.app(message.app)
        if isinstance(message, NeedApp):
            app.need()
        elif isinstance(message, UsageReport):
            app.usage(message)
        else:
            app.endpoint_failed(message.pid)

    def _broadcast(self, state: AppState) -> None:
        for callback in list(self._subscribers):
            try:
                callback(state)
            except Exception:  # a broken subscriber must not stop the module
                log.exception("state subscriber failed")

    def app(self, name: str) -> AppController:
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
        self._keeper.stop()

    def kill_now(self) -> None:
        """SIGKILL every app process group (used when a graceful stop is abandoned)."""
        for app in self.apps.values():
            app.kill_now()
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
            if existing is None:
                added = self.apps[name] = AppController(spec, self._keeper, self._broadcast)
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
