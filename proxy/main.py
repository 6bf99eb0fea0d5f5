"""The main process: binds listeners, loads the module, runs until told to stop.

Theory of operation
-------------------
``serve(config)`` is ``bastion serve``. It binds every listener first (a port that cannot
be bound is one clear line and exit status 2, before any app starts), builds the TLS
contexts, then creates the module's ``Supervisor`` and one proxy worker's parts (router,
endpoint table, upstream pool, handlers) in the same event loop; the two talk only
through ``module.messages`` (``workers: 1``). Signal handlers only set flags or schedule
work on the loop, gunicorn-style. SIGTERM/SIGINT: stop accepting, let requests in flight
finish, stop every app (SIGTERM to its group, SIGKILL after shutdown_time_limit), exit 0.
SIGUSR1 reopens the access log and the apps' logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable

from module.messages import EndpointFailed, NeedApp, UsageReport
from module.supervisor import Supervisor

from .accesslog import AccessLog
from .admin import AdminServer
from .config import Config
from .endpoints import EndpointTable, QueueLimits
from .forwarding import UpstreamPool
from .routing import Router
from .server import ListenerSet, RequestHandler, bind_socket

log = logging.getLogger("bastion")


def compiled_parser_in_use() -> bool:
    """True when aiohttp parses HTTP with its compiled (llhttp) parser."""
    from aiohttp import http_parser

    compiled = getattr(http_parser, "HttpRequestParserC", None)
    return compiled is not None and http_parser.HttpRequestParser is compiled


def install_uvloop() -> bool:
    """Use uvloop's event loop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _tls_context(listener_tls: object, http2: bool) -> ssl.SSLContext:
    from .tls import build_server_context

    # HTTP/2 at the edge is not served yet: advertise only what is spoken.
    return build_server_context(listener_tls, ["http/1.1"])  # type: ignore[arg-type]


class Bastion:
    """One running Bastion: module, proxy worker parts and admin socket."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.supervisor = Supervisor(config.apps)
        limits = {
            spec.name: QueueLimits(spec.settings.max_concurrency, spec.settings.max_queue)
            for spec in config.apps
        }
        self.table = EndpointTable(self._to_module, limits)
        self.pool = UpstreamPool()
        self.access_log = AccessLog(config.access_log, config.access_log_format)
        self.listeners = ListenerSet()
        self.admin = AdminServer(self)
        self._stop = asyncio.Event()
        self.stopping = False

    def _to_module(self, message: NeedApp | EndpointFailed | UsageReport) -> None:
        self.supervisor.handle(message)

    async def start(self, bound: list[tuple[object, object, ssl.SSLContext | None]]) -> None:
        """Start the module, then serve the already-bound sockets."""
        for state in self.supervisor.subscribe(self.table.update):
            self.table.update(state)
        await self.supervisor.start()
        router = Router(self.config.routes)
        handlers = {
            listener.address: RequestHandler(
                listener, self.config, router, self.table, self.pool, self.access_log
            )
            for listener in self.config.listeners
        }
        await self.admin.start()
        await self.listeners.start(bound, handlers, self.config)  # type: ignore[arg-type]

    def request_stop(self) -> None:
        """Ask for a graceful stop (signal-safe: only sets a flag)."""
        self._stop.set()

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log and every app's log file."""
        self.access_log.reopen()
        for app in self.supervisor.apps.values():
            app.output.reopen()
        log.info("log files reopened")

    async def wait_and_stop(self) -> None:
        """Wait for a stop request, then stop everything in order."""
        await self._stop.wait()
        self.stopping = True
        log.info("stopping: finishing requests in flight")
        await self.admin.stop()
        longest = max((a.settings.request_timeout for a in self.config.apps), default=10.0)
        await self.listeners.stop(grace=min(longest, 30.0))
        await self.pool.close()
        await self.supervisor.stop()
        self.access_log.close()
        log.info("stopped")


def bind_all(config: Config) -> list[tuple[object, object, ssl.SSLContext | None]]:
    """Bind every listener and build its TLS context (OSError / TLS errors propagate)."""
    bound: list[tuple[object, object, ssl.SSLContext | None]] = []
    try:
        for listener in config.listeners:
            context = _tls_context(listener.tls, listener.http2) if listener.tls else None
            bound.append((listener, bind_socket(listener), context))
    except BaseException:
        for _, sock, _ in bound:
            sock.close()  # type: ignore[attr-defined]
        raise
    return bound


async def _run(config: Config, ready: Callable[[Bastion], None] | None) -> None:
    bound = bind_all(config)
    bastion = Bastion(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bastion.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, bastion.reopen_logs)
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: log.warning("SIGHUP: live reload is not available yet; restart to apply changes"),
    )
    try:
        await bastion.start(bound)
        for listener in config.listeners:
            scheme = "https" if listener.tls else "http"
            log.info("listening on %s://%s", scheme, listener.address)
        if ready is not None:
            ready(bastion)
        await bastion.wait_and_stop()
    finally:
        bastion.supervisor.kill_now()


def serve(config: Config, ready: Callable[[Bastion], None] | None = None) -> int:
    """Run Bastion in the foreground until SIGTERM/SIGINT; return the exit status."""
    if os.environ.get("AIOHTTP_NO_EXTENSIONS") or not compiled_parser_in_use():
        log.warning(
            "aiohttp's compiled HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set or no "
            "C extension): parsing is slower; Bastion's own checks still apply"
        )
    if install_uvloop():
        log.info("using uvloop")
    try:
        asyncio.run(_run(config, ready))
    except OSError as exc:
        print(f"bastion: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
