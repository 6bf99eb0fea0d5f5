"""A proxy worker: listeners, endpoint table, upstream pool, logs and metrics.

Theory of operation
-------------------
``ProxyWorker`` is everything the proxy needs to serve requests, and nothing of the
module: it is given the bound listening sockets and a ``send`` function for module
messages, and it is told ``AppState`` snapshots. The main process runs one of them in
its own event loop (``workers: 1``, no ``user``), or runs N worker *processes*
(``python -m bastion.proxy.control.worker``), each a ``ProxyWorker`` connected to the main process by a
socketpair (``proxy.channel``); the messages are the same either way.

A worker process gets its set-up (config, socket fds, worker number, and the bytes of
its generation's certificate and key files) as the first frame, builds its TLS contexts
from those bytes (it never reads the files itself, so a replacement started after the
files changed serves what its generation checked), drops to the configured ``user``,
starts serving, says READY, and only then begins loading its in-process apps (each is
bounded by its own ``startup_time_limit``, not by the worker's start). A worker that
replaces one still serving (``load_first``: a roll of the workers, a reload's new
generation) says READY, loads, and takes connections only when the main process, having
seen its loads, says LISTEN (or is stopped without ever taking one, when its loads
failed): no request of it waits for a load or meets a load that failed. From then on it sends a HEARTBEAT frame every
``heartbeat_interval(worker_timeout)`` (``proxy.liveness``). It exits when told to stop
(after draining), on SIGTERM (the same), or at once when the channel closes (the main
process died): it never outlives the main process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import grp
import json
import logging
import os
import pickle
import pwd
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bastion.module.messages import (
    AppState,
    FromProxy,
    SlotGranted,
    SlotRefused,
    ToProxy,
    from_wire,
)
from bastion.module.periodic import every

from ..config.model import Config, Listener
from ..edge.accesslog import AccessLog
from ..edge.buffers import BufferBudget
from ..edge.endpoints import EndpointTable, queue_limits
from ..edge.health import NodeState
from ..edge.hosting.host import Host
from ..edge.listeners import ListenerSet
from ..edge.metrics import Metrics
from ..edge.routing import Router
from ..edge.site import Site
from ..edge.tls import PemFiles, TLSConfigError, TLSContextSet, read_pem_files
from ..edge.upstream import UpstreamPool
from . import channel
from .liveness import heartbeat_interval

log = logging.getLogger("bastion.worker")

Send = Callable[[FromProxy], None]
METRICS_EVERY = 1.0


def alpn_protocols(listener: Listener) -> list[str]:
    """The ALPN protocols a TLS listener offers (h2 first when ``http2`` is on)."""
    return ["h2", "http/1.1"] if listener.http2 else ["http/1.1"]


def server_context(listener: Listener, files: PemFiles | None = None) -> ssl.SSLContext:
    """The TLS context of ``listener`` (which must have ``tls``), from ``files`` when
    given (else read from disk)."""
    from ..edge.tls import build_server_context

    assert listener.tls is not None
    return build_server_context(listener.tls, alpn_protocols(listener), files)


def context_set(listener: Listener, files: PemFiles | None = None) -> TLSContextSet:
    """The reloadable TLS contexts of ``listener`` (which must have ``tls``)."""
    assert listener.tls is not None
    return TLSContextSet(listener.tls, alpn_protocols(listener), files)


def pem_files(config: Config) -> dict[str, bytes]:
    """The bytes of every certificate, key and client CA file of ``config``, read now:
    one generation's certificates (TLSConfigError when a file cannot be read)."""
    return read_pem_files(lis.tls for lis in config.listeners if lis.tls is not None)


def check_certificates(config: Config, files: PemFiles) -> None:
    """Build every TLS listener's contexts from ``files`` (TLSConfigError when broken)."""
    for listener in config.listeners:
        if listener.tls is not None:
            server_context(listener, files)


