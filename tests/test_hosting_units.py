"""Pure tests of in-process hosting: the ASGI scope and WSGI environ built from a
request (proxy/edge/hosting/scope.py), the configuration of in-process apps and its
dump, the module's view of a hosted app (module/hosted.py) and the message on the wire.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.module.hosted import HostedController
from bastion.module.messages import (
    AppState,
    HealthReport,
    HostedReport,
    ProcessUsage,
    UsageReport,
    from_wire,
)
from bastion.module.spec import AppSpec, HealthCheck, PoolSettings, RecycleSettings
from bastion.proxy.config.dump import effective
from bastion.proxy.config.load import ConfigError, config_from_dict, load_config
from bastion.proxy.edge.hosting import scope as scopes

HEADERS = [
    (b"Host", b"shop.example.com:8443"),
    (b"User-Agent", b"test"),
    (b"Connection", b"keep-alive, X-Drop"),
    (b"X-Drop", b"gone"),
    (b"X-Bastion-Token", b"forged"),
    (b"X-Forwarded-For", b"203.0.113.9"),
    (b"X_Under", b"smuggled"),
    (b"Content-Type", b"application/json"),
    (b"Content-Length", b"2"),
    (b"Cookie", b"a=1"),
    (b"Cookie", b"b=2"),
    (b"Accept", b"text/html"),
    (b"Accept", b"*/*"),
]


def head(path: str = "/api/items/ä", target: str = "/api/items/%C3%A4?q=1&r=%20",
         trusted: bool = False, version: str = "1.1") -> scopes.Head:
    return scopes.Head("POST", target, path, HEADERS, "198.51.100.7", 50123, version, trusted)


FACTS = scopes.Facts("https", "shop.example.com", 8443, "/api")


def test_http_scope_carries_the_real_facts() -> None:
    scope = scopes.http_scope(head(), FACTS, {"db": "pool"})
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["scheme"] == "https"
    assert scope["client"] == ("198.51.100.7", 50123)
    assert scope["server"] == ("shop.example.com", 8443)
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/items/ä"  # the full path, ASGI's rule
    assert scope["raw_path"] == b"/api/items/%C3%A4"
    assert scope["query_string"] == b"q=1&r=%20"
    assert scope["method"] == "POST" and scope["http_version"] == "1.1"
    assert scope["state"] == {"db": "pool"}


def test_headers_after_hygiene() -> None:
    names = [n for n, _ in scopes.http_scope(head(), FACTS)["headers"]]
    assert all(n == n.lower() for n in names)
    for dropped in (b"connection", b"x-drop", b"x-bastion-token", b"x-forwarded-for",
                    b"x_under"):
        assert dropped not in names
    assert names.count(b"cookie") == 2 and b"host" in names
    trusted = [n for n, _ in scopes.http_scope(head(trusted=True), FACTS)["headers"]]
    assert b"x-forwarded-for" in trusted and b"x-bastion-token" not in trusted


def test_state_is_copied_per_request() -> None:
    state = {"n": 1}
    scope = scopes.http_scope(head(), FACTS, state)
    scope["state"]["n"] = 2
    assert state == {"n": 1}
    assert "state" not in scopes.http_scope(head(), FACTS)


def test_websocket_scope() -> None:
    ws_headers = [(b"Host", b"a"), (b"Sec-WebSocket-Protocol", b"chat, superchat")]
    request = scopes.Head("GET", "/api/ws", "/api/ws", ws_headers, "::1", 1, "1.1", False)
    scope = scopes.websocket_scope(request, FACTS)
    assert scope["type"] == "websocket" and scope["scheme"] == "wss"
    assert "method" not in scope and scope["subprotocols"] == ["chat", "superchat"]
    plain = scopes.websocket_scope(request, scopes.Facts("http", FACTS.server_host, FACTS.server_port, FACTS.root_path))
    assert plain["scheme"] == "ws"


def test_wsgi_environ() -> None:
    environ = scopes.wsgi_environ(head(), FACTS)
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["SCRIPT_NAME"] == "/api"
    assert environ["PATH_INFO"] == "/items/ä".encode().decode("latin-1")  # PEP 3333
    assert environ["QUERY_STRING"] == "q=1&r=%20"
    assert environ["SERVER_NAME"] == "shop.example.com" and environ["SERVER_PORT"] == "8443"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["REMOTE_ADDR"] == "198.51.100.7" and environ["REMOTE_PORT"] == "50123"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["CONTENT_LENGTH"] == "2"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["HTTP_ACCEPT"] == "text/html,*/*"
    assert "HTTP_X_BASTION_TOKEN" not in environ and "HTTP_X_FORWARDED_FOR" not in environ
    assert "HTTP_CONTENT_TYPE" not in environ
    assert scopes.wsgi_environ(head(version="2"), FACTS)["SERVER_PROTOCOL"] == "HTTP/2.0"


def test_path_info_at_the_root_and_beside_the_base() -> None:
    assert scopes.path_info("/api", "/api") == ""
    assert scopes.path_info("/api/", "/api") == "/"
    assert scopes.path_info("/apix", "/api") == "/apix"
    assert scopes.path_info("/x", "") == "/x"


def test_host_name() -> None:
    assert scopes.host_name("example.com:8443") == "example.com"
    assert scopes.host_name("example.com") == "example.com"
    assert scopes.host_name("[::1]:8443") == "::1"


# -- configuration --------------------------------------------------------------------------
def in_process_config(**app: Any) -> dict[str, Any]:
    return {"listen": [{"address": "127.0.0.1:8080"}],
            "apps": {"api": {"path": "/api", "hosting_model": "in_process",
                             "app": "api.main:app", **app}}}


def test_in_process_defaults() -> None:
    spec = config_from_dict(in_process_config()).app("api")
    assert spec.in_process and spec.command == ()
    assert spec.app == "api.main:app" and spec.interface == "asgi" and spec.threads == 16
    default = config_from_dict({"listen": [{"address": "127.0.0.1:8080"}],
                                "apps": {"a": {"command": ["x"]}}}).app("a")
    assert default.hosting_model == "out_of_process" and not default.in_process


def test_dump_of_an_in_process_app_loads_back(tmp_path: Path) -> None:
    config = config_from_dict(in_process_config(interface="wsgi", threads=4,
                                                environment={"A": "1"}))
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump(effective(config)))
    again = load_config(str(path), files=False)
    assert again.app("api") == config.app("api")
    dumped = effective(config)["apps"]["api"]
    assert "command" not in dumped and "processes_per_app" not in dumped
    assert "start_mode" not in dumped and "idle_timeout" not in dumped


def test_start_mode_and_idle_timeout_are_refused_in_process(tmp_path: Path) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text(
        "listen: [{address: '127.0.0.1:8080'}]\n"
        "pools:\n"
        "  lazy: {idle_timeout: 5m, start_mode: on_demand}\n"  # for its out-of-process apps
        "apps:\n"
        "  api:\n"
        "    path: /api\n"
        "    pool: lazy\n"
        "    hosting_model: in_process\n"
        "    app: api.main:app\n"
        "    start_mode: on_demand\n"
        "    idle_timeout: 10m\n"
        "    health_check: {path: /health}\n"
        "  web: {path: /, pool: lazy, command: [x]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), files=False)
    problems = [str(p) for p in caught.value.problems]
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{path}:10: apps.api.start_mode means nothing for "
                                  "hosting_model: in_process (every worker loads it")
    assert problems[1].startswith(f"{path}:11: apps.api.idle_timeout means nothing for "
                                  "hosting_model: in_process")
    assert "cannot be unloaded" in problems[1]


# -- the module's side ----------------------------------------------------------------------
def _controller(limit: int = 3) -> tuple[HostedController, list[AppState]]:
    published: list[AppState] = []
    spec = AppSpec("api", settings=PoolSettings(rapid_fails_per_minute=limit),
                   hosting_model="in_process", app="api:app")
    return HostedController(spec, published.append), published


def test_controller_publishes_failures_and_backoff() -> None:
    controller, published = _controller(limit=2)
    assert controller.snapshot().state == "ready"
    controller.hosted(HostedReport("api", 1, 100, "loaded"))
    controller.hosted(HostedReport("api", 2, 101, "failed", "ImportError: x", "Traceback"))
    assert published[-1].state == "failed" and published[-1].detail == "Traceback"
    controller.hosted(HostedReport("api", 2, 101, "loaded"))
    assert published[-1].state == "ready" and published[-1].reason == ""
    controller.usage(UsageReport("api", 1, (ProcessUsage(100, 5, 1),)))
    assert controller.culprit(100) is True  # serving a request when it died
    controller.worker_gone(100, -9, True)
    assert published[-1].state == "backoff" and published[-1].retry_at is not None
    assert controller.last_exit == "worker pid 100 killed by signal SIGKILL"
    versions = [s.version for s in published]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


def test_controller_ignores_workers_told_to_stop() -> None:
    controller, published = _controller()
    controller.hosted(HostedReport("api", 1, 100, "loaded"))
    count = len(published)
    controller.worker_gone(100, None, True)
    assert len(published) == count and controller.restarts == 0
    assert controller.status()["processes"] == []


def test_admin_stop_and_start() -> None:
    controller, published = _controller()
    asyncio.run(controller.admin_stop())
    assert published[-1].state == "offline"
    controller.admin_start()
    assert published[-1].state == "ready"


def test_a_worker_loading_the_app_shows_starting_and_is_the_culprit() -> None:
    controller, published = _controller()
    controller.hosted(HostedReport("api", 1, 100, "loading"))
    (row,) = controller.status()["processes"]
    assert row["pid"] == 100 and row["state"] == "starting"
    assert controller.culprit(100) is True  # a worker dying while it loads the app
    assert published == [] and controller.state == "ready"  # not an outcome
    controller.hosted(HostedReport("api", 1, 100, "loaded"))
    assert controller.status()["processes"][0]["state"] == "ready"
    assert controller.culprit(100) is None  # idle


def test_health_report_on_the_wire() -> None:
    report = HealthReport("api", 2, 1234, False, "status 500")
    assert from_wire(report.to_wire()) == report
    assert from_wire(HealthReport("api", 2, 1234, True).to_wire()).healthy


def test_failed_health_checks_in_a_row_replace_that_worker() -> None:
    published: list[AppState] = []
    rolled: list[tuple[str, frozenset[int] | None]] = []
    busy = [True]  # a roll is under way at first: the next failed check tries again

    def roll(reason: str, pids: frozenset[int] | None) -> bool:
        if busy[0]:
            return False
        rolled.append((reason, pids))
        return True

    spec = AppSpec("api", settings=PoolSettings(
        rapid_fails_per_minute=5, health_check=HealthCheck(failures=2)),
        hosting_model="in_process", app="api:app")
    controller = HostedController(spec, published.append, roll)
    controller.hosted(HostedReport("api", 1, 100, "loaded"))
    controller.hosted(HostedReport("api", 2, 101, "loaded"))
    controller.health(HealthReport("api", 1, 100, False, "status 500"))
    controller.health(HealthReport("api", 1, 100, True))  # a pass breaks the row
    controller.health(HealthReport("api", 1, 100, False, "status 500"))
    controller.health(HealthReport("api", 2, 101, False, "no answer within 2s"))
    assert rolled == [] and controller.state == "ready"
    controller.health(HealthReport("api", 1, 100, False, "status 503"))  # 2 in a row
    assert rolled == [] and controller.recycles == 0  # refused: tried again next time
    busy[0] = False
    controller.health(HealthReport("api", 1, 100, False, "status 503"))
    assert rolled == [("app api: worker pid 100 failed 3 health checks in a row "
                       "(last: status 503)", frozenset({100}))]
    assert controller.recycles == 1
    assert controller.state == "failed" and "health checks" in controller.reason
    assert controller.rapid.count(time.monotonic()) == 1  # counted as a failure
    controller.health(HealthReport("api", 1, 100, False, "status 503"))  # counting anew
    assert len(rolled) == 1
    controller.hosted(HostedReport("api", 1, 102, "loaded"))  # the replacement
    assert controller.state == "ready"
    for _ in range(3):  # more failures (5 a minute) rest the app
        controller.rapid.record(time.monotonic())
    controller.hosted(HostedReport("api", 2, 101, "failed", "ImportError: x"))
    assert controller.state == "backoff"
    for _ in range(3):  # while it rests, nothing is replaced
        controller.health(HealthReport("api", 2, 101, False, "status 500"))
    assert len(rolled) == 1


def test_hosted_report_on_the_wire() -> None:
    report = HostedReport("api", 2, 1234, "failed", "why", "traceback")
    assert from_wire(report.to_wire()) == report


def test_recycle_triggers_roll_the_workers_due() -> None:
    rolled: list[tuple[str, frozenset[int] | None]] = []

    def roll(reason: str, pids: frozenset[int] | None) -> bool:
        rolled.append((reason, pids))
        return True

    spec = AppSpec("api", settings=PoolSettings(recycle=RecycleSettings(max_requests=5)),
                   hosting_model="in_process", app="api:app")
    controller = HostedController(spec, lambda state: None, roll)
    controller.hosted(HostedReport("api", 1, 100, "loaded"))
    controller.hosted(HostedReport("api", 2, 101, "loaded"))
    controller.usage(UsageReport("api", 1, (ProcessUsage(100, 5, 0),)))
    controller.usage(UsageReport("api", 2, (ProcessUsage(101, 4, 0),)))
    controller.tick(0.0)
    assert rolled == [("app api: recycle limit reached", frozenset({100}))]
    assert controller.recycles == 1
    assert controller.recycle("requested") and rolled[-1][1] is None
