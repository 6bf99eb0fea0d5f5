"""``bastion config``: a ``Config`` written back as YAML, every default filled in.

The result is itself a valid configuration file (``bastion check`` accepts it and loads
the same ``Config``): relative paths are absolute, durations are seconds and sizes bytes,
every app carries its pool's settings merged with its own.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import yaml

from bastion.module.spec import AppSpec, PoolSettings

from .model import Config, Listener, Offload, StaticLocation


def _settings(settings: PoolSettings) -> dict[str, Any]:
    values = asdict(settings)
    values["environment"] = dict(settings.environment)
    return values


def _offload(config: Config, pool: str) -> dict[str, Any]:
    offload = config.offload.get(pool) or Offload()
    compression = asdict(offload.compression)
    compression["types"] = list(offload.compression.types)
    return {"buffering": asdict(offload.buffering), "compression": compression}


def _listener(listener: Listener) -> dict[str, Any]:
    entry: dict[str, Any] = {"address": listener.address,
                             "proxy_protocol": listener.proxy_protocol}
    if listener.tls is None:
        entry["redirect_https"] = listener.redirect_https
        return entry
    tls: dict[str, Any] = {
        "certificates": [{"cert": c.cert, "key": c.key} for c in listener.tls.certificates],
        "hsts": listener.tls.hsts,
        "client_certificates": listener.tls.client_certificates,
    }
    if listener.tls.client_ca is not None:
        tls["client_ca"] = listener.tls.client_ca
    entry["tls"] = tls
    entry["http2"] = listener.http2
    return entry


def _app(config: Config, spec: AppSpec) -> dict[str, Any]:
    route = next(r for r in config.routes if r.app == spec.name)
    if spec.in_process:  # no process of its own: only the keys that mean something
        settings = _settings(spec.settings)
        for key in ("processes_per_app", "start_mode", "idle_timeout"):
            del settings[key]
        return {
            "pool": spec.pool,
            "hosts": list(route.hosts),
            "path": route.path,
            "hosting_model": spec.hosting_model,
            "app": spec.app,
            "interface": spec.interface,
            "threads": spec.threads,
            "cwd": spec.cwd,
            "websockets": route.websockets,
            **settings,
        }
    return {
        "pool": spec.pool,
        "hosts": list(route.hosts),
        "path": route.path,
        "hosting_model": spec.hosting_model,
        "command": list(spec.command),
        "cwd": spec.cwd,
        "stdout_log": spec.stdout_log,
        "transport": spec.transport,
        "websockets": route.websockets,
        **_settings(spec.settings),
    }


def _static(location: StaticLocation) -> dict[str, Any]:
    return {
        "hosts": list(location.hosts),
        "path": location.path,
        "root": location.root,
        "index": location.index,
        "precompressed": location.precompressed,
        "cache_control": location.cache_control,
        "internal": location.internal,
    }


def effective(config: Config) -> dict[str, Any]:
    """``config`` as the data of a configuration file, with every key present."""
    return {
        "listen": [_listener(lis) for lis in config.listeners],
        "user": config.user,
        "admin_socket": config.admin_socket,
        "access_log": config.access_log,
        "access_log_format": config.access_log_format,
        "workers": config.workers,
        "trusted_proxies": list(config.trusted_proxies),
        "detailed_errors": config.detailed_errors,
        "metrics_listen": config.metrics_listen,
        "limits": asdict(config.limits),
        "health": {"path": config.health.path, "drain_delay": config.health.drain_delay,
                   "require_apps": list(config.health.require_apps)},
        "pools": {name: {**_settings(pool), **_offload(config, name)}
                  for name, pool in config.pools.items()},
        "apps": {spec.name: _app(config, spec) for spec in config.apps},
        "static": {location.name: _static(location) for location in config.statics},
    }


def dump(config: Config, workers: int) -> str:
    """The YAML text of ``effective(config)`` with a header; ``workers`` is what
    ``workers`` resolves to on this machine."""
    head = (f"# The effective configuration of {config.source}: every default filled in.\n"
            "# Durations are in seconds, sizes in bytes; 0 turns a limit or trigger off.\n"
            f"# workers: {config.workers} means {workers} proxy worker process(es) here.\n")
    body = yaml.safe_dump(effective(config), sort_keys=False, default_flow_style=False,
                          allow_unicode=True)
    return head + body