class ProxyWorker:
    """One worker's proxy: serves requests on the sockets it is given."""

    def __init__(self, config: Config, send: Send, worker_id: int = 0,
                 pems: PemFiles | None = None, draining: bool = False) -> None:
        self.config = config
        self.worker_id = worker_id
        self.pems = pems  # the generation's certificate bytes (None: read the files)
        self.table = EndpointTable(send, queue_limits(config.apps), worker=worker_id)
        self.host = Host(config.apps, self.table, send, worker_id)  # in-process apps
        self.pool = UpstreamPool()
        self.access_log = AccessLog(config.access_log, config.access_log_format)
        self.metrics = Metrics()
        self.node = NodeState(draining)  # health 503 and Connection: close while draining
        self.metrics.draining = int(draining)
        self.buffers = BufferBudget(config.limits.buffer_memory)  # shared by all listeners
        self.listeners = ListenerSet()
        self.tls: dict[str, TLSContextSet] = {}  # listener address -> its contexts

    def bind(self, sockets: dict[str, socket.socket]
             ) -> list[tuple[Listener, socket.socket, ssl.SSLContext | None]]:
        """Pair each listener with its socket and (new) TLS contexts."""
        bound = []
        for listener in self.config.listeners:
            context = None
            if listener.tls is not None:
                self.tls[listener.address] = context_set(listener, self.pems)
                context = self.tls[listener.address].context
            bound.append((listener, sockets[listener.address], context))
        return bound

    def reload_certificates(self, pems: PemFiles | None = None) -> None:
        """New certificates in place (from ``pems``, else re-read from disk): connections
        stay open, new handshakes use the new ones. A broken pair raises and the old
        ones stay."""
        for contexts in self.tls.values():
            contexts.reload(files=pems)
        if pems is not None:
            self.pems = pems

    def set_draining(self, draining: bool) -> None:
        """The node drains (health 503, clients told to move) or serves again."""
        if draining == self.node.draining:
            return
        self.node.draining = draining
        self.metrics.draining = int(draining)
        if draining:
            self.listeners.goaway_http2()

    def update(self, state: AppState) -> None:
        """A state snapshot from the module."""
        self.table.update(state)

    def deliver(self, message: ToProxy) -> None:
        """A message from the main process: a state, or the answer to a slot."""
        self.table.deliver(message)

    async def start(self, sockets: list[tuple[Listener, socket.socket, ssl.SSLContext | None]]
                    ) -> None:
        """Serve ``sockets`` (already bound and listening)."""
        router = Router(self.config.all_routes)
        sites = {
            listener.address: Site(
                listener, self.config, router, self.table, self.pool, self.access_log,
                self.metrics, buffers=self.buffers, host=self.host if self.host else None,
                node=self.node,
            )
            for listener in self.config.listeners
        }
        await self.listeners.start(sockets, sites, self.config)

    def grace(self) -> float:
        """How long a graceful stop waits for requests in flight."""
        longest = max((a.settings.request_timeout for a in self.config.apps), default=10.0)
        return min(longest, 30.0)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish requests in flight (up to ``grace``), close."""
        await self.listeners.stop(grace=self.grace() if grace is None else grace)
        await self.host.stop()
        self.table.flush_reports()
        await self.pool.close()
        self.access_log.close()

    def metrics_snapshot(self) -> dict[str, object]:
        """This worker's metrics, with the connections open now."""
        self.metrics.open_connections = self.listeners.open_connections()
        self.metrics.access_log_lost = self.access_log.lost_lines
        for spec in self.config.apps:
            if spec.in_process:
                self.metrics.set_load(spec.name, self.host.in_flight(spec.name),
                                      self.host.queued(spec.name))
                continue
            in_flight = sum(n for n, _ in self.table.counters(spec.name).values())
            self.metrics.set_load(spec.name, in_flight, self.table.queued(spec.name))
        self.metrics.set_buffers(self.buffers.used, self.buffers.peak, self.buffers.cap,
                                 self.buffers.refusals)
        return self.metrics.snapshot()

    def reopen_logs(self) -> None:
        """Reopen the access log (SIGUSR1)."""
        self.access_log.reopen()


async def report_slow_stop(after: float) -> None:
    """Log what a stop is still waiting for, once it has taken ``after`` seconds."""
    await asyncio.sleep(after)
    current = asyncio.current_task()
    lines = []
    for task in asyncio.all_tasks():
        if task is current or task.done():
            continue
        frames = task.get_stack(limit=6)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        lines.append(f"  {task.get_name()}: {where}")
    log.warning("the stop is taking more than %gs; waiting on:\n%s", after, "\n".join(lines))


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process is given by the main process."""

    config: Config
    worker_id: int
    fds: tuple[tuple[str, int], ...]  # listener address -> inherited socket fd
    states: tuple[AppState, ...] = ()  # the module's snapshot when the worker was made
    pems: tuple[tuple[str, bytes], ...] = ()  # the generation's certificate files' bytes
    draining: bool = False  # the node drains (``bastion drain``) when the worker starts
    # Take connections only when told (LISTEN), once its in-process apps have loaded:
    # a worker replacing another (a roll, a reload) while the old one still serves.
    load_first: bool = False


def _preload() -> None:
    """Import what serving may import lazily, while the interpreter's own directory is
    still readable (it may not be for the unprivileged user)."""
    import codecs
    import encodings.idna  # noqa: F401 - host names with non-ASCII labels

    codecs.lookup("idna")
    "bastion.example".encode("idna")


def drop_privileges(user: str) -> None:
    """Become ``user`` (and its groups) when running as root."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    os.setgroups(sorted({entry.pw_gid, *groups}))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


