"""Liveness (module/health.py), its configuration and its messages, without app processes.

The pure parts (status line, verdict, the per-process rows) are tested with values; the
probe against small asyncio servers on loopback that answer, fail, hang or are absent.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.module.health import (
    TIMEOUTS_IN_A_ROW,
    Liveness,
    check_request,
    parse_status_line,
    probe,
    verdict,
)
from bastion.module.messages import Endpoint, RequestTimedOut, from_wire
from bastion.module.spec import HealthCheck, PoolSettings
from bastion.proxy.config.load import ConfigError, config_from_dict, load_config
from bastion.proxy.edge.endpoints import EndpointTable, Lease

# -- pure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "status"), [
    (b"HTTP/1.1 200 OK\r\n", 200),
    (b"HTTP/1.0 503 Service Unavailable\r\n", 503),
    (b"HTTP/1.1 204\r\n", 204),
    (b"HTTP/1.1 404 Not Found\n", 404),
    (b"HTTP/2 200\r\n", None),
    (b"HTTP/1.1 20 OK\r\n", None),
    (b"garbage\r\n", None),
    (b"", None),
    (b"HTTP/1.1 200 OK", None),  # cut off
])
def test_status_line(line: bytes, status: int | None) -> None:
    assert parse_status_line(line) == status


def test_verdict_fails_5xx_and_malformed_only() -> None:
    assert verdict(200) is None and verdict(302) is None and verdict(404) is None
    assert verdict(499) is None
    assert verdict(500) == "status 500" and verdict(503) == "status 503"
    assert verdict(None) == "malformed answer"


def test_check_request_carries_the_token_and_closes() -> None:
    raw = check_request("/shop/health", "tok", "127.0.0.1:4000")
    assert raw.startswith(b"GET /shop/health HTTP/1.1\r\nHost: 127.0.0.1:4000\r\n")
    assert b"\r\nX-Bastion-Token: tok\r\n" in raw and b"\r\nConnection: close\r\n" in raw
    assert raw.endswith(b"\r\n\r\n")


def test_failed_checks_in_a_row_and_a_pass_breaks_the_row() -> None:
    record = Liveness()
    assert not record.check_failed(3) and not record.check_failed(3)
    record.check_passed()
    assert not record.check_failed(3) and not record.check_failed(3)
    assert record.check_failed(3)
    record.replaced()
    assert record.failed_checks == 0


def test_check_due_once_at_a_time() -> None:
    record = Liveness(next_check=10.0)
    assert not record.check_due(9.9) and record.check_due(10.0)
    record.checking = True
    assert not record.check_due(11.0)


def test_timeouts_in_a_row() -> None:
    record = Liveness(completed_mark=5)
    for _ in range(TIMEOUTS_IN_A_ROW - 1):
        assert not record.timed_out()
    # The usage report that includes the timed-out requests does not break the row ...
    record.completed(5 + TIMEOUTS_IN_A_ROW - 1)
    assert record.timeouts == TIMEOUTS_IN_A_ROW - 1
    # ... one more completion than timeouts (an answer) does.
    record.completed(5 + TIMEOUTS_IN_A_ROW)
    assert record.timeouts == 0
    for _ in range(TIMEOUTS_IN_A_ROW - 1):
        assert not record.timed_out()
    assert record.timed_out()


def test_a_passed_health_check_breaks_the_timeout_row() -> None:
    record = Liveness()
    record.timed_out()
    record.timed_out()
    record.check_passed()
    assert record.timeouts == 0


def test_a_restarted_worker_lowers_the_count_without_breaking_the_row() -> None:
    record = Liveness(completed_mark=100)
    record.timed_out()
    record.completed(1)  # a new worker counts from 0
    assert record.timeouts == 1 and record.completed_mark == 1


# -- the probe, against real loopback servers --------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serving(handler: Handler, check: Callable[[int], Awaitable[Any]]) -> Any:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await check(port)
    finally:
        server.close()


def answering(head: bytes, seen: list[bytes] | None = None) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(request)
        writer.write(head)
        await writer.drain()
        writer.close()

    return handler


def test_probe_healthy_answer_sends_path_and_token() -> None:
    seen: list[bytes] = []

    async def main() -> str | None:
        return await serving(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", seen),
                             lambda port: probe(port, None, "/health", "secret", 1.0))

    assert asyncio.run(main()) is None
    assert seen and seen[0].startswith(b"GET /health HTTP/1.1\r\n")
    assert b"X-Bastion-Token: secret\r\n" in seen[0]


def test_probe_5xx_fails() -> None:
    async def main() -> str | None:
        return await serving(answering(b"HTTP/1.1 503 Busy\r\n\r\n"),
                             lambda port: probe(port, None, "/health", "t", 1.0))

    assert asyncio.run(main()) == "status 503"


def test_probe_silence_times_out() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def main() -> tuple[str | None, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        why = await serving(hang, lambda port: probe(port, None, "/health", "t", 0.3))
        return why, loop.time() - start

    why, took = asyncio.run(main())
    assert why == "no answer within 0.3s" and took < 1.5


def test_probe_refused_fails() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        why = asyncio.run(probe(port, None, "/health", "t", 1.0))
    assert why is not None and why.startswith("connection failed")


# -- configuration --------------------------------------------------------------------------


def config(**app: Any) -> Any:
    return config_from_dict({
        "listen": [{"address": "127.0.0.1:8080"}],
        "pools": {"checked": {"health_check": {"path": "/ping", "interval": "5s"}}},
        "apps": {"plain": {"command": ["x"], **app},
                 "pooled": {"command": ["y"], "path": "/p", "pool": "checked"},
                 "own": {"command": ["z"], "path": "/o", "pool": "checked",
                         "health_check": {"failures": 5}},
                 "off": {"command": ["w"], "path": "/f", "pool": "checked",
                         "health_check": None}},
    })


def test_health_check_is_off_by_default_and_inherited_key_by_key() -> None:
    cfg = config()
    assert PoolSettings().health_check is None
    assert cfg.app("plain").settings.health_check is None
    assert cfg.app("pooled").settings.health_check == HealthCheck(path="/ping", interval=5.0)
    assert cfg.app("own").settings.health_check == HealthCheck(path="/ping", interval=5.0,
                                                               failures=5)
    assert cfg.app("off").settings.health_check is None
    full = config(health_check={"path": "/h?x=1", "interval": "10s", "timeout": "2s",
                                "failures": 3}).app("plain").settings.health_check
    assert full == HealthCheck("/h?x=1", 10.0, 2.0, 3)
    assert config(health_check={}).app("plain").settings.health_check == HealthCheck()


@pytest.mark.parametrize(("entry", "message"), [
    ("path: health", 'apps.a.health_check.path must start with "/"'),
    ('path: "/a b"', "apps.a.health_check.path must be a path without spaces"),
    ("interval: 0s", "apps.a.health_check.interval must be more than 0"),
    ("timeout: soon", "apps.a.health_check.timeout: invalid duration 'soon'"),
    ("failures: 0", "apps.a.health_check.failures must be a positive integer"),
    ("fails: 3", "unknown key 'fails' in apps.a.health_check; did you mean 'failures'?"),
])
def test_bad_health_check_values_are_file_line_problems(tmp_path: Path, entry: str,
                                                         message: str) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text(BAD_CONFIG.format(entry=entry))
    problems = problems_of(path)
    assert problems == [f"{path}:7: {message}" + problems[0].split(message, 1)[1]], problems


def test_a_health_check_that_is_no_mapping_is_a_file_line_problem(tmp_path: Path) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text(BAD_CONFIG.format(entry="path: /ok").replace(
        "    health_check:\n      path: /ok", "    health_check: /health"))
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(
        f"{path}:6: apps.a.health_check must be a mapping"), problems


BAD_CONFIG = """listen:
  - address: "127.0.0.1:8080"
