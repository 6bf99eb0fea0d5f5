"""The main process: binds listeners, runs the module and the workers, reloads, stops.

Theory of operation
-------------------
``serve(config)`` is ``bastion serve``. It binds every listener first (a port that cannot
be bound is one clear line and exit status 2, before any app starts), then starts the
module's ``Supervisor``, the admin socket and the proxy workers:

* ``workers: 1`` without a top-level ``user``: one ``ProxyWorker`` in this event loop;
* otherwise N worker processes (``proxy.worker``) sharing the listening sockets, each
  connected by a socketpair; a worker that dies is replaced.

Either way a worker is reached through a ``WorkerHandle``: it is told every ``AppState``
and its messages go to ``Supervisor.handle``. Signal handlers only schedule work on the
loop. SIGTERM/SIGINT: stop accepting, let requests in flight finish, stop every app,
exit 0. SIGHUP (or ``POST /reload``): re-read the config; if it is invalid keep the old
one and log why; else keep the listening sockets that stay (new ones are bound, removed
ones closed once unused), update the module (changed apps recycled overlapped, unchanged
apps untouched), start a new generation of workers, then drain the old one, the way
nginx reloads. SIGUSR1 reopens every log file. systemd is told READY, RELOADING,
STOPPING and WATCHDOG through ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import pickle
import pwd
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

from module.messages import AppState, ToModule, from_wire
from module.supervisor import Supervisor

from . import channel
from .admin import AdminServer
from .config import Config
from .metrics import merge
from .sdnotify import Notifier, watchdog_interval
from .server import bind_socket
from .tls import TLSConfigError
from .worker import ProxyWorker, WorkerSetup, report_slow_stop, server_context

log = logging.getLogger("bastion")

WORKER_START_LIMIT = 30.0
WORKER_HEALTHY = 10.0  # a worker up this long died of something other than its start
CERT_POLL = 2.0
SLOW_STOP = 8.0  # a stop still running after this long logs what it waits on
STOP_MARGIN = 10.0  # beyond the drain grace and the apps' shutdown_time_limit


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


def worker_count(config: Config) -> int:
    """``workers`` resolved: ``auto`` is the number of usable cores."""
    if config.workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
    return max(1, int(config.workers))


def in_process(config: Config) -> bool:
    """True when the proxy runs in the main process's own event loop."""
    return worker_count(config) == 1 and not config.user




class WorkerHandle(abc.ABC):
    """The main process's side of one worker, local or a child process."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.metrics: dict[str, Any] = {}

    @abc.abstractmethod
    def tell(self, state: AppState) -> None:
        """Pass on a state snapshot."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start serving; return once listening."""

    @abc.abstractmethod
    async def stop(self, grace: float) -> None:
        """Drain and stop."""

    @abc.abstractmethod
    def reopen_logs(self) -> None:
        """Reopen the worker's log files."""

    @abc.abstractmethod
    def reload_certificates(self) -> None:
        """Re-read certificate and key files in place (connections stay open)."""

    def flush(self) -> None:  # noqa: B027 - optional hook: only a local worker has work
        """Send usage reports now (a local worker; a process reports on its own)."""

    def metrics_snapshot(self) -> dict[str, Any]:
        """The worker's latest metrics."""
        return self.metrics


class LocalWorker(WorkerHandle):
    """A ``ProxyWorker`` in the main process's event loop."""

    def __init__(self, worker_id: int, config: Config, sockets: dict[str, socket.socket],
                 to_module: Callable[[ToModule], None]) -> None:
        super().__init__(worker_id)
        self.config = config
        self.sockets = sockets
        self.worker = ProxyWorker(config, to_module, worker_id)

    def tell(self, state: AppState) -> None:
        self.worker.update(state)

    async def start(self) -> None:
        # Duplicates of the listening sockets: this generation may close them freely.
        dups = {address: sock.dup() for address, sock in self.sockets.items()}
        await self.worker.start(self.worker.bind(dups))

    def reload_certificates(self) -> None:
        self.worker.reload_certificates()

    async def stop(self, grace: float) -> None:
        await self.worker.stop(grace)

    def reopen_logs(self) -> None:
        self.worker.reopen_logs()

    def metrics_snapshot(self) -> dict[str, Any]:
        return self.worker.metrics_snapshot()

    def flush(self) -> None:
        self.worker.table.flush_reports()


