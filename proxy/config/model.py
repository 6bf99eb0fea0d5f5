"""Bastion's configuration as frozen, typed objects, with every edge default in one place.

``proxy.config_load`` turns a YAML file into a ``Config`` (and reports problems as
``FILE:LINE: message``); everything after that reads only these objects. The settings
of pools and apps live in ``module.spec`` because the module is the part that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bastion.module.spec import AppSpec, PoolSettings

ClientCertMode = Literal["none", "optional", "required"]
LogFormat = Literal["combined", "json"]


@dataclass(frozen=True)
class CertificatePair:
    """One certificate chain and its private key, both PEM files."""

    cert: str
    key: str


@dataclass(frozen=True)
class TLSSettings:
    """TLS on one listener; the first certificate is the default for SNI."""

    certificates: tuple[CertificatePair, ...]
    hsts: int | None = None  # max-age seconds
    client_certificates: ClientCertMode = "none"
    client_ca: str | None = None


@dataclass(frozen=True)
class Listener:
    """One socket Bastion listens on."""

    host: str
    port: int
    tls: TLSSettings | None = None
    redirect_https: bool = False
    http2: bool = True  # only meaningful with TLS
    proxy_protocol: bool = False  # a PROXY v1/v2 header starts every connection

    @property
    def address(self) -> str:
        """The address as written in the config, e.g. ``127.0.0.1:8080`` or ``[::]:443``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Limits:
    """Per-request and per-connection limits at the edge (``limits``, docs/configuration.md)."""

    max_body_size: int = 30 * 1024 * 1024
    max_header_size: int = 16 * 1024
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 10000
    buffer_memory: int = 64 * 1024 * 1024  # per worker: request and response buffering


@dataclass(frozen=True)
class Buffering:
    """How much of a request and of a response the edge holds for a slow client
    (``pools.NAME.buffering``); 0 turns that side off (streamed with backpressure)."""

    request: int = 64 * 1024  # body bytes read before the app is asked
    response: int = 1024 * 1024  # bytes read from the app beyond what the client took


COMPRESSIBLE: tuple[str, ...] = ("text/*", "application/json", "application/javascript",
                                 "image/svg+xml")


@dataclass(frozen=True)
class Compression:
    """Compression of app responses at the edge (``pools.NAME.compression``)."""

    enabled: bool = True
    min_size: int = 1024  # bytes; a body known to be smaller goes as it is
    types: tuple[str, ...] = COMPRESSIBLE  # media types, ``text/*`` wildcards allowed
    level: int = 4  # gzip level (1-9): measured, see docs/offload.md
    brotli_level: int = 2  # brotli quality (0-11), when brotli is installed: measured too


@dataclass(frozen=True)
class Offload:
    """What the edge does for one pool's apps besides forwarding: buffering, compression."""

    buffering: Buffering = field(default_factory=Buffering)
    compression: Compression = field(default_factory=Compression)


@dataclass(frozen=True)
class HealthSettings:
    """The node's own health endpoint and drain (``health``, docs/scaling.md)."""

    path: str | None = "/.well-known/bastion/health"  # None: not answered
    drain_delay: float = 0.0  # at SIGTERM: seconds of health 503 before the stop
    require_apps: tuple[str, ...] = ()  # health 503 while one of them is not ready


@dataclass(frozen=True)
class StaticLocation:
    """A directory served by the workers themselves (``static``, docs/static.md)."""

    name: str
    root: str  # absolute, symbolic links resolved
    hosts: tuple[str, ...] = ()
    path: str = "/"
    index: str | None = None  # a directory's file; never a listing
    precompressed: bool = False  # name.br / name.gz siblings when the client accepts them
    cache_control: str | None = None
    internal: bool = False  # only for X-Accel-Redirect; 404 to a client's own request


@dataclass(frozen=True)
class Route:
    """Where an app (or a static location) is mounted: host patterns (empty = any
    host) and a path base."""

    app: str  # the app's name, or the static location's
    hosts: tuple[str, ...] = ()
    path: str = "/"
    websockets: bool = True  # WebSocket upgrades tunnelled to the app
    static: StaticLocation | None = None  # served from files, not by an app


@dataclass(frozen=True)
class Config:
    """The whole parsed configuration."""

    listeners: tuple[Listener, ...]
    apps: tuple[AppSpec, ...]
    routes: tuple[Route, ...]
    pools: dict[str, PoolSettings] = field(default_factory=lambda: {"default": PoolSettings()})
    offload: dict[str, Offload] = field(default_factory=lambda: {"default": Offload()})  # by pool
    user: str | None = None
    admin_socket: str = "/run/bastion/admin.sock"
    access_log: str | None = None
    access_log_format: LogFormat = "combined"
    workers: int | Literal["auto"] = "auto"
    worker_timeout: float = 30.0  # seconds without a heartbeat before a worker is killed
    trusted_proxies: tuple[str, ...] = ()
    detailed_errors: bool = False
    limits: Limits = field(default_factory=Limits)
    metrics_listen: str | None = None  # "127.0.0.1:9180": GET /metrics over plain HTTP
    health: HealthSettings = field(default_factory=HealthSettings)
    statics: tuple[StaticLocation, ...] = ()
    source: str = "<built-in>"  # the file it came from

    def app(self, name: str) -> AppSpec:
        """The app called ``name`` (KeyError when there is none)."""
        for spec in self.apps:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def offload_of(self, app: str) -> Offload:
        """The buffering and compression settings of ``app`` (its pool's)."""
        pool = self.app(app).pool
        return self.offload.get(pool) or Offload()

    @property
    def all_routes(self) -> tuple[Route, ...]:
        """The apps' routes and the static locations', routed together."""
        return self.routes + tuple(
            Route(app=s.name, hosts=s.hosts, path=s.path, websockets=False, static=s)
            for s in self.statics)

    @property
    def https_port(self) -> int | None:
        """The port of the first TLS listener, if any."""
        for listener in self.listeners:
            if listener.tls is not None:
                return listener.port
        return None