apps:
  a:
    command: [x]
    health_check:
      {entry}
"""


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return [str(p) for p in caught.value.problems]


# -- the message and the proxy's side ----------------------------------------------------------


def test_request_timed_out_crosses_the_wire() -> None:
    message = RequestTimedOut("shop", 42)
    assert message.to_wire() == {"kind": "timeout", "app": "shop", "pid": 42}
    assert from_wire(message.to_wire()) == message


def test_lease_timed_out_tells_the_module() -> None:
    sent: list[object] = []
    lease = Lease(EndpointTable(sent.append), "shop", Endpoint(7, 3000, "t"))
    lease.timed_out()
    assert sent == [RequestTimedOut("shop", 7)]


def test_a_reload_that_changes_only_health_check_keeps_the_processes() -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from bastion.module.controller import AppController
    from bastion.module.keeper import Keeper
    from bastion.module.spec import AppSpec

    async def main() -> None:
        spec = AppSpec(name="shop", command=("x",))
        app = AppController(spec, Keeper(), lambda state: None)
        running = SimpleNamespace(pid=1, port=3000, token="t", socket_path=None)
        app.processes = [running]  # type: ignore[list-item]  # one "running" process
        app.phase = "ready"
        checked = replace(spec, settings=replace(spec.settings, health_check=HealthCheck()))
        app.update_spec(checked)
        assert app.spec == checked and app.recycles == 0 and app.phase == "ready"
        app.update_spec(replace(checked, command=("y",)))  # anything else: recycled
        assert app.recycles == 1 and app.phase == "recycling"
        for task in list(app._tasks):
            task.cancel()

    asyncio.run(main())