class ProcessWorker(WorkerHandle):
    """A ``python -m proxy.worker`` child process connected by a socketpair."""

    def __init__(self, worker_id: int, config: Config, sockets: dict[str, socket.socket],
                 to_module: Callable[[ToModule], None],
                 on_exit: Callable[[ProcessWorker], None],
                 snapshot: Callable[[], list[AppState]]) -> None:
        super().__init__(worker_id)
        self.snapshot = snapshot
        self.config = config
        self.sockets = sockets
        self.to_module = to_module
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = time.monotonic()
        self.stopping = False
        self._writer: asyncio.StreamWriter | None = None
        self._ready = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    def tell(self, state: AppState) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.json_frame(channel.MESSAGE, state.to_wire()))

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        fds = {a: s.fileno() for a, s in self.sockets.items()}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.worker", "--channel", str(theirs.fileno()),
            pass_fds=[theirs.fileno(), *fds.values()],
            stdin=asyncio.subprocess.DEVNULL,
        )
        theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        setup = WorkerSetup(self.config, self.worker_id, tuple(fds.items()),
                            tuple(self.snapshot()))
        self._writer.write(channel.frame(channel.SETUP, pickle.dumps(setup)))
        self._reader_task = asyncio.create_task(self._read(reader))
        asyncio.create_task(self._watch())
        try:
            await asyncio.wait_for(self._ready.wait(), WORKER_START_LIMIT)
        except TimeoutError:
            raise RuntimeError(f"worker {self.worker_id} did not start") from None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        import json

        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, payload = await channel.read_frame(reader)
                if kind == channel.MESSAGE:
                    message = from_wire(json.loads(payload))
                    if not isinstance(message, AppState):
                        self.to_module(message)
                elif kind == channel.METRICS:
                    self.metrics = json.loads(payload)
                elif kind == channel.READY:
                    self._ready.set()

    async def _watch(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if not self.stopping:
            log.error("worker %d (pid %d) exited with %s; replacing it",
                      self.worker_id, self.proc.pid, code)
            self.on_exit(self)

    async def stop(self, grace: float) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.json_frame(channel.STOP, grace))
        try:
            await asyncio.wait_for(self.proc.wait(), grace + 5)
        except TimeoutError:
            log.error("worker %d (pid %d) did not stop within %gs: killed",
                      self.worker_id, self.proc.pid, grace + 5)
            self.proc.kill()
            await self.proc.wait()
        if self._writer is not None:
            self._writer.close()

    def reopen_logs(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.frame(channel.REOPEN))

    def reload_certificates(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.frame(channel.CERTIFICATES))

    def kill(self) -> None:
        """SIGKILL the worker (the main process is exiting in a hurry)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


class Bastion:
    """One running Bastion: listening sockets, module, workers and admin socket."""

    def __init__(self, config: Config, sockets: dict[str, socket.socket]) -> None:
        self.config = config
        self.sockets = sockets
        self.supervisor = Supervisor(config.apps)
        self.workers: list[WorkerHandle] = []
        self.admin = AdminServer(self)
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._next_id = 0
        self._worker_backoff = 0.0
        self._retired: dict[str, Any] = merge([])
        self._reloading = asyncio.Lock()
        self.stopping = False
        self.generation = 0

    # -- workers --------------------------------------------------------------------
    def _to_module(self, message: ToModule) -> None:
        with contextlib.suppress(Exception):
            self.supervisor.handle(message)

    def _broadcast(self, state: AppState) -> None:
        for worker in self.workers:
            worker.tell(state)

    def _new_worker(self, config: Config) -> WorkerHandle:
        self._next_id += 1
        if in_process(config):
            return LocalWorker(self._next_id, config, self.sockets, self._to_module)
        return ProcessWorker(self._next_id, config, self.sockets, self._to_module,
                             self._replace, self.supervisor.snapshot)

    def _replace(self, dead: ProcessWorker) -> None:
        if self.stopping or dead not in self.workers:
            return
        self.workers.remove(dead)
        self._retire(dead)
        # A worker that dies young (a broken log path, say) is replaced with a growing
        # delay, never in a tight loop.
        young = time.monotonic() - dead.started_at < WORKER_HEALTHY
        self._worker_backoff = min(max(0.5, self._worker_backoff * 2), 30.0) if young else 0.0
        delay = self._worker_backoff
        if delay:
            log.error("worker died %.1fs after starting: next one in %gs",
                      time.monotonic() - dead.started_at, delay)
        asyncio.create_task(self._start_later(delay))

    async def _start_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self.stopping:
            try:
                await self._start_workers(self.config, 1)
            except RuntimeError as exc:
                log.error("%s", exc)

    async def _start_workers(self, config: Config, count: int) -> list[WorkerHandle]:
        started = []
        for _ in range(count):
            worker = self._new_worker(config)
            self.workers.append(worker)  # told every state from now on
            for state in self.supervisor.snapshot():
                worker.tell(state)
            try:
                await worker.start()
            except Exception:
                self.workers.remove(worker)
                raise
            if isinstance(worker, ProcessWorker):
                # States published while it was starting reached it before READY,
                # but the snapshot taken now is the truth: send it again.
                for state in self.supervisor.snapshot():
                    worker.tell(state)
            started.append(worker)
        return started

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the module, the admin socket and the workers."""
        self.supervisor.subscribe(self._broadcast)
        await self.supervisor.start()
        await self.admin.start()
        await self._start_workers(self.config, worker_count(self.config))
        self.notifier.ready(self._describe())

    def _describe(self) -> str:
        return (f"{len(self.workers)} worker(s), {len(self.config.apps)} app(s), "
                f"generation {self.generation}")

    def request_stop(self) -> None:
        """Ask for a graceful stop (signal-safe: only sets a flag)."""
        self._stop.set()

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access logs and every app's log file."""
        for worker in self.workers:
            worker.reopen_logs()
        for app in self.supervisor.apps.values():
            app.output.reopen()
        log.info("log files reopened")

    def grace(self) -> float:
        """How long a stop waits for requests in flight."""
        longest = max((a.settings.request_timeout for a in self.config.apps), default=10.0)
        return min(longest, 30.0)

    async def wait_and_stop(self) -> None:
        """Wait for a stop request, then stop everything in order."""
        await self._stop.wait()
        self.stopping = True
        self.notifier.stopping()
        log.info("stopping: finishing requests in flight")
        longest_app_stop = max(
            (a.settings.shutdown_time_limit for a in self.config.apps), default=10.0)
        limit = self.grace() + longest_app_stop + STOP_MARGIN
        reporter = asyncio.create_task(report_slow_stop(SLOW_STOP))
        try:
            async with asyncio.timeout(limit):
                await self.admin.stop()
                await asyncio.gather(*(w.stop(self.grace()) for w in self.workers))
                await self.supervisor.stop()
        except TimeoutError:
            # A stop must end: whatever still runs is killed by ``kill_now``.
            log.error("graceful stop took longer than %gs: killing what is left", limit)
        reporter.cancel()
        for sock in self.sockets.values():
            sock.close()
        log.info("stopped")

    def kill_now(self) -> None:
        """Last resort: SIGKILL workers and apps."""
        for worker in self.workers:
            if isinstance(worker, ProcessWorker):
                worker.kill()
        self.supervisor.kill_now()

    # -- reload ---------------------------------------------------------------------
    def request_reload(self) -> None:
        """SIGHUP: reload in the background (signal-safe)."""
        asyncio.get_running_loop().create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception:
            log.exception("reload failed, keeping the old configuration")
            self.notifier.ready(self._describe())

    async def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config file and apply it; (applied, problems)."""
        from .config_load import ConfigError, load_config

        if self.config.source.startswith("<"):
            return False, ["the built-in configuration cannot be reloaded"]
        async with self._reloading:
            self.notifier.reloading()
            try:
                new = load_config(self.config.source)
                if new == self.config and not new.user:
                    # Only certificate files changed, and the workers can still read
                    # them (they did not drop privileges): swap contexts in place.
                    return self._reload_certificates()
                old_sockets = dict(self.sockets)
                self.sockets = self._rebind(new)
                self.supervisor.apply(new.apps)
                old_workers = list(self.workers)  # they get states until they are stopped
                new_workers = await self._start_workers(new, worker_count(new))
            except ConfigError as error:
                problems = [str(p) for p in error.problems]
                for problem in problems:
                    log.error("reload refused: %s", problem)
                self.notifier.ready(self._describe())
                return False, problems
            except (OSError, RuntimeError, ssl.SSLError, TLSConfigError) as exc:
                log.error("reload failed, keeping the old configuration: %s", exc)
                self.notifier.ready(self._describe())
                return False, [str(exc)]
            self.config = new
            self.generation += 1
            self.workers = new_workers
            grace = self.grace()
            await asyncio.gather(*(w.stop(grace) for w in old_workers))
            for worker in old_workers:
                self._retire(worker)
            for address, sock in old_sockets.items():
                if self.sockets.get(address) is not sock:
                    sock.close()
            log.info("reloaded %s: %s", new.source, self._describe())
            self.notifier.ready(self._describe())
            return True, []

    def _reload_certificates(self) -> tuple[bool, list[str]]:
        """The configuration is unchanged: re-read certificates in place, in every
        worker, without a new generation, so no connection is touched at all."""
        for listener in self.config.listeners:
            if listener.tls is not None:
                server_context(listener)  # a broken pair raises: nothing is changed
        for worker in self.workers:
            worker.reload_certificates()
        log.info("configuration unchanged: certificates re-read in place")
        self.notifier.ready(self._describe())
        return True, []

    def _rebind(self, new: Config) -> dict[str, socket.socket]:
        sockets: dict[str, socket.socket] = {}
        try:
            for listener in new.listeners:
                existing = self.sockets.get(listener.address)
                sockets[listener.address] = existing or bind_socket(listener)
                if listener.tls is not None:
                    server_context(listener)  # a broken certificate refuses the reload
        except BaseException:
            for address, sock in sockets.items():
                if self.sockets.get(address) is not sock:
                    sock.close()
            raise
        return sockets

    # -- observing ------------------------------------------------------------------
    def _retire(self, worker: WorkerHandle) -> None:
        """Keep a gone worker's counters, so totals never go backwards."""
        last = dict(worker.metrics_snapshot())
        last["open_connections"] = 0
        self._retired = merge([self._retired, last])

    def metrics(self) -> dict[str, Any]:
        """Every worker's metrics, past generations included, added up."""
        return merge([self._retired, *(w.metrics_snapshot() for w in self.workers)])

    def status(self) -> dict[str, Any]:
        """The module's status plus the host's own facts."""
        for worker in self.workers:
            worker.flush()
        data = self.supervisor.status()
        data["workers"] = [
            {"id": w.worker_id,
             "pid": w.proc.pid if isinstance(w, ProcessWorker) and w.proc else os.getpid()}
            for w in self.workers
        ]
        data["generation"] = self.generation
        data["config"] = self.config.source
        return data


