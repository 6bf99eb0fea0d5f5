"""The module's front door: every app controller, the keeper, and the message interface.

Theory of operation
-------------------
The host (``proxy.main``) makes one ``Supervisor`` from the app specs, subscribes to its
``AppState`` snapshots and feeds it ``NeedApp`` / ``EndpointFailed`` messages through
``handle``. That is the whole interface: the supervisor never sees a request, and the
proxy never sees a process. ``start`` launches the keeper and every ``always`` app;
``stop`` stops every app and then the keeper. ``status`` is the one query that the admin
interface, ``bastion status`` and tests use.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

from .controller import AppController
from .errors import UnknownApp
from .keeper import Keeper
from .messages import AppState, EndpointFailed, NeedApp
from .spec import AppSpec

log = logging.getLogger("bastion.module")

Subscriber = Callable[[AppState], None]


class Supervisor:
    """The single authority over app processes."""

    def __init__(self, specs: Iterable[AppSpec]) -> None:
        self._keeper = Keeper()
        self._subscribers: list[Subscriber] = []
        self.apps: dict[str, AppController] = {
            spec.name: AppController(spec, self._keeper, self._broadcast) for spec in specs
        }

    # -- the message interface ------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> list[AppState]:
        """Receive every future ``AppState``; returns the current snapshots."""
        self._subscribers.append(callback)
        return self.snapshot()

    def snapshot(self) -> list[AppState]:
        """The current state of every app."""
        return [app.snapshot() for app in self.apps.values()]

    def handle(self, message: NeedApp | EndpointFailed) -> None:
        """Act on a message from a proxy worker."""
        app = self.apps.get(message.app)
        if app is None:
            raise UnknownApp(message.app)
        if isinstance(message, NeedApp):
            app.need()
        else:
            app.endpoint_failed(message.pid)

    def _broadcast(self, state: AppState) -> None:
        for callback in list(self._subscribers):
            try:
                callback(state)
            except Exception:  # a broken subscriber must not stop the module
                log.exception("state subscriber failed")

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the keeper and every app whose ``start_mode`` is ``always``."""
        self._keeper.start()
        for app in self.apps.values():
            if app.spec.settings.start_mode == "always":
                app.need()

    async def stop(self) -> None:
        """Stop every app gracefully, then the keeper."""
        await asyncio.gather(*(app.stop() for app in self.apps.values()))
        self._keeper.stop()

    def kill_now(self) -> None:
        """SIGKILL every app process group (used when a graceful stop is abandoned)."""
        for app in self.apps.values():
            app.kill_now()
        self._keeper.stop()

    # -- observing and fault injection ----------------------------------------------
    def status(self) -> dict[str, object]:
        """Pools, apps and processes, JSON-able."""
        pools: dict[str, list[str]] = {}
        for app in self.apps.values():
            pools.setdefault(app.spec.pool, []).append(app.spec.name)
        return {
            "pools": pools,
            "apps": {name: app.status() for name, app in self.apps.items()},
        }

    def signal_app(self, name: str, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to every process of app ``name``."""
        app = self.apps.get(name)
        if app is None:
            raise UnknownApp(name)
        return app.signal(sig)
