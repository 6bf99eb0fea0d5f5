"""The admin socket: HTTP over a Unix socket (mode 0660) for ``bastion`` commands and tools.

SPEC section 8: ``GET /status`` (JSON: pools, apps, processes with pid, port, state,
uptime, requests, in flight, RSS, CPU; restarts; last exit), ``GET /metrics``
(Prometheus text), ``POST /reload``, ``POST /apps/NAME/recycle``,
``POST /apps/NAME/stop`` and ``POST /apps/NAME/start``. Every handler only calls the
module's ``Supervisor``; nothing here touches a process. When the socket's directory
cannot be created (the demo as a normal user with the default ``/run/bastion``),
Bastion logs one warning and runs without it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from aiohttp import web

from module.errors import UnknownApp

from .metrics import render

if TYPE_CHECKING:
    from .main import Bastion

log = logging.getLogger("bastion.admin")


class AdminServer:
    """Serves the admin API on ``config.admin_socket``."""

    def __init__(self, bastion: Bastion) -> None:
        self.bastion = bastion
        self.path = bastion.config.admin_socket
        self._runner: web.AppRunner | None = None

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.bastion.status())

    async def _metrics(self, request: web.Request) -> web.Response:
        text = render(self.bastion.metrics(), self.bastion.status(), len(self.bastion.workers))
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _reload(self, request: web.Request) -> web.Response:
        applied, problems = await self.bastion.reload()
        status = 200 if applied else 400
        return web.json_response({"reloaded": applied, "problems": problems}, status=status)

    async def _app_action(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        action = request.match_info["action"]
        supervisor = self.bastion.supervisor
        try:
            if action == "recycle":
                done = supervisor.recycle(name)
                if not done:
                    return web.json_response(
                        {"app": name, "error": "no running process to recycle"}, status=409)
            elif action == "stop":
                await supervisor.stop_app(name)
            else:
                supervisor.start_app(name)
        except UnknownApp:
            return web.json_response({"error": f"no app named {name!r}"}, status=404)
        log.info("admin: %s %s", action, name)
        return web.json_response({"app": name, "action": action, "ok": True})

    async def start(self) -> None:
        """Listen on the socket (skipped with a warning when it cannot be created)."""
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/reload", self._reload)
        app.router.add_post(r"/apps/{name}/{action:recycle|stop|start}", self._app_action)
        # Admin calls are short: a client that keeps a connection open must not hold up
        # a stop for aiohttp's default 60 s.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            if os.path.exists(self.path):
                os.unlink(self.path)
            site = web.UnixSite(runner, self.path)
            await site.start()
            os.chmod(self.path, 0o660)
        except OSError as exc:
            log.warning("admin socket %s not available: %s", self.path, exc.strerror or exc)
            await runner.cleanup()
            return
        self._runner = runner

    async def stop(self) -> None:
        """Close the socket."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
