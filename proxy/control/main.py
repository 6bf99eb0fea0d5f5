"""The main process: binds listeners, runs the module and the workers, reloads, stops.

Theory of operation
-------------------
``serve(config)`` is ``bastion serve``. It binds every listener first (a port that cannot
be bound is one clear line and exit status 2, before any app starts), then starts the
module's ``Supervisor``, the admin socket and the proxy workers:

* ``workers: 1`` without a top-level ``user``: one ``ProxyWorker`` in this event loop;
* otherwise N worker processes (``proxy.worker``) sharing the listening sockets, each
  connected by a socketpair; a worker that dies is replaced, and one whose event loop
  is stuck (no heartbeat for ``worker_timeout``, ``proxy.liveness``) is killed first.

A generation of workers is one ``Config`` and the bytes of its certificate and key
files, read once (``self.pems``); every worker of the generation, replacements included,
starts from exactly those, so a broken pair written to disk later cannot stop a
replacement from starting. Only a reload (or the certificate watcher's in-place reload)
reads the files again, checks them, and makes the new bytes the generation's.

A worker that dies is handled in one place: before READY its ``start`` fails (at once,
not after the start limit) and the caller decides (the first start goes on with the
others and replaces it later; a reload refuses the new generation); after READY its
watcher calls ``_replace``. Replacements come with a growing delay when workers die
young, and a replacement that fails to start is itself replaced the same way.

Either way a worker is reached through a ``WorkerHandle``: it is told every ``AppState``
and its messages go to ``Supervisor.handle``, except the request-slot messages: those go
to the ``SlotGranter`` (``proxy/slots.py``), which keeps ``max_concurrency`` and
``max_queue`` for the whole Bastion and answers the one worker that asked. Signal
handlers only schedule work on the loop. SIGTERM/SIGINT: close the main process's copies
of the listening sockets at once (with the workers closing theirs, new connections are
refused instead of waiting in a backlog nobody accepts from, as nginx does), let
requests in flight finish, stop every app, exit 0. SIGHUP (or ``POST /reload``): re-read
the config; if it is invalid keep the old
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

from bastion.module.leftovers import forget_own_child, note_own_child
from bastion.module.messages import (
    AppState,
    EndpointFailed,
    FromProxy,
    HostedReport,
    SlotFreed,
    SlotGranted,
    SlotRefused,
    SlotWanted,
    ToProxy,
    from_wire,
)
from bastion.module.periodic import every
from bastion.module.supervisor import Supervisor

from ..config.model import Config
from ..edge.endpoints import queue_limits
from ..edge.listeners import bind_socket
from ..edge.metrics import merge, retired
from ..edge.native import report_h2_engine, warn_if_interpreted
from ..edge.tls import PemFiles, TLSConfigError, tls_files
from . import channel
from .admin import AdminServer
from .liveness import heartbeat_interval, overdue
from .loop import install_uvloop
from .sdnotify import Notifier, watchdog_interval
from .slots import Answer, SlotGranter
from .worker import (
    ProxyWorker,
    WorkerSetup,
    check_certificates,
    pem_files,
    report_slow_stop,
    server_context,
)

log = logging.getLogger("bastion")

MIN_WORKER_START = 5.0  # the least a worker is given to start (see worker_start_limit)
LOAD_MARGIN = 5.0  # beyond an in-process app's startup_time_limit, for its report
WORKER_HEALTHY = 10.0  # a worker up this long died of something other than its start
CERT_POLL = 2.0
SLOW_STOP = 8.0  # a stop still running after this long logs what it waits on
STOP_MARGIN = 10.0  # beyond the drain grace and the apps' shutdown_time_limit


def worker_count(config: Config) -> int:
    """``workers`` resolved: ``auto`` is the number of usable cores."""
    if config.workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
    return max(1, int(config.workers))


def worker_start_limit(config: Config) -> float:
    """How long a worker process may take to say READY: ``worker_timeout`` (a worker
    silent that long is stuck), at least ``MIN_WORKER_START``. Its in-process apps load
    after READY, each bounded by its own ``startup_time_limit``, so a slow app never
    counts against its worker's start."""
    return max(config.worker_timeout, MIN_WORKER_START)


