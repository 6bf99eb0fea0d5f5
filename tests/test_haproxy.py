"""Two Bastion nodes behind a real HAProxy (layer 4, ``send-proxy-v2``, HTTP health
checks on Bastion's health path), all on loopback.

Node A listens on 127.0.0.11 (its proxy in the main process), node B on 127.0.0.12
(two worker processes), plain and TLS, both with ``proxy_protocol``; HAProxy connects to them from 127.0.0.1, the only trusted proxy,
and the load generator sends from 127.0.0.55. The TLS backend tracks the plain
backend's checks. Skipped without the ``haproxy`` program (``./run test`` installs the
Debian package when root).

The rolling restart is the procedure of docs/scaling.md: for each node in turn,
``bastion drain``, wait until HAProxy marks it DOWN and its connections are gone, stop it
(SIGTERM), start it again, wait until HAProxy marks it UP. Meanwhile clients send
requests without pause, on new connections and on kept-alive ones, over HTTP and TLS:
none may fail. ``BASTION_ROLLING_ROUNDS=N`` repeats the restart of both nodes N times and
prints the figures (docs/scaling.md has them).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import tls_config
from harness import REPO, BastionProcess, app_command, free_port, wait_port, wait_until
from test_admin import metrics, sample

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (apt-get install haproxy)")

HEALTH = "/.well-known/bastion/health"
LOADGEN = "127.0.0.55"
NODES = {"a": "127.0.0.11", "b": "127.0.0.12"}
INTER_MS = 200  # HAProxy check interval; fall 2, rise 2

HAPROXY_CFG = """\
global
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
frontend fe_http
    bind 127.0.0.1:{http_port}
    default_backend be_http
frontend fe_https
    bind 127.0.0.1:{https_port}
    default_backend be_https
backend be_http
    balance roundrobin
    option httpchk
    http-check send meth GET uri {health} ver HTTP/1.1 hdr Host bastion
    http-check expect status 200
    default-server send-proxy-v2 check inter {inter}ms fall 2 rise 2
{http_servers}
backend be_https
    balance roundrobin
{https_servers}
"""


@dataclass
class Node:
    """One Bastion node: its address, ports and the running process."""

    name: str
    address: str
    http_port: int
    https_port: int
    base: Path
    tls: dict[str, Any]
    ca: trustme.CA
    starts: int = 0
    process: BastionProcess | None = None

    def config(self) -> dict[str, Any]:
        return {
            "listen": [
                {"address": f"{self.address}:{self.http_port}", "proxy_protocol": True},
                {"address": f"{self.address}:{self.https_port}", "proxy_protocol": True,
                 "tls": self.tls},
            ],
            "trusted_proxies": ["127.0.0.1/32"],
            # Node a serves from its main process, node b from two worker processes.
            "workers": 1 if self.name == "a" else 2,
            "health": {"require_apps": ["echo"], "drain_delay": "0.2s"},
            "limits": {"header_timeout": "5s"},
            "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app"),
                              "start_mode": "always"}},
        }

    def start(self) -> None:
        self.starts += 1
        directory = self.base / f"{self.name}-{self.starts}"
        directory.mkdir(parents=True)
        self.process = BastionProcess(directory, self.config(), tls_ca=self.ca).start()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.stop(sig)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.process is not None
        return subprocess.run([sys.executable, "-m", "bastion", *args, "--socket",
                               self.process.config["admin_socket"]], cwd=str(REPO),
                              capture_output=True, text=True, timeout=30)


class HAProxy:
    """A real HAProxy in front of the nodes, with its admin (stats) socket."""

    def __init__(self, base: Path, nodes: dict[str, Node]) -> None:
        self.http_port = free_port()
        self.https_port = free_port()
        self.stats = base / "haproxy.sock"
        self.cfg = base / "haproxy.cfg"
        self.log = base / "haproxy.log"
        self.cfg.write_text(HAPROXY_CFG.format(
            stats=self.stats, http_port=self.http_port, https_port=self.https_port,
            health=HEALTH, inter=INTER_MS,
            http_servers="\n".join(
                f"    server {n.name} {n.address}:{n.http_port} source 127.0.0.1"
                for n in nodes.values()),
            https_servers="\n".join(
                f"    server {n.name} {n.address}:{n.https_port} source 127.0.0.1 "
                f"send-proxy-v2 track be_http/{n.name}" for n in nodes.values()),
        ))
        check = subprocess.run(["haproxy", "-c", "-f", str(self.cfg)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self._out = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.cfg)],
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.http_port)
        wait_port(self.https_port)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    def status(self, backend: str, server: str) -> str:
        """HAProxy's view of one server: "UP", "DOWN", "UP 1/2", "NOLB", ..."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") == server:
                return row["status"]
        raise KeyError(server)

    def up(self, server: str) -> bool:
        return self.status("be_http", server) == "UP"

    def down(self, server: str) -> bool:
        return self.status("be_http", server) == "DOWN"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@dataclass