def bind_all(config: Config) -> dict[str, socket.socket]:
    """Bind every listener and check its TLS settings (OSError / TLS errors propagate)."""
    bound: dict[str, socket.socket] = {}
    try:
        for listener in config.listeners:
            if listener.tls is not None:
                server_context(listener)  # fail before binding anything
            bound[listener.address] = bind_socket(listener)
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound


def certificate_files(config: Config) -> dict[str, float]:
    """Every certificate, key and client CA file of ``config`` with its mtime (0: missing)."""
    files: dict[str, float] = {}
    for listener in config.listeners:
        if listener.tls is None:
            continue
        paths = [p for pair in listener.tls.certificates for p in (pair.cert, pair.key)]
        if listener.tls.client_ca:
            paths.append(listener.tls.client_ca)
        for path in paths:
            try:
                files[path] = os.stat(path).st_mtime
            except OSError:
                files[path] = 0.0
    return files


async def watch_certificates(bastion: Bastion, every: float = CERT_POLL) -> None:
    """Reload when a certificate or key file changes (renewed by certbot, say).

    A renewal writes the certificate and the key one after the other: the reload waits
    until the files have been quiet for one interval, and a broken pair is refused by
    the reload itself, which keeps the old contexts.
    """
    seen = certificate_files(bastion.config)
    while True:
        await asyncio.sleep(every)
        now = certificate_files(bastion.config)
        if now == seen:
            continue
        await asyncio.sleep(every)
        settled = certificate_files(bastion.config)
        if settled != now:
            continue
        log.info("certificate files changed: reloading")
        try:
            applied, _ = await bastion.reload()
        except Exception:  # the watcher must outlive any one failed reload
            log.exception("reload after a certificate change failed")
            applied = False
        seen = certificate_files(bastion.config) if applied else settled


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _run(config: Config, ready: Callable[[Bastion], None] | None) -> None:
    sockets = bind_all(config)
    bastion = Bastion(config, sockets)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bastion.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, bastion.reopen_logs)
    loop.add_signal_handler(signal.SIGHUP, bastion.request_reload)
    watchdog: asyncio.Task[None] | None = None
    try:
        await bastion.start()
        for listener in config.listeners:
            scheme = "https" if listener.tls else "http"
            log.info("listening on %s://%s", scheme, listener.address)
        interval = watchdog_interval()
        if interval is not None:
            watchdog = asyncio.create_task(_watchdog(bastion.notifier, interval))
        certs = None
        if not config.source.startswith("<") and certificate_files(config):
            certs = asyncio.create_task(watch_certificates(bastion))
        if ready is not None:
            ready(bastion)
        await bastion.wait_and_stop()
        if certs is not None:
            certs.cancel()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        bastion.kill_now()


