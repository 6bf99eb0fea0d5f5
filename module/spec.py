"""What the module is told about each app: frozen, typed, every default in one place.

The proxy's configuration loader builds these from YAML; the module never reads YAML
itself. ``PoolSettings`` holds every setting a pool may carry, with the defaults of
docs/configuration.md; an app's own settings are a ``PoolSettings`` too, produced by
``PoolSettings.merged`` (the app's explicit keys win over the pool's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

StartMode = Literal["on_demand", "always"]
Transport = Literal["tcp", "unix"]
HostingModel = Literal["out_of_process", "in_process"]
Interface = Literal["asgi", "wsgi"]


@dataclass(frozen=True)
class RecycleSettings:
    """Overlapped-restart triggers; 0 turns a trigger off."""

    max_age: float = 0.0  # seconds
    max_requests: int = 0
    max_memory: int = 0  # bytes of RSS of the whole process tree


@dataclass(frozen=True)
class HealthCheck:
    """A periodic GET of ``path`` on each ready process (``module.health``)."""

    path: str = "/health"  # under the app's path base, as a client request would come
    interval: float = 10.0  # seconds between the end of one check and the next
    timeout: float = 2.0  # seconds for the whole answer's status line
    failures: int = 3  # failed checks in a row before the process is replaced


@dataclass(frozen=True)
class PoolSettings:
    """Lifecycle, identity and limits shared by the apps of a pool."""

    user: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    start_mode: StartMode = "on_demand"
    idle_timeout: float = 20 * 60.0
    startup_time_limit: float = 120.0
    shutdown_time_limit: float = 10.0
    request_timeout: float = 120.0
    rapid_fails_per_minute: int = 10
    processes_per_app: int = 1
    max_concurrency: int = 0
    max_queue: int = 100
    recycle: RecycleSettings = field(default_factory=RecycleSettings)
    health_check: HealthCheck | None = None  # off unless configured

    def merged(self, overrides: dict[str, Any]) -> PoolSettings:
        """Return these settings with ``overrides`` (already typed) applied.

        ``environment`` is merged key by key (the override's values win), every other
        setting is replaced whole.
        """
        values = dict(overrides)
        if "environment" in values:
            env = dict(self.environment)
            env.update(dict(values["environment"]))
            values["environment"] = tuple(env.items())
        return replace(self, **values)


POOL_SETTING_NAMES: frozenset[str] = frozenset(f.name for f in fields(PoolSettings))


@dataclass(frozen=True)
class AppSpec:
    """Everything the module needs to run one app's processes."""

    name: str
    command: tuple[str, ...] = ()  # the argv of an out-of-process app
    pool: str = "default"
    settings: PoolSettings = field(default_factory=PoolSettings)
    cwd: str | None = None
    path_base: str = ""  # "" for "/", else "/shop": handed over as BASTION_PATH_BASE
    stdout_log: str | None = None
    transport: Transport = "tcp"
    https_port: int | None = None  # handed over as BASTION_HTTPS_PORT when set
    # In-process hosting (docs/hosting-models.md): the app is called inside Bastion's
    # own proxy workers instead of being a process of its own; ``command`` is then ().
    hosting_model: HostingModel = "out_of_process"
    app: str | None = None  # "package.module:attribute", imported in every worker
    interface: Interface = "asgi"
    threads: int = 16  # wsgi only: the thread pool calling the app, per worker

    @property
    def in_process(self) -> bool:
        """The app is called inside the proxy workers (no process of its own)."""
        return self.hosting_model == "in_process"

    @property
    def environment(self) -> dict[str, str]:
        """The pool's and the app's environment, merged (the app's wins)."""
        return dict(self.settings.environment)