class Load:
    """Clients sending requests without pause through HAProxy, from ``LOADGEN``: on new
    connections and on kept-alive ones, over HTTP and TLS."""

    balancer: HAProxy
    ca: trustme.CA
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)
    clients: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        kinds = [(False, False), (False, False), (False, True), (False, True),
                 (True, False), (True, True)]  # (tls, keep-alive)
        for tls, keep in kinds:
            thread = threading.Thread(target=self._run, args=(tls, keep), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _connection(self, tls: bool) -> http.client.HTTPConnection:
        if tls:
            context = ssl.create_default_context()
            self.ca.configure_trust(context)
            return http.client.HTTPSConnection("localhost", self.balancer.https_port,
                                               timeout=10, context=context,
                                               source_address=(LOADGEN, 0))
        return http.client.HTTPConnection("127.0.0.1", self.balancer.http_port, timeout=10,
                                          source_address=(LOADGEN, 0))

    def _run(self, tls: bool, keep: bool) -> None:
        conn = self._connection(tls)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/info")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}: {body[:200]!r}")
                client = body.split(b'"client": "', 1)[1].split(b'"', 1)[0].decode()
                with self._lock:
                    self.ok += 1
                    self.clients.add(client)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                with self._lock:
                    self.failures.append(f"{'tls' if tls else 'http'} "
                                         f"{'keep' if keep else 'new'}: {exc!r}")
                    self.failed_at.append(time.monotonic())
                conn.close()
                conn = self._connection(tls)
                continue
            if not keep:
                conn.close()
                conn = self._connection(tls)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            tls_ca: trustme.CA) -> Iterator[tuple[HAProxy, dict[str, Node]]]:
    base = tmp_path_factory.mktemp("haproxy")
    tls = tls_config(tls_ca, base / "tls", "localhost", *NODES.values())
    nodes = {name: Node(name, address, free_port(), free_port(), base, tls, tls_ca)
             for name, address in NODES.items()}
    balancer: HAProxy | None = None
    try:
        for node in nodes.values():
            node.start()
        balancer = HAProxy(base, nodes)
        assert wait_until(lambda: all(balancer.up(n) for n in nodes), timeout=20), \
            balancer.log.read_text()
        yield balancer, nodes
    finally:
        if balancer is not None:
            balancer.stop()
        for node in nodes.values():
            node.stop()


def open_connections(node: Node) -> float:
    assert node.process is not None
    return sample(metrics(node.process), "bastion_open_connections")


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_the_app_sees_the_load_generators_address(cluster: tuple[HAProxy, dict[str, Node]],
                                                  tls_ca: trustme.CA, tls: bool) -> None:
    balancer, _ = cluster
    load = Load(balancer, tls_ca)
    seen = set()
    for _ in range(4):  # round robin: both nodes answer
        conn = load._connection(tls)
        conn.request("GET", "/info", headers={"X-Forwarded-For": "6.6.6.6"})
        response = conn.getresponse()
        got = json.loads(response.read())
        conn.close()
        assert response.status == 200
        assert got["client"] == LOADGEN
        assert [v for k, v in got["headers"] if k == "x-forwarded-for"] == [LOADGEN]
        assert got["scheme"] == ("https" if tls else "http")
        seen.add(got["port"])
    assert len(seen) == 2  # one app per node


