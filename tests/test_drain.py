"""The node's health endpoint and drain: ``bastion drain`` / ``undrain``, reloads, a
killed worker, ``health.require_apps`` and SIGTERM's ``health.drain_delay``.

One Bastion with two worker processes (the drain crosses the control channel) serves
most tests: a plain and a TLS listener (HTTP/2 by ALPN) and one with
``redirect_https``, one uvicorn app that
``health.require_apps`` names. Each health probe is made several times on fresh
connections, so every worker answers some of them.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import ca_pem_path, tls_config
from harness import BastionProcess, app_command, free_port, wait_until
from test_admin import bastion_cli, metrics, sample
from test_workers import worker_pids

HEALTH = "/.well-known/bastion/health"
PROBES = 8  # fresh connections per check: with two workers, both answer


def config_for(tmp: Path, ca: trustme.CA, **health: Any) -> dict[str, Any]:
    return {
        "listen": [{"address": f"127.0.0.1:{free_port()}"},
                   {"address": f"127.0.0.1:{free_port()}", "tls": tls_config(ca, tmp / "tls")},
                   {"address": f"127.0.0.1:{free_port()}", "redirect_https": True}],
        "workers": 2,
        "health": {"require_apps": ["echo"], **health},
        "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app"),
                          "start_mode": "always"}},
    }


@pytest.fixture(scope="module")
def bastion(tmp_path_factory: pytest.TempPathFactory,
            tls_ca: trustme.CA) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("drain")
    with BastionProcess(tmp, config_for(tmp, tls_ca), tls_ca=tls_ca) as running:
        assert wait_until(lambda: health_of(running) == {(200, b"serving\n")}, timeout=20), \
            running.log()
        yield running


def health_of(bastion: BastionProcess, listener: int = 0,
              probes: int = PROBES) -> set[tuple[int, bytes]]:
    """The distinct (status, body) answers of ``probes`` fresh health requests."""
    seen = set()
    for _ in range(probes):
        response = bastion.get(HEALTH, listener=listener, timeout=10)
        assert response.headers["cache-control"] == "no-store"
        seen.add((response.status, response.body))
    return seen


def cli(bastion: BastionProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return bastion_cli(*args, "--socket", bastion.config["admin_socket"])


@pytest.fixture
def drained(bastion: BastionProcess) -> Iterator[BastionProcess]:
    """The node drained with ``bastion drain``; served again afterwards."""
    done = cli(bastion, "drain")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "draining: health answers 503"
    try:
        yield bastion
    finally:
        assert cli(bastion, "undrain").returncode == 0
        assert wait_until(lambda: health_of(bastion, probes=4) == {(200, b"serving\n")})


def keep_alive_pair(bastion: BastionProcess) -> tuple[http.client.HTTPResponse, bool]:
    """Two requests on one connection: the first answer, and whether the connection was
    still usable for the second."""
    conn = http.client.HTTPConnection("127.0.0.1", bastion.port(0), timeout=10)
    try:
        conn.request("GET", "/info")
        first = conn.getresponse()
        first.read()
        reused = not first.will_close
        return first, reused
    finally:
        conn.close()


@pytest.mark.parametrize("listener", [0, 1], ids=["http", "https"])
def test_health_is_200_while_serving_and_reaches_no_app(bastion: BastionProcess,
                                                        listener: int) -> None:
    before = bastion.get("/count").json()["count"]
    assert health_of(bastion, listener) == {(200, b"serving\n")}
    head = bastion.request("HEAD", HEALTH, listener=listener)
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(b"serving\n"))
    assert bastion.get("/count").json()["count"] == before + 1  # only /count itself


def test_health_is_answered_on_a_redirect_https_listener_too(
        bastion: BastionProcess) -> None:
    assert health_of(bastion, listener=2, probes=2) == {(200, b"serving\n")}
    assert bastion.get("/info", listener=2).status == 308


def test_drain_makes_health_503_and_closes_kept_alive_connections(
        drained: BastionProcess) -> None:
    assert wait_until(lambda: health_of(drained) == {(503, b"draining\n")})
    assert health_of(drained, listener=1) == {(503, b"draining\n")}
    first, reused = keep_alive_pair(drained)
    assert first.status == 200  # still served
    assert first.getheader("Connection") == "close" and not reused
    samples = metrics(drained)
    assert sample(samples, "bastion_draining") == 1
    status = cli(drained, "status")
    assert "DRAINING" in status.stdout
    assert drained.status()["draining"] is True


def test_undrain_serves_again_with_kept_alive_connections(bastion: BastionProcess) -> None:
    assert cli(bastion, "drain").returncode == 0
    done = cli(bastion, "undrain")
    assert done.returncode == 0 and done.stdout.strip() == "serving: health answers 200"
    assert wait_until(lambda: health_of(bastion) == {(200, b"serving\n")})
    first, reused = keep_alive_pair(bastion)
    assert first.status == 200 and reused
    assert sample(metrics(bastion), "bastion_draining") == 0
    assert bastion.status()["draining"] is False


def h2_pair(bastion: BastionProcess, tmp_path: Path) -> list[str]:
    """Two HTTP/2 requests by one curl: "status version connections-opened" of each."""
    ca = ca_pem_path(bastion.tls_ca, tmp_path)
    url = f"https://localhost:{bastion.port(1)}/info"
    done = subprocess.run(["curl", "-sS", "--http2", "--cacert", str(ca), "-o", "/dev/null",
                           "-o", "/dev/null", "-w", "%{http_code} %{http_version} "
                           "%{num_connects}\n", url, url],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:2]


def test_http2_clients_get_goaway_while_draining(bastion: BastionProcess,
                                                 tmp_path: Path) -> None:
    assert h2_pair(bastion, tmp_path) == ["200 2 1", "200 2 0"]  # one connection
    assert cli(bastion, "drain").returncode == 0
    try:
        # Both served; the second needed a connection of its own (GOAWAY after the first).
        assert h2_pair(bastion, tmp_path) == ["200 2 1", "200 2 1"]
    finally:
        assert cli(bastion, "undrain").returncode == 0


def test_drain_survives_a_reload(drained: BastionProcess) -> None:
    generation = drained.status()["generation"]
    config = yaml.safe_load(drained.path.read_text())
    config["limits"] = {"keepalive_timeout": 60 + generation}  # a change: new workers
    drained.path.write_text(yaml.safe_dump(config))
    status, answer = drained.admin_post("/reload")
    assert status == 200, answer
    assert drained.status()["generation"] == generation + 1
    assert health_of(drained) == {(503, b"draining\n")}


def test_drain_survives_a_killed_worker(drained: BastionProcess) -> None:
    before = worker_pids(drained)
    os.kill(before[0], signal.SIGKILL)
    assert wait_until(lambda: len(set(worker_pids(drained)) - set(before)) == 1
                      and len(worker_pids(drained)) == 2, timeout=20), drained.log()[-3000:]
    time.sleep(0.5)  # the replacement is ready: it answers with the others
    assert health_of(drained, probes=12) == {(503, b"draining\n")}


def test_health_is_503_while_a_required_app_is_not_ready(bastion: BastionProcess) -> None:
    assert cli(bastion, "stop", "echo").returncode == 0
    try:
        assert wait_until(lambda: health_of(bastion, probes=4) == {(503, b"not ready: echo\n")})
    finally:
        assert cli(bastion, "start", "echo").returncode == 0
    assert wait_until(lambda: health_of(bastion, probes=4) == {(200, b"serving\n")}, timeout=20)


def test_sigterm_drains_for_drain_delay_before_it_stops(tmp_path: Path,
                                                        tls_ca: trustme.CA) -> None:
    delay = 1.5
    config = config_for(tmp_path, tls_ca, drain_delay=f"{delay}s")
    config["workers"] = 1
    running = BastionProcess(tmp_path, config, tls_ca=tls_ca).start()
    try:
        assert wait_until(lambda: health_of(running, probes=2) == {(200, b"serving\n")},
                          timeout=20)
        signalled = time.monotonic()
        os.kill(running.pid, signal.SIGTERM)
        assert wait_until(lambda: health_of(running, probes=1) == {(503, b"draining\n")},
                          timeout=delay)
        # New connections are still accepted and served during the delay.
        served = 0
        while time.monotonic() - signalled < delay - 0.4:
            assert running.get("/info").status == 200
            served += 1
        assert served > 0
        assert running.proc is not None
        assert running.proc.wait(30) == 0
        assert time.monotonic() - signalled >= delay
        assert "draining for 1.5s first" in running.log()
    finally:
        running.stop()
