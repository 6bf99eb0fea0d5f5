"""The settings for running behind a load balancer: ``listen[].proxy_protocol`` and
``health`` (path, drain_delay, require_apps), and the health answer they lead to. Pure:
configuration files and plain values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bastion.module.messages import AppState, Endpoint
from bastion.proxy.config.dump import dump
from bastion.proxy.config.load import ConfigError, load_config
from bastion.proxy.config.model import Config, HealthSettings
from bastion.proxy.edge.health import HealthAnswer, NodeState, answer


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bastion.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return [str(p).removeprefix(f"{path}:") for p in caught.value.problems]


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "bastion.yaml"
    path.write_text(text)
    return load_config(str(path))


BASE = """\
listen:
  - address: "127.0.0.1:8080"
    proxy_protocol: true
apps:
  shop: {command: [x]}
"""


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, 'listen: [{address: "127.0.0.1:8080"}]\napps: {a: {command: [x]}}\n')
    assert config.health == HealthSettings("/.well-known/bastion/health", 0.0, ())
    assert config.listeners[0].proxy_protocol is False


def test_proxy_protocol_needs_trusted_proxies(tmp_path: Path) -> None:
    assert problems(tmp_path, BASE) == [
        "2: listen[0].proxy_protocol needs trusted_proxies: the addresses of the load "
        "balancers allowed to send the PROXY header"]
    config = load(tmp_path, BASE + 'trusted_proxies: ["10.0.0.0/24"]\n')
    assert config.listeners[0].proxy_protocol is True


def test_proxy_protocol_must_be_a_boolean(tmp_path: Path) -> None:
    text = BASE.replace("proxy_protocol: true", "proxy_protocol: v2") + \
        'trusted_proxies: ["10.0.0.0/24"]\n'
    assert problems(tmp_path, text) == [
        "3: listen[0].proxy_protocol must be true or false, not 'v2'"]


def test_health_settings(tmp_path: Path) -> None:
    text = BASE + """\
trusted_proxies: ["10.0.0.0/24"]
health:
  path: /healthz
  drain_delay: 5s
  require_apps: [api]
apps:
  api: {command: [x], start_mode: always}
"""
    text = text.replace("apps:\n  shop: {command: [x]}\n", "")
    config = load(tmp_path, text)
    assert config.health == HealthSettings("/healthz", 5.0, ("api",))
    again = yaml.safe_load(dump(config, 1))
    assert again["health"] == {"path": "/healthz", "drain_delay": 5.0, "require_apps": ["api"]}
    assert again["listen"][0]["proxy_protocol"] is True


@pytest.mark.parametrize(("health", "message"), [
    ("{path: healthz}", "9: health.path must start with \"/\", not 'healthz'"),
    ("{path: '/h?x=1'}", "9: health.path must be a path without a query, not '/h?x=1'"),
    ("{drain_delay: soon}", "9: health.drain_delay"),
    ("{require_apps: shop}", "9: health.require_apps must be a list"),
    ("{require_apps: [shp]}", "9: health.require_apps names unknown app 'shp'; "
                              "did you mean 'shop'?"),
    ("{require_apps: [shop]}", "9: health.require_apps: app 'shop' must have start_mode: "
                               "always"),
    ("{patth: /x}", "9: unknown key 'patth' in health; did you mean 'path'?"),
])
def test_health_problems_name_the_line_and_key(tmp_path: Path, health: str,
                                                message: str) -> None:
    text = BASE + 'trusted_proxies: ["10.0.0.0/24"]\n\n\nhealth: ' + health + "\n"
    (problem,) = problems(tmp_path, text)
    assert problem.startswith(message), problem


def test_health_path_null_turns_the_endpoint_off(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + 'trusted_proxies: ["10.0.0.0/24"]\nhealth: {path: null}\n')
    assert config.health.path is None


# -- the health answer (proxy/edge/health.py), pure -----------------------------------------


def _state(app: str, state: str, endpoints: int = 1) -> AppState:
    return AppState(app=app, version=1, state=state,
                    endpoints=tuple(Endpoint(pid=100 + i, port=9000 + i, token="t")
                                    for i in range(endpoints)))


SERVING = HealthAnswer(200, b"serving\n")
DRAINING = HealthAnswer(503, b"draining\n")
API_NOT_READY = HealthAnswer(503, b"not ready: api\n")


@pytest.mark.parametrize(("draining", "required", "states", "expected"), [
    (False, (), {}, SERVING),
    (True, (), {}, DRAINING),
    (False, (), {"api": _state("api", "failed", 0)}, SERVING),  # not required: no matter
    (False, ("api",), {"api": _state("api", "ready")}, SERVING),
    (False, ("api",), {"api": _state("api", "starting", 0)}, API_NOT_READY),
    (False, ("api",), {"api": _state("api", "ready", 0)}, API_NOT_READY),
    (False, ("api",), {"api": _state("api", "backoff", 0)}, API_NOT_READY),
    (False, ("api",), {}, API_NOT_READY),  # no state heard of yet
    (True, ("api",), {"api": _state("api", "ready")}, DRAINING),
], ids=["serving", "draining", "unrequired-failed", "required-ready", "required-starting",
        "required-no-endpoint", "required-backoff", "required-unknown", "draining-wins"])
def test_the_health_answer(draining: bool, required: tuple[str, ...],
                           states: dict[str, AppState], expected: HealthAnswer) -> None:
    assert answer(NodeState(draining), required, states.get) == expected


def test_two_required_apps_not_ready_are_both_named() -> None:
    states = {"a": _state("a", "failed", 0), "b": _state("b", "ready"),
              "c": _state("c", "stopped", 0)}
    assert answer(NodeState(), ("a", "b", "c"), states.get).body == b"not ready: a, c\n"
