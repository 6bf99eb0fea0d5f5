"""The admin socket: HTTP over a Unix socket (mode 0660) for ``bastion status`` and tools.

``GET /status`` answers the module's status (pools, apps, processes with pid, port,
state, uptime, restarts) merged with what this worker counted (requests served and in
flight per process) and psutil's RSS and CPU for each process tree. When the socket's
directory cannot be created (the demo as a normal user with the default
``/run/bastion``), Bastion logs one warning and runs without it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import psutil
from aiohttp import web

if TYPE_CHECKING:
    from .main import Bastion

log = logging.getLogger("bastion.admin")


def process_tree_usage(pid: int) -> tuple[int, float]:
    """RSS in bytes and CPU percent of ``pid`` and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0.0
    rss, cpu = 0, 0.0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            cpu += proc.cpu_percent(interval=None)
        except psutil.Error:
            continue
    return rss, cpu


class AdminServer:
    """Serves the admin API on ``config.admin_socket``."""

    def __init__(self, bastion: Bastion) -> None:
        self.bastion = bastion
        self.path = bastion.config.admin_socket
        self._runner: web.AppRunner | None = None

    def status(self) -> dict[str, Any]:
        """The module's status with this worker's request counters and resource usage."""
        data: dict[str, Any] = self.bastion.supervisor.status()
        data["pid"] = os.getpid()
        for name, app in data["apps"].items():
            counters = self.bastion.table.counters(name)
            for proc in app["processes"]:
                in_flight, served = counters.get(proc["pid"], (0, 0))
                proc["requests"] = served
                proc["in_flight"] = in_flight
                proc["rss"], proc["cpu_percent"] = process_tree_usage(proc["pid"])
        return data

    async def _get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def start(self) -> None:
        """Listen on the socket (skipped with a warning when it cannot be created)."""
        app = web.Application()
        app.router.add_get("/status", self._get_status)
        runner = web.AppRunner(app, access_log=None)
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