def load_limit(config: Config) -> float:
    """How long a new worker's in-process apps may take to report their loads."""
    return max((spec.settings.startup_time_limit for spec in config.apps
                if spec.in_process), default=0.0) + LOAD_MARGIN


def in_process(config: Config) -> bool:
    """True when the proxy runs in the main process's own event loop. Never with an
    in-process app: it must run in worker processes, so that an app that crashes
    costs one worker's requests, never the main process (docs/hosting-models.md)."""
    return worker_count(config) == 1 and not config.user \
        and not any(spec.in_process for spec in config.apps)


ToModule = FromProxy  # what a worker sends: for the module, or the slot granter


class WorkerStartError(RuntimeError):
    """A worker did not become ready (it exited, or did not say READY in time)."""


class WorkerHandle(abc.ABC):
    """The main process's side of one worker, local or a child process."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.metrics: dict[str, Any] = {}
        self.draining = False  # what the worker was last told (``bastion drain``)

    @abc.abstractmethod
    def tell(self, state: ToProxy) -> None:
        """Pass on a state snapshot or a slot's answer."""

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
    def drain(self, draining: bool) -> None:
        """The node drains (health 503, clients told to move) or serves again; a worker
        not started yet starts so."""

    @abc.abstractmethod
    def reload_certificates(self, pems: PemFiles) -> None:
        """New certificate bytes in place (connections stay open)."""

    def flush(self) -> None:  # noqa: B027 - optional hook: only a local worker has work
        """Send usage reports now (a local worker; a process reports on its own)."""

    def metrics_snapshot(self) -> dict[str, Any]:
        """The worker's latest metrics."""
        return self.metrics


class LocalWorker(WorkerHandle):
    """A ``ProxyWorker`` in the main process's event loop."""

    def __init__(self, worker_id: int, config: Config, sockets: dict[str, socket.socket],
                 to_module: Callable[[ToModule], None], pems: PemFiles) -> None:
        super().__init__(worker_id)
        self.config = config
        self.sockets = sockets
        self.worker = ProxyWorker(config, to_module, worker_id, pems)

    def tell(self, state: ToProxy) -> None:
        self.worker.deliver(state)

    async def start(self) -> None:
        # Duplicates of the listening sockets: this generation may close them freely.
        dups = {address: sock.dup() for address, sock in self.sockets.items()}
        await self.worker.start(self.worker.bind(dups))

    def reload_certificates(self, pems: PemFiles) -> None:
        self.worker.reload_certificates(pems)

    async def stop(self, grace: float) -> None:
        await self.worker.stop(grace)

    def reopen_logs(self) -> None:
        self.worker.reopen_logs()

    def drain(self, draining: bool) -> None:
        self.draining = draining
        self.worker.set_draining(draining)

    def metrics_snapshot(self) -> dict[str, Any]:
        return self.worker.metrics_snapshot()

    def flush(self) -> None:
        self.worker.table.flush_reports()