def privilege_problems(config: Config, uid: int) -> list[str]:
    """``user`` settings that need root when Bastion runs as ``uid``."""
    if uid == 0:
        return []
    me = pwd.getpwuid(uid).pw_name
    problems = []
    if config.user and config.user != me:
        problems.append(f"{config.source}: user: {config.user!r} needs Bastion to start "
                        f"as root (it runs as {me!r})")
    for app in config.apps:
        user = app.settings.user
        if user and user != me:
            problems.append(f"{config.source}: app {app.name!r} runs as user {user!r}, "
                            f"which needs Bastion to start as root (it runs as {me!r})")
    return problems


def serve(config: Config, ready: Callable[[Bastion], None] | None = None) -> int:
    """Run Bastion in the foreground until SIGTERM/SIGINT; return the exit status."""
    problems = privilege_problems(config, os.geteuid())
    if problems:
        for problem in problems:
            print(f"bastion: {problem}", file=sys.stderr)
        return 1
    if os.environ.get("AIOHTTP_NO_EXTENSIONS") or not compiled_parser_in_use():
        log.warning(
            "aiohttp's compiled HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set or no "
            "C extension): parsing is slower; Bastion's own checks still apply"
        )
    uvloop = install_uvloop()
    try:
        asyncio.run(_run(config, ready))
    except OSError as exc:
        print(f"bastion: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except TLSConfigError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 2
    if uvloop:
        log.debug("ran on uvloop")
    return 0


__all__ = ["Bastion", "serve"]