@dataclass
class Step:
    """The times of one node's rolling step, in seconds."""

    down: float  # from ``bastion drain`` to HAProxy's DOWN
    stopped: float  # from DOWN to the old process gone (connections, SIGTERM, stop)
    up: float  # from the new start to HAProxy's UP

    @property
    def out(self) -> float:
        """How long the node was out of the balancer."""
        return self.down + self.stopped + self.up


def restart_node(balancer: HAProxy, node: Node) -> Step:
    """The rolling step for ``node`` (docs/scaling.md)."""
    began = time.monotonic()
    done = node.cli("drain")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: balancer.down(node.name), timeout=10, interval=0.02)
    down = time.monotonic()
    assert wait_until(lambda: open_connections(node) == 0, timeout=10, interval=0.05)
    node.stop()  # SIGTERM: drain_delay, then the graceful stop
    stopped = time.monotonic()
    node.start()
    assert wait_until(lambda: balancer.up(node.name), timeout=20, interval=0.02), \
        balancer.status("be_http", node.name)
    return Step(down - began, stopped - down, time.monotonic() - stopped)


def test_a_rolling_restart_under_load_loses_no_request(
        cluster: tuple[HAProxy, dict[str, Node]], tls_ca: trustme.CA) -> None:
    balancer, nodes = cluster
    rounds = int(os.environ.get("BASTION_ROLLING_ROUNDS", "1"))
    for number in range(rounds):
        load = Load(balancer, tls_ca).start()
        started = time.monotonic()
        try:
            time.sleep(0.5)
            out = [restart_node(balancer, node) for node in nodes.values()]
            time.sleep(0.5)
        finally:
            load.stop()
        took = time.monotonic() - started
        print(f"round {number + 1}: {load.ok} requests in {took:.1f}s, "
              f"{len(load.failures)} failed; out of the balancer: "
              + ", ".join(f"{name} {step.out:.2f}s (drain to DOWN {step.down:.2f}s, "
                          f"stop {step.stopped:.2f}s, start to UP {step.up:.2f}s)"
                          for name, step in zip(nodes, out, strict=True)))
        assert load.failures == []
        assert load.ok > 50
        assert load.clients == {LOADGEN}


def test_a_killed_node_is_taken_out_and_the_other_serves(
        cluster: tuple[HAProxy, dict[str, Node]], tls_ca: trustme.CA) -> None:
    balancer, nodes = cluster
    victim = nodes["a"]
    load = Load(balancer, tls_ca).start()
    try:
        time.sleep(0.5)
        before = load.ok
        killed = time.monotonic()
        victim.stop(signal.SIGKILL)
        assert wait_until(lambda: balancer.down("a"), timeout=10, interval=0.02)
        detected = time.monotonic() - killed
        time.sleep(1.0)
        after_down = [t for t in load.failed_at if t > killed + detected + 0.1]
        served_since = load.ok - before
    finally:
        load.stop()
    print(f"SIGKILL: DOWN after {detected:.2f}s; {len(load.failures)} failed "
          f"(of {len(load._threads)} clients); {served_since} served meanwhile; "
          f"failures: {load.failures}")
    assert detected < 2.0
    # Only what was in flight on the dead node (at most one per client) failed.
    assert len(load.failures) <= len(load._threads), load.failures
    assert after_down == []
    assert served_since > 20
    victim.start()  # back for whatever runs next
    assert wait_until(lambda: balancer.up("a"), timeout=20)


def test_the_example_configuration_is_valid_haproxy() -> None:
    example = REPO / "deploy" / "haproxy.cfg"
    done = subprocess.run(["haproxy", "-c", "-f", str(example)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    text = example.read_text()
    assert "send-proxy-v2" in text and "option httpchk" in text
    assert f"uri {HEALTH} ver HTTP/1.1 hdr Host" in text