class ProcessWorker(WorkerHandle):
    """A ``python -m bastion.proxy.control.worker`` child process connected by a socketpair."""

    def __init__(self, worker_id: int, config: Config, sockets: dict[str, socket.socket],
                 to_module: Callable[[ToModule], None],
                 on_exit: Callable[[ProcessWorker], None],
                 snapshot: Callable[[], list[AppState]], pems: PemFiles,
                 load_first: bool = False) -> None:
        super().__init__(worker_id)
        self.load_first = load_first  # listens only once its in-process apps loaded
        self.snapshot = snapshot
        self.config = config
        self.sockets = sockets
        self.to_module = to_module
        self.on_exit = on_exit
        self.pems = dict(pems)
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = time.monotonic()
        self.last_seen = time.monotonic()  # any frame from the worker: its loop runs
        self.stopping = False
        self.ready = False
        # Told when the process is gone, ready or not (in-process apps count crashes).
        self.on_gone: Callable[[int, int | None], None] | None = None
        # The in-process apps it hosts, and the latest load report of each (they load
        # after READY; a roll waits for them before the old worker goes).
        self.hosted = frozenset(spec.name for spec in config.apps if spec.in_process)
        self.loads: dict[str, HostedReport] = {}
        self._loads_reported = asyncio.Event()
        if not self.hosted:
            self._loads_reported.set()
        self._exit_wait: asyncio.Future[int] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ready = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    def tell(self, state: ToProxy) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.json_frame(channel.MESSAGE, state.to_wire()))

    async def start(self) -> None:
        """Start the process; return once it says READY. Raise ``WorkerStartError`` as
        soon as it exits before that (or after ``worker_start_limit``, killing it)."""
        ours, theirs = socket.socketpair()
        fds = {a: s.fileno() for a, s in self.sockets.items()}
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bastion.proxy.control.worker", "--channel", str(theirs.fileno()),
                pass_fds=[theirs.fileno(), *fds.values()],
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        pid = self.proc.pid
        note_own_child(pid)  # Bastion's own child, not an app's leftover (module.leftovers)
        exited = self._exit_wait = asyncio.ensure_future(self.proc.wait())
        exited.add_done_callback(lambda _: forget_own_child(pid))
        exited.add_done_callback(lambda _: self._gone(pid))
        self.started_at = self.last_seen = time.monotonic()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        setup = WorkerSetup(self.config, self.worker_id, tuple(fds.items()),
                            tuple(self.snapshot()), tuple(self.pems.items()), self.draining,
                            self.load_first and bool(self.hosted))
        self._writer.write(channel.frame(channel.SETUP, pickle.dumps(setup)))
        self._reader_task = asyncio.create_task(self._read(reader))
        ready = asyncio.ensure_future(self._ready.wait())
        limit = worker_start_limit(self.config)
        try:
            await asyncio.wait({exited, ready}, timeout=limit,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
                raise WorkerStartError(
                    f"worker {self.worker_id} (pid {self.proc.pid}) did not start within "
                    f"{limit:g}s: killed")
            raise WorkerStartError(
                f"worker {self.worker_id} (pid {self.proc.pid}) exited with "
                f"{self.proc.returncode} before it was ready")
        self.ready = True
        self.last_seen = time.monotonic()
        exited.add_done_callback(self._exited)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        import json

        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, payload = await channel.read_frame(reader)
                self.last_seen = time.monotonic()
                if kind == channel.MESSAGE:
                    message = from_wire(json.loads(payload))
                    if isinstance(message, HostedReport):
                        self._load_reported(message)
                    if not isinstance(message, AppState | SlotGranted | SlotRefused):
                        self.to_module(message)
                elif kind == channel.METRICS:
                    self.metrics = json.loads(payload)
                elif kind == channel.READY:
                    self._ready.set()

    def _load_reported(self, report: HostedReport) -> None:
        if report.status == "loading":
            return  # not an outcome
        self.loads[report.app] = report
        if self.hosted <= self.loads.keys():
            self._loads_reported.set()

    async def loads_reported(self, limit: float) -> bool:
        """Wait until every in-process app of the worker reported its first load
        (loaded or failed); False when the worker exited or ``limit`` passed first."""
        if self._loads_reported.is_set():
            return True
        reported = asyncio.ensure_future(self._loads_reported.wait())
        waits: set[asyncio.Future[Any]] = {reported}
        if self._exit_wait is not None:
            waits.add(self._exit_wait)
        try:
            await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reported.cancel()
        return self._loads_reported.is_set()

    def listen(self) -> None:
        """A ``load_first`` worker may take connections now."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.frame(channel.LISTEN))

    def _gone(self, pid: int) -> None:
        if self.on_gone is not None and self.proc is not None:
            self.on_gone(pid, None if self.stopping else self.proc.returncode)

    def _exited(self, _: asyncio.Future[int]) -> None:
        """A worker that was ready exited: replace it unless it was told to stop."""
        assert self.proc is not None
        if not self.stopping:
            log.error("worker %d (pid %d) exited with %s; replacing it",
                      self.worker_id, self.proc.pid, self.proc.returncode)
            self.on_exit(self)

    def silent_for(self, now: float) -> float:
        """Seconds since the last frame from the worker."""
        return now - self.last_seen

    async def stop(self, grace: float) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.json_frame(channel.STOP, grace))
        # Its requests drain, then its in-process apps' lifespan shutdowns run.
        limit = grace + max((spec.settings.shutdown_time_limit for spec in self.config.apps
                             if spec.in_process), default=0.0) + 5
        try:
            await asyncio.wait_for(self.proc.wait(), limit)
        except TimeoutError:
            log.error("worker %d (pid %d) did not stop within %gs: killed",
                      self.worker_id, self.proc.pid, limit)
            self.proc.kill()
            await self.proc.wait()
        if self._writer is not None:
            self._writer.close()

    def reopen_logs(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.frame(channel.REOPEN))

    def drain(self, draining: bool) -> None:
        self.draining = draining
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.json_frame(channel.DRAIN, draining))

    def reload_certificates(self, pems: PemFiles) -> None:
        self.pems = dict(pems)
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(channel.frame(channel.CERTIFICATES, pickle.dumps(self.pems)))

    def kill(self) -> None:
        """SIGKILL the worker (the main process is exiting in a hurry)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


class Bastion:
    """One running Bastion: listening sockets, module, workers and admin socket."""

    def __init__(self, config: Config, sockets: dict[str, socket.socket],
                 pems: PemFiles | None = None) -> None:
        self.config = config
        self.sockets = sockets
        # The generation's certificate bytes: every worker of it starts from these.
        self.pems: dict[str, bytes] = dict(pems) if pems is not None else pem_files(config)
        self.supervisor = Supervisor(config.apps)
        self.supervisor.roll_workers = self.roll_workers  # recycling in-process apps
        self._rolling: asyncio.Task[None] | None = None
        # max_concurrency / max_queue for the whole Bastion (proxy/slots.py)
        self.slots = SlotGranter(queue_limits(config.apps))
        self._handles: dict[int, WorkerHandle] = {}  # worker id -> handle, until retired
        self.workers: list[WorkerHandle] = []
        self.admin = AdminServer(self)
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._next_id = 0
        self._worker_backoff = 0.0
        self._retired: dict[str, Any] = merge([])
        self._reloading = asyncio.Lock()
        self._liveness: asyncio.Task[None] | None = None
        self.stopping = False
        self.draining = False  # ``bastion drain`` / the drain_delay at SIGTERM
        self.generation = 0

    # -- workers --------------------------------------------------------------------
    def _to_module(self, message: ToModule) -> None:
        if isinstance(message, SlotWanted | SlotFreed):
            try:
                self._answer(self.slots.handle(message))
            except Exception:
                log.exception("slot granter failed on %s", message)
            return
        if isinstance(message, EndpointFailed):
            self.slots.endpoint_failed(message.app, message.pid)
        with contextlib.suppress(Exception):
            self.supervisor.handle(message)

    def _answer(self, answers: list[Answer]) -> None:
        """Send the slot granter's answers, each to its worker; a slot granted to a
        worker that is gone already comes back at once."""
        for worker_id, message in answers:
            handle = self._handles.get(worker_id)
            if handle is None:
                self._answer(self.slots.worker_gone(worker_id))
            else:
                handle.tell(message)

    def _broadcast(self, state: AppState) -> None:
        for worker in self.workers:
            worker.tell(state)
        self._answer(self.slots.update(state))  # after the workers have the state

    def _new_worker(self, config: Config, pems: PemFiles,
                    load_first: bool = False) -> WorkerHandle:
        self._next_id += 1
        worker: WorkerHandle
        if in_process(config):
            worker = LocalWorker(self._next_id, config, self.sockets, self._to_module, pems)
        else:
            worker = ProcessWorker(self._next_id, config, self.sockets, self._to_module,
                                   self._replace, self.supervisor.snapshot, pems, load_first)
            worker.on_gone = self.supervisor.worker_gone
        self._handles[worker.worker_id] = worker
        worker.drain(self.draining)  # before it serves: it starts in the node's state
        return worker

    def _forget(self, worker: WorkerHandle) -> None:
        """Take ``worker`` out of the list (whoever saw it go first)."""
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)

    def _replace(self, dead: ProcessWorker) -> None:
        """A ready worker exited: start another one of the running generation."""
        if self.stopping or dead not in self.workers:
            return  # stopping, or a retired generation's worker
        self._forget(dead)
        self._retire(dead)
        self._replace_later(time.monotonic() - dead.started_at)

    def _replace_later(self, lived: float) -> None:
        """Start a replacement, after a growing delay when workers die young (a broken
        log path, say): never in a tight loop."""
        young = lived < WORKER_HEALTHY
        self._worker_backoff = min(max(0.5, self._worker_backoff * 2), 30.0) if young else 0.0
        delay = self._worker_backoff
        if delay:
            log.error("worker died %.1fs after starting: next one in %gs", lived, delay)
        asyncio.create_task(self._start_later(delay))

    async def _start_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.stopping:
            return
        started = time.monotonic()
        try:
            await self._start_one(self.config, self.pems)
        except Exception as exc:  # noqa: BLE001 - a failed replacement is replaced again
            log.error("replacement worker failed: %s", exc)
            self._replace_later(time.monotonic() - started)

    async def _start_one(self, config: Config, pems: PemFiles,
                         load_first: bool = False) -> WorkerHandle:
        """Start one worker of the generation (``config``, ``pems``) and add it to the
        list; ``WorkerStartError`` (and the worker gone from the list) if it fails.
        ``load_first``: it replaces a worker that serves meanwhile, and takes connections
        only once its in-process apps have loaded (or failed to)."""
        worker = self._new_worker(config, pems, load_first)
        self.workers.append(worker)  # told every state from now on
        for state in self.supervisor.snapshot():
            worker.tell(state)
        try:
            await worker.start()
        except BaseException:
            self._forget(worker)
            raise
        if self.stopping or worker not in self.workers:
            # Bastion began stopping (or a reload retired the list) while it started.
            self._forget(worker)
            await worker.stop(0)
            raise WorkerStartError(f"worker {worker.worker_id} no longer needed")
        if isinstance(worker, ProcessWorker):
            # States published while it was starting reached it before READY,
            # but the snapshot taken now is the truth: send it again.
            for state in self.supervisor.snapshot():
                worker.tell(state)
        return worker

    async def _start_workers(self, config: Config, pems: PemFiles, count: int, *,
                             all_or_nothing: bool) -> list[WorkerHandle]:
        """Start ``count`` workers one after the other. ``all_or_nothing`` (a reload):
        the first failure stops those already started and raises. Otherwise (the first
        start) a worker that fails is replaced later, like one that dies."""
        started: list[WorkerHandle] = []
        for _ in range(count):
            began = time.monotonic()
            try:
                # A reload's generation takes over from one that serves meanwhile.
                started.append(await self._start_one(config, pems,
                                                     load_first=all_or_nothing))
            except WorkerStartError as exc:
                if all_or_nothing:
                    for worker in started:
                        self._forget(worker)
                    await asyncio.gather(*(w.stop(0) for w in started))
                    raise
                log.error("%s", exc)
                self._replace_later(time.monotonic() - began)
        return started

    def _check_liveness(self) -> None:
        """Kill (SIGKILL) every ready worker process silent for over its generation's
        ``worker_timeout``; its exit is then handled like any other (replaced)."""
        now = time.monotonic()
        for worker in list(self.workers):
            if not isinstance(worker, ProcessWorker) or not worker.ready or worker.stopping:
                continue
            timeout = worker.config.worker_timeout
            if overdue(worker.last_seen, now, timeout) and worker.proc is not None \
                    and worker.proc.returncode is None:
                log.error("worker %d (pid %d) sent no heartbeat for %.1fs (worker_timeout "
                          "%gs): its event loop is stuck; killing it", worker.worker_id,
                          worker.proc.pid, worker.silent_for(now), timeout)
                worker.kill()

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the module, the admin socket and the workers."""
        self.supervisor.subscribe(self._broadcast)
        await self.supervisor.start()
        await self.admin.start()
        started = await self._start_workers(self.config, self.pems, worker_count(self.config),
                                            all_or_nothing=False)
        if not started:
            raise WorkerStartError("no proxy worker could start (see the errors above)")
        self._watch_liveness()
        self.notifier.ready(self._describe())

    def _watch_liveness(self) -> None:
        """(Re)start the liveness check, as often as the generation's heartbeats."""
        if self._liveness is not None:
            self._liveness.cancel()
        if self.stopping:
            return
        interval = heartbeat_interval(self.config.worker_timeout)
        self._liveness = asyncio.create_task(
            every("worker liveness check", interval, self._check_liveness, log))

    def _describe(self) -> str:
        return (f"{len(self.workers)} worker(s), {len(self.config.apps)} app(s), "
                f"generation {self.generation}")

    def set_draining(self, draining: bool) -> None:
        """``bastion drain`` / ``undrain``: every worker (and every later one: a
        replacement, a reload's new generation) answers health with 503 and tells
        clients to move, while serving every request it gets."""
        if draining != self.draining:
            log.info("%s", "draining: health answers 503, clients are told to move"
                     if draining else "serving again: health answers 200")
        self.draining = draining
        for worker in self.workers:
            worker.drain(draining)

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
        self.notifier.stopping()
        delay = self.config.health.drain_delay
        if delay > 0:
            # Like Kubernetes' pre-stop delay: the balancer's checks see 503 and stop
            # sending before the listeners close; meanwhile everything is served.
            log.info("stopping: draining for %gs first (health answers 503)", delay)
            self.set_draining(True)
            await asyncio.sleep(delay)
        self.stopping = True
        if self._liveness is not None:
            self._liveness.cancel()
        # New connections are refused from now on rather than completed by the kernel
        # into a backlog nobody accepts from: our copies of the listening sockets go
        # now, each worker closes its own as its stop begins.
        for sock in self.sockets.values():
            sock.close()
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

    # -- recycling in-process apps -----------------------------------------------------
    def roll_workers(self, reason: str, pids: frozenset[int] | None = None) -> bool:
        """Replace the worker processes (those with ``pids``, or all) one at a time:
        a new one starts and has loaded its in-process apps before an old one drains,
        so no request is lost and the old worker serves until the new one can. What
        recycles (and restarts, with the code on disk now) an in-process app, which
        lives in every worker. A new worker that cannot load an app its old one had
        loaded ends the roll: it is stopped and the old workers keep serving (as a
        recycled app process that fails to start leaves the old one serving). False
        when a roll is under way already."""
        if self.stopping or (self._rolling is not None and not self._rolling.done()):
            return False
        self._rolling = asyncio.get_running_loop().create_task(self._roll(reason, pids))
        return True

    async def _roll(self, reason: str, pids: frozenset[int] | None) -> None:
        old = [w for w in self.workers if isinstance(w, ProcessWorker) and w.proc is not None
               and (pids is None or w.proc.pid in pids)]
        log.info("replacing %d worker(s) one at a time: %s", len(old), reason)
        for worker in old:
            if self.stopping or self._reloading.locked():
                return  # a stop or a reload replaces them anyway
            if worker not in self.workers:
                continue  # gone meanwhile (crashed, replaced)
            try:
                new = await self._start_one(self.config, self.pems, load_first=True)
            except Exception as exc:  # noqa: BLE001 - the old worker keeps serving
                log.error("recycle: a replacement worker failed to start: %s", exc)
                return
            if isinstance(new, ProcessWorker) and isinstance(worker, ProcessWorker):
                problem = await self._loads_regressed(new, worker)
                if problem is not None:
                    log.error("%s: the new worker %d (pid %s) %s; it is stopped and the "
                              "old worker(s) keep serving", reason, new.worker_id,
                              new.proc.pid if new.proc else "?", problem)
                    self._forget(new)
                    await new.stop(self.grace())
                    self._retire(new)
                    return
            if isinstance(new, ProcessWorker):
                new.listen()
            self._forget(worker)
            await worker.stop(self.grace())
            self._retire(worker)

    async def _loads_regressed(self, new: ProcessWorker, old: ProcessWorker) -> str | None:
        """Wait for ``new`` to load its in-process apps; why it cannot take ``old``'s
        place (an app ``old`` serves that ``new`` failed to load), else None."""
        limit = load_limit(self.config)
        reported = await new.loads_reported(limit)
        if new.proc is not None and new.proc.returncode is not None:
            return f"exited with {new.proc.returncode} while loading its apps"
        for app in sorted(old.hosted & new.hosted):
            before, now = old.loads.get(app), new.loads.get(app)
            if before is None or before.status != "loaded":
                continue  # not serving in the old worker either: nothing is lost
            if now is None or not reported:
                return f"had not loaded app {app} after {limit:g}s"
            if now.status != "loaded":
                return f"could not load app {app}: {now.reason}"
        return None

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
        from ..config.load import ConfigError, load_config

        if self.config.source.startswith("<"):
            return False, ["the built-in configuration cannot be reloaded"]
        async with self._reloading:
            self.notifier.reloading()
            try:
                new = load_config(self.config.source)
                new_pems = pem_files(new)  # the new generation's certificates, read once
                if new == self.config and not new.user:
                    # Only certificate files changed: swap contexts in place.
                    return self._reload_certificates(new_pems)
                old_sockets = dict(self.sockets)
                self.sockets = self._rebind(new, new_pems)
                self._answer(self.slots.configure(queue_limits(new.apps)))
                self.supervisor.apply(new.apps)
                try:
                    new_workers = await self._start_workers(
                        new, new_pems, worker_count(new), all_or_nothing=True)
                except BaseException:
                    self._restore_sockets(old_sockets)
                    raise
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
            timeout_changed = new.worker_timeout != self.config.worker_timeout
            self.config = new
            self.pems = new_pems
            self.generation += 1
            if timeout_changed:
                self._watch_liveness()
            # The old generation serves until the new one has loaded its in-process apps.
            limit = load_limit(new)
            await asyncio.gather(*(w.loads_reported(limit) for w in new_workers
                                   if isinstance(w, ProcessWorker)))
            for worker in new_workers:
                if isinstance(worker, ProcessWorker):
                    worker.listen()
            # Everything else is the old generation (replacements started meanwhile too).
            old_workers = [w for w in self.workers if w not in new_workers]
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

    def _reload_certificates(self, pems: PemFiles) -> tuple[bool, list[str]]:
        """The configuration is unchanged: new certificates in place, in every worker,
        without a new generation, so no connection is touched at all. The new bytes
        become the generation's: replacements start with them."""
        check_certificates(self.config, pems)  # a broken pair raises: nothing is changed
        self.pems = dict(pems)
        for worker in self.workers:
            worker.reload_certificates(self.pems)
        log.info("configuration unchanged: certificates re-read in place")
        self.notifier.ready(self._describe())
        return True, []

    def _restore_sockets(self, old: dict[str, socket.socket]) -> None:
        """A reload failed after ``_rebind``: close what it bound, keep the old set."""
        for address, sock in self.sockets.items():
            if old.get(address) is not sock:
                sock.close()
        self.sockets = old

    def _rebind(self, new: Config, pems: PemFiles) -> dict[str, socket.socket]:
        sockets: dict[str, socket.socket] = {}
        try:
            for listener in new.listeners:
                existing = self.sockets.get(listener.address)
                sockets[listener.address] = existing or bind_socket(listener)
                if listener.tls is not None:
                    server_context(listener, pems)  # a broken certificate refuses the reload
        except BaseException:
            for address, sock in sockets.items():
                if self.sockets.get(address) is not sock:
                    sock.close()
            raise
        return sockets

    # -- observing ------------------------------------------------------------------
    def _retire(self, worker: WorkerHandle) -> None:
        """Keep a gone worker's counters, so totals never go backwards; give back the
        request slots it held or waited for."""
        self._handles.pop(worker.worker_id, None)
        self._answer(self.slots.worker_gone(worker.worker_id))
        self._retired = merge([self._retired, retired(worker.metrics_snapshot())])

    def metrics(self) -> dict[str, Any]:
        """Every worker's metrics, past generations included, added up."""
        merged = merge([self._retired, *(w.metrics_snapshot() for w in self.workers)])
        merged["draining"] = int(self.draining)  # the node's state, not a worker's report
        return merged

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
        data["draining"] = self.draining
        data["config"] = self.config.source
        return data


