"""The admin socket: HTTP over a Unix socket (mode 0660) for ``bastion`` commands and tools.

``GET /status`` (JSON: version, start time, listeners, pools, apps, processes with pid,
port, state, uptime, requests, in flight, RSS, CPU; restarts; last exit; why an app is
offline or failed and until when), ``GET /metrics`` (Prometheus text), ``POST /reload``,
``POST /apps/NAME/recycle`` (overlapped), ``POST /apps/NAME/stop``,
``POST /apps/NAME/start``, ``POST /apps/NAME/restart`` (stop, then start; an in-process
app: its worker processes replaced one at a time, importing it afresh) and
``POST /drain`` and ``POST /undrain`` (the node's health answers 503 / 200 for the load
balancers, ``docs/scaling.md``), ``GET /apps/NAME/logs?lines=N[&follow=1]`` (the app's in-memory output tail as plain
text; with ``follow`` the response goes on with live output until the client leaves).
Every handler only calls the module's ``Supervisor``; nothing here touches a process.
When the socket's directory cannot be created (the demo as a normal user with the
default ``/run/bastion``), Bastion logs one warning and runs without it.

With ``metrics_listen``, the same ``GET /metrics`` is also served over plain HTTP on
that TCP address (the main process, aiohttp: not the data path), for Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sized
from typing import Any, Protocol

from aiohttp import web

from bastion.module.errors import UnknownApp
from bastion.module.supervisor import Supervisor

from ..config.model import Config
from ..edge.metrics import render
from ..version import version

log = logging.getLogger("bastion.admin")


class Served(Protocol):
    """What the admin API controls: the main process (``main.Bastion``), seen through
    the few things it asks of it."""

    config: Config
    supervisor: Supervisor

    @property
    def workers(self) -> Sized: ...

    @property
    def draining(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...
    def metrics(self) -> dict[str, Any]: ...
    def set_draining(self, draining: bool) -> None: ...
    async def reload(self) -> tuple[bool, list[str]]: ...


class AdminServer:
    """Serves the admin API on ``config.admin_socket``."""

    def __init__(self, bastion: Served) -> None:
        self.bastion = bastion
        self.path = bastion.config.admin_socket
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.started = time.time()
        self._follows: set[asyncio.Queue[bytes | None]] = set()

    def status(self) -> dict[str, Any]:
        """``GET /status``: the running Bastion's own status plus who and where it is."""
        data = self.bastion.status()
        config = self.bastion.config
        data["version"] = version()
        data["started"] = self.started
        data["uptime"] = round(time.time() - self.started, 3)
        data["listeners"] = [
            {"address": lis.address, "tls": lis.tls is not None,
             "http2": lis.tls is not None and lis.http2, "redirect_https": lis.redirect_https}
            for lis in config.listeners
        ]
        data["metrics_listen"] = config.metrics_listen
        return data

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _metrics(self, request: web.Request) -> web.Response:
        text = render(self.bastion.metrics(), self.bastion.status(), len(self.bastion.workers),
                      started=self.started)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            output = self.bastion.supervisor.app(name).output
        except UnknownApp:
            return web.json_response({"error": f"no app named {name!r}"}, status=404)
        try:
            lines = int(request.query.get("lines", "50"))
        except ValueError:
            return web.json_response({"error": "lines must be a number"}, status=400)
        follow = request.query.get("follow", "") not in ("", "0", "false")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        queue = output.follow() if follow else None  # before the tail: nothing falls between
        if queue is not None:
            self._follows.add(queue)
        try:
            await response.prepare(request)
            await response.write(output.raw_tail(lines))
            while queue is not None:
                chunk = await queue.get()
                if chunk is None:  # the app's output closed, or this client fell behind
                    break
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            pass  # the client left
        finally:
            if queue is not None:
                output.unfollow(queue)
                self._follows.discard(queue)
        return response

    async def _reload(self, request: web.Request) -> web.Response:
        applied, problems = await self.bastion.reload()
        status = 200 if applied else 400
        return web.json_response({"reloaded": applied, "problems": problems}, status=status)

    async def _drain(self, request: web.Request) -> web.Response:
        self.bastion.set_draining(request.path == "/drain")
        log.info("admin: %s", request.path.lstrip("/"))
        return web.json_response({"draining": self.bastion.draining})

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
            elif action == "restart":
                if not await supervisor.restart_app(name):
                    return web.json_response(
                        {"app": name, "error": "no worker processes to replace"},
                        status=409)
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
        app.router.add_post("/drain", self._drain)
        app.router.add_post("/undrain", self._drain)
        app.router.add_post(r"/apps/{name}/{action:recycle|stop|start|restart}",
                            self._app_action)
        app.router.add_get("/apps/{name}/logs", self._logs)
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
        else:
            self._runner = runner
        await self._start_metrics()

    async def _start_metrics(self) -> None:
        """Serve ``GET /metrics`` on ``metrics_listen`` (a warning when it cannot bind)."""
        address = self.bastion.config.metrics_listen
        if address is None:
            return
        host, _, port = address.rpartition(":")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        except OSError as exc:
            log.warning("metrics_listen %s not available: %s", address, exc.strerror or exc)
            await runner.cleanup()
            return
        log.info("metrics on http://%s/metrics", address)
        self._metrics_runner = runner

    async def stop(self) -> None:
        """Close the socket and the metrics listener."""
        for queue in list(self._follows):  # ``logs -f`` clients end now, not after 2 s
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        if self._metrics_runner is not None:
            with contextlib.suppress(Exception):
                await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
