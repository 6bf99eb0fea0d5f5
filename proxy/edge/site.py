"""What every request of one listener shares: config, routing, endpoints, pool, logs.

A ``Site`` is made once per listener and worker generation. It holds nothing per
request; the protocols (``proxy.edge.h1``, ``proxy.edge.h2server``) and the flows
(``proxy.edge.flow``) read from it: the routes, the app specs by name, the endpoint
table, the upstream pool, the in-process apps (``host``), the headers every answer
carries (``Server``, HSTS), the error pages, the access log and metrics a finished
request goes to, each app's buffering and compression settings and the worker's buffer
budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bastion.module.spec import AppSpec

from ..config.model import Config, Listener, Offload
from .accesslog import AccessLog, LogEntry
from .buffers import BufferBudget
from .endpoints import EndpointTable
from .error_pages import render
from .errors import ProxyError
from .h1state import DEADLINES
from .health import HealthAnswer, NodeState, answer
from .metrics import Metrics
from .routing import Router
from .trust import TrustedProxies
from .upstream import UpstreamPool

if TYPE_CHECKING:
    from .hosting.host import Host

WAIT_MARGIN = 5.0


class Logged(Protocol):
    """A request that can say what the access log says of it."""

    def log_entry(self) -> LogEntry: ...  # beyond startup_time_limit, in case the module's own timer is late


@dataclass(frozen=True)
class ErrorPage:
    """An error answer, ready for any protocol."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Site:
    """The shared context of one listener's requests."""

    def __init__(self, listener: Listener, config: Config, router: Router,
                 table: EndpointTable, pool: UpstreamPool, access_log: AccessLog,
                 metrics: Metrics | None = None, buffers: BufferBudget | None = None,
                 host: Host | None = None, node: NodeState | None = None) -> None:
        self.listener = listener
        self.config = config
        self.limits = config.limits
        # The connection's own deadline in each HTTP/1.1 state (h1state.DEADLINES): the
        # limit's value, read once.
        self.state_limits: dict[str, float] = {
            state: float(getattr(config.limits, limit))
            for state, limit in DEADLINES.items() if limit != "flow"}
        self.router = router
        self.table = table
        self.pool = pool
        self.access_log = access_log
        self.metrics = metrics
        self.host = host  # the worker's in-process apps (proxy.edge.hosting)
        self.scheme = "https" if listener.tls is not None else "http"
        self.port = listener.port
        self.trusted = TrustedProxies(config.trusted_proxies)
        self.apps: dict[str, AppSpec] = {spec.name: spec for spec in config.apps}
        # What the flow asks of every request's app, read once (AppSpec is no native class).
        self.in_process: frozenset[str] = frozenset(
            spec.name for spec in config.apps if spec.in_process)
        self.request_timeouts: dict[str, float] = {
            spec.name: spec.settings.request_timeout for spec in config.apps}
        self.node = node if node is not None else NodeState()  # the drain, per worker
        self.health_path = config.health.path  # answered here (None: not at all)
        self._required = config.health.require_apps
        self.accel = bool(config.statics)  # apps' X-Accel-Redirect is looked for
        # Buffering and compression by app (its pool's); the worker's buffer budget.
        self.offload: dict[str, Offload] = {spec.name: config.offload_of(spec.name)
                                            for spec in config.apps}
        self.buffers = buffers if buffers is not None \
            else BufferBudget(config.limits.buffer_memory)
        self._redirects = listener.redirect_https
        self._https_port = config.https_port if listener.redirect_https else None
        # Like nginx, every answer names the edge, not the app's server software.
        extra: list[tuple[bytes, bytes]] = [(b"Server", b"bastion")]
        if listener.tls is not None and listener.tls.hsts:
            extra.append((b"Strict-Transport-Security", b"max-age=%d" % listener.tls.hsts))
        self.response_headers = extra
        self.extra_head = b"".join(n + b": " + v + b"\r\n" for n, v in extra)

    def health(self) -> HealthAnswer:
        """The node's health answer now (``proxy.edge.health``)."""
        return answer(self.node, self._required, self.table.state)

    def error_page(self, error: ProxyError) -> ErrorPage:
        """The page for ``error`` (never cached by anyone in front of us); the protocol
        adds ``response_headers`` as to every answer."""
        body = render(error, self.config.detailed_errors).encode("utf-8")
        headers = [(b"Content-Type", b"text/html; charset=utf-8"),
                   (b"Cache-Control", b"no-store")]
        if error.retry_after is not None:
            headers.append((b"Retry-After", b"%d" % error.retry_after))
        headers.extend(error.extra_headers)
        return ErrorPage(error.status, headers, body)

    def redirect_location(self, host: str, target: str) -> bytes | None:
        """Where ``redirect_https`` sends a request, or None when it does not apply."""
        https_port = self._https_port
        if not self._redirects or https_port is None:
            return None
        if self.health_path is not None and target.split("?", 1)[0] == self.health_path:
            return None  # the node's health is answered on every listener, never redirected
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if https_port != 443:
            name = f"{name}:{https_port}"
        return f"https://{name}{target}".encode("latin-1")

    def finished(self, entry: LogEntry | Logged, status: int, sent: int, app: str, pid: int,
                 duration: float) -> None:
        """Access log and metrics for one finished request, whatever its protocol
        (``entry``: what the log says of it, made only when there is a log)."""
        if self.access_log.enabled:
            if not isinstance(entry, LogEntry):
                entry = entry.log_entry()
            self.access_log.write_entry(entry, status, sent, app, pid, duration)
        if self.metrics is not None:
            self.metrics.observe(app, status, duration)