async def _worker_process(channel_fd: int) -> None:
    sock = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    kind, payload = await channel.read_frame(reader)
    if kind != channel.SETUP:
        raise SystemExit("bastion worker: no set-up received")
    setup: WorkerSetup = pickle.loads(payload)
    config = setup.config
    by_address = dict(setup.fds)
    listening = {address: socket.socket(fileno=fd) for address, fd in by_address.items()}

    def send(message: FromProxy) -> None:
        if not writer.is_closing():
            writer.write(channel.json_frame(channel.MESSAGE, message.to_wire()))

    # Opens its logs while still root; its TLS contexts come from the generation's bytes.
    worker = ProxyWorker(config, send, setup.worker_id, dict(setup.pems), setup.draining)
    sockets = worker.bind(listening)
    if config.user:
        _preload()
        drop_privileges(config.user)
    for state in setup.states:
        worker.update(state)
    if not setup.load_first:
        await worker.start(sockets)
    writer.write(channel.frame(channel.READY))
    # Everything made so far (modules, config, TLS contexts) lives as long as the worker:
    # out of the cycle collector's sight, its full collections no longer walk it all
    # (they took about 8% of a worker under h2load -m10). The host freezes again once
    # an in-process app has loaded.
    gc.freeze()
    # In-process apps load in the background, as the workers' user, once the worker
    # is up: a slow app holds up neither the worker's start nor its other apps.
    worker.host.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    go = asyncio.Event()  # LISTEN received (a load_first worker)
    grace: list[float] = []
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the main process decides
    loop.add_signal_handler(signal.SIGUSR1, worker.reopen_logs)

    async def read_loop() -> None:
        try:
            while True:
                kind, payload = await channel.read_frame(reader)
                if kind == channel.MESSAGE:
                    message = from_wire(json.loads(payload))
                    if isinstance(message, AppState | SlotGranted | SlotRefused):
                        worker.deliver(message)
                elif kind == channel.STOP:
                    grace.append(float(json.loads(payload or b"10")))
                    stop.set()
                    return
                elif kind == channel.REOPEN:
                    worker.reopen_logs()
                elif kind == channel.DRAIN:
                    worker.set_draining(bool(json.loads(payload)))
                elif kind == channel.LISTEN:
                    go.set()
                elif kind == channel.CERTIFICATES:
                    try:
                        worker.reload_certificates(pickle.loads(payload) if payload else None)
                    except TLSConfigError as exc:
                        log.error("certificates not reloaded, old ones kept: %s", exc)
        except (asyncio.IncompleteReadError, ConnectionError):
            os._exit(0)  # the main process is gone: never outlive it

    def report_metrics() -> None:
        if not writer.is_closing():
            writer.write(channel.json_frame(channel.METRICS, worker.metrics_snapshot()))

    def heartbeat() -> None:
        if not writer.is_closing():
            writer.write(channel.frame(channel.HEARTBEAT))

    tasks = [
        asyncio.create_task(read_loop()),
        asyncio.create_task(every("metrics report", METRICS_EVERY, report_metrics, log)),
        asyncio.create_task(every("heartbeat", heartbeat_interval(config.worker_timeout),
                                  heartbeat, log, first=0.0)),
    ]
    if setup.load_first:
        # It replaces a worker that serves meanwhile: the main process tells it to take
        # connections once its loads are in (it is stopped instead if they failed).
        told = asyncio.ensure_future(go.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({told, stopping}, return_when=asyncio.FIRST_COMPLETED)
        told.cancel()
        stopping.cancel()
        if not stop.is_set():
            await worker.start(sockets)
    await stop.wait()
    reporter = asyncio.create_task(report_slow_stop(8.0))
    await worker.stop(grace[0] if grace else None)
    reporter.cancel()
    with contextlib.suppress(Exception):
        writer.write(channel.json_frame(channel.METRICS, worker.metrics_snapshot()))
        await writer.drain()
    for task in tasks:
        task.cancel()


def main() -> None:
    """``python -m bastion.proxy.control.worker --channel FD``: one proxy worker process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--channel", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    from .loop import install_uvloop

    install_uvloop()
    asyncio.run(_worker_process(args.channel))


if __name__ == "__main__":
    main()