def bind_all(config: Config, pems: PemFiles | None = None) -> dict[str, socket.socket]:
    """Bind every listener and check its TLS settings, from ``pems`` when given
    (OSError / TLS errors propagate)."""
    bound: dict[str, socket.socket] = {}
    try:
        for listener in config.listeners:
            if listener.tls is not None:
                server_context(listener, pems)  # fail before binding anything
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
        for path, _ in tls_files(listener.tls):
            try:
                files[path] = os.stat(path).st_mtime
            except OSError:
                files[path] = 0.0
    return files


class CertificateWatcher:
    """Reload when a certificate or key file changes (renewed by certbot, say).

    A renewal writes the certificate and the key one after the other: the reload waits
    until the files have been quiet for one interval, and a broken pair is refused by
    the reload itself, which keeps the old contexts. ``step`` runs every interval.
    """

    def __init__(self, bastion: Bastion) -> None:
        self.bastion = bastion
        self.seen = certificate_files(bastion.config)
        self.changed: dict[str, float] | None = None  # a change waiting to settle

    async def step(self) -> None:
        """Look at the files once; reload when a change has settled."""
        now = certificate_files(self.bastion.config)
        if self.changed is None or now != self.changed:
            self.changed = None if now == self.seen else now
            return
        self.changed = None
        log.info("certificate files changed: reloading")
        try:
            applied, _ = await self.bastion.reload()
        except Exception:  # a failed reload is logged here; the watcher goes on
            log.exception("reload after a certificate change failed")
            applied = False
        self.seen = certificate_files(self.bastion.config) if applied else now


async def watch_certificates(bastion: Bastion, interval: float = CERT_POLL) -> None:
    """Run a ``CertificateWatcher`` every ``interval`` seconds until cancelled."""
    watcher = CertificateWatcher(bastion)
    await every("certificate watcher", interval, watcher.step, log)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    def ping() -> None:
        notifier.watchdog()

    await every("systemd watchdog", interval, ping, log, first=0.0)


async def _run(config: Config, ready: Callable[[Bastion], None] | None) -> None:
    pems = pem_files(config)  # the first generation's certificates, read once
    sockets = bind_all(config, pems)
    bastion = Bastion(config, sockets, pems)
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
    warn_if_interpreted(log)
    report_h2_engine(log, any(lst.tls is not None and lst.http2 for lst in config.listeners))
    uvloop = install_uvloop()
    try:
        asyncio.run(_run(config, ready))
    except OSError as exc:
        print(f"bastion: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except TLSConfigError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 2
    except WorkerStartError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1
    if uvloop:
        log.debug("ran on uvloop")
    return 0


__all__ = ["Bastion", "serve"]
