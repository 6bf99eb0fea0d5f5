"""PROXY protocol listeners end to end: a real Bastion, a real uvicorn app, real TLS.

One Bastion (module-scoped) listens four times:

| listener | proxy_protocol | tls |
|----------|----------------|-----|
| 0        | yes            | no  |
| 1        | yes            | yes |
| 2        | no             | no  |
| 3        | yes            | yes (HTTP/2 by ALPN) |

``trusted_proxies`` is 127.0.0.3 only: the "balancer" sends from there, an untrusted
peer from 127.0.0.4. The clients named in the headers are documentation addresses
(203.0.113.0/24, 2001:db8::/32), so what the app sees can only have come from the header.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import ca_pem_path, tls_config
from harness import APPS, BastionProcess, app_command, free_port, wait_until
from test_admin import metrics
from test_proxyproto import MALFORMED

from bastion.proxy.edge.proxyproto import V2_SIGNATURE

BALANCER = "127.0.0.3"
STRANGER = "127.0.0.4"
HEADER_TIMEOUT = 1.0


def v1(client: str, port: int, dst_port: int) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    dst = "::1" if ":" in client else "127.0.0.1"
    return f"PROXY {family} {client} {dst} {port} {dst_port}\r\n".encode()


def v2(client: str, port: int, dst_port: int) -> bytes:
    if ":" in client:
        addresses = socket.inet_pton(socket.AF_INET6, client) + socket.inet_pton(
            socket.AF_INET6, "::1")
        family = 0x21
    else:
        addresses = socket.inet_aton(client) + socket.inet_aton("127.0.0.1")
        family = 0x11
    body = addresses + struct.pack(">HH", port, dst_port) + b"\x04\x00\x03abc"  # a NOOP TLV
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack(">H", len(body)) + body


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


@pytest.fixture(scope="module")
def bastion(tmp_path_factory: pytest.TempPathFactory,
            tls_ca: trustme.CA) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("proxyproto")
    tls = tls_config(tls_ca, tmp / "tls")
    config: dict[str, Any] = {
        "listen": [
            {"address": f"127.0.0.1:{free_port()}", "proxy_protocol": True},
            {"address": f"127.0.0.1:{free_port()}", "proxy_protocol": True, "tls": tls,
             "http2": False},
            {"address": f"127.0.0.1:{free_port()}"},
            {"address": f"127.0.0.1:{free_port()}", "proxy_protocol": True, "tls": tls},
        ],
        "trusted_proxies": [f"{BALANCER}/32"],
        "access_log": str(tmp / "access.log"),
        "access_log_format": "json",
        "limits": {"header_timeout": f"{HEADER_TIMEOUT}s"},
        "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app"),
                          "start_mode": "always"}},
    }
    with BastionProcess(tmp, config, tls_ca=tls_ca) as running:
        yield running


def connect(bastion: BastionProcess, listener: int, source: str = BALANCER) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", bastion.port(listener)), timeout=10,
                                    source_address=(source, 0))
    return sock


def read_all(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def exchange(bastion: BastionProcess, listener: int, header: bytes, path: str = "/info",
             tls: bool = False, extra: str = "") -> tuple[int, dict[str, Any]]:
    """Send ``header``, then one request (over TLS when asked); (status, JSON body)."""
    sock = connect(bastion, listener)
    sock.sendall(header)
    stream: socket.socket | ssl.SSLSocket = sock
    if tls:
        context = ssl.create_default_context()
        bastion.tls_ca.configure_trust(context)
        stream = context.wrap_socket(sock, server_hostname="localhost")
    stream.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close"
                   "\r\n\r\n".encode())
    data = read_all(stream)
    stream.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith(b"{") else {}


def forwarded_for(got: dict[str, Any]) -> list[str]:
    return [v for k, v in got["headers"] if k == "x-forwarded-for"]


def app_count(bastion: BastionProcess) -> int:
    return int(bastion.get("/count", listener=2).json()["count"])


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize(("make", "client"), [
    (v1, "203.0.113.9"), (v2, "203.0.113.10"), (v1, "2001:db8::7"), (v2, "2001:db8::8"),
], ids=["v1-ipv4", "v2-ipv4", "v1-ipv6", "v2-ipv6"])
def test_the_header_gives_the_client_address_everywhere(bastion: BastionProcess, make: Any,
                                                        client: str, tls: bool) -> None:
    listener = 1 if tls else 0
    status, got = exchange(bastion, listener, make(client, 40000, bastion.port(listener)),
                           tls=tls, extra="X-Forwarded-For: 6.6.6.6\r\n")
    assert status == 200
    assert got["client"] == client
    assert got["scheme"] == ("https" if tls else "http")
    # The client behind the balancer is not a trusted proxy: its own X-Forwarded-For
    # is dropped, as for a direct client.
    assert forwarded_for(got) == [client]
    log = Path(bastion.config["access_log"])
    assert wait_until(lambda: any(json.loads(line)["client"] == client
                                  for line in log.read_text().splitlines()), timeout=5), \
        log.read_text()[-2000:]


def test_http2_over_tls_after_a_v1_header_from_curl(bastion: BastionProcess,
                                                    tmp_path: Path) -> None:
    ca = ca_pem_path(bastion.tls_ca, tmp_path)
    done = subprocess.run(
        ["curl", "-sS", "--http2", "--haproxy-protocol", "--interface", BALANCER,
         "--cacert", str(ca), "-w", "\\n%{http_version}",
         f"https://localhost:{bastion.port(3)}/info"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    body, _, version = done.stdout.rpartition("\n")
    assert version == "2"
    got = json.loads(body)
    assert got["client"] == BALANCER  # curl's v1 header names its own address
    assert forwarded_for(got) == [BALANCER]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_v2_local_is_served_as_a_direct_connection(bastion: BastionProcess,
                                                   tls: bool) -> None:
    status, got = exchange(bastion, 1 if tls else 0, V2_LOCAL, tls=tls)
    assert status == 200
    assert got["client"] == BALANCER


def test_v1_unknown_is_served_as_a_direct_connection(bastion: BastionProcess) -> None:
    status, got = exchange(bastion, 0, b"PROXY UNKNOWN\r\n")
    assert status == 200
    assert got["client"] == BALANCER


def refused(bastion: BastionProcess) -> dict[str, float]:
    samples = metrics(bastion)
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "bastion_proxy_protocol_refused_total"}


def test_a_header_from_an_untrusted_peer_is_refused(bastion: BastionProcess) -> None:
    before = app_count(bastion)
    counted = refused(bastion).get("untrusted", 0)
    sock = connect(bastion, 0, source=STRANGER)
    try:
        sock.sendall(v1("203.0.113.66", 1, 2) + b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    except OSError:
        pass  # closed before we could write
    assert read_all(sock) == b""
    sock.close()
    assert refused(bastion).get("untrusted", 0) == counted + 1
    assert app_count(bastion) == before + 1  # only the /count request itself
    assert "not in trusted_proxies" in bastion.log()


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_header_closes_the_connection_without_reaching_an_app(
        bastion: BastionProcess, raw: bytes) -> None:
    before = app_count(bastion)
    counted = refused(bastion)
    sock = connect(bastion, 0)
    # What follows the bad header must never be read as a request either.
    try:
        sock.sendall(raw + b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    except OSError:
        pass
    started = time.monotonic()
    assert read_all(sock) == b""
    sock.close()
    assert time.monotonic() - started < HEADER_TIMEOUT + 2
    assert app_count(bastion) == before + 1
    now = refused(bastion)
    grown = {reason: n - counted.get(reason, 0) for reason, n in now.items()
             if n != counted.get(reason, 0)}
    assert len(grown) == 1 and next(iter(grown.values())) == 1, grown
    assert set(grown) <= {"missing", "malformed", "too_long"}


@pytest.mark.parametrize("raw", [v1("203.0.113.9", 1, 2)[:20], v2("203.0.113.9", 1, 2)[:20],
                                 V2_SIGNATURE[:5]], ids=["v1", "v2", "v2-signature"])
def test_a_truncated_header_is_closed_after_header_timeout(bastion: BastionProcess,
                                                           raw: bytes) -> None:
    counted = refused(bastion).get("timeout", 0)
    sock = connect(bastion, 1)
    sock.sendall(raw)
    started = time.monotonic()
    assert read_all(sock) == b""
    waited = time.monotonic() - started
    sock.close()
    assert HEADER_TIMEOUT - 0.2 <= waited < HEADER_TIMEOUT + 2
    assert refused(bastion).get("timeout", 0) == counted + 1


def test_a_connection_that_closes_mid_header_is_counted(bastion: BastionProcess) -> None:
    counted = refused(bastion).get("incomplete", 0)
    sock = connect(bastion, 0)
    sock.sendall(v2("203.0.113.9", 1, 2)[:18])
    sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == b""
    sock.close()
    assert wait_until(lambda: refused(bastion).get("incomplete", 0) == counted + 1, timeout=5)


def test_a_listener_without_proxy_protocol_never_interprets_one(
        bastion: BastionProcess) -> None:
    before = app_count(bastion)
    sock = connect(bastion, 2)
    sock.sendall(v1("203.0.113.9", 1, 2) + b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    data = read_all(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert app_count(bastion) == before + 1


def test_connections_waiting_for_their_header_do_not_block_others(
        bastion: BastionProcess) -> None:
    silent = [connect(bastion, 0) for _ in range(5)]
    try:
        status, got = exchange(bastion, 0, v2("203.0.113.77", 5, 6))
        assert status == 200 and got["client"] == "203.0.113.77"
    finally:
        for sock in silent:
            sock.close()


def test_an_in_process_app_gets_the_headers_client_in_its_scope(
        tmp_path: Path, tls_ca: trustme.CA) -> None:
    config: dict[str, Any] = {
        "listen": [{"address": f"127.0.0.1:{free_port()}", "proxy_protocol": True},
                   {"address": f"127.0.0.1:{free_port()}", "proxy_protocol": True,
                    "tls": tls_config(tls_ca, tmp_path / "tls")}],
        "trusted_proxies": [f"{BALANCER}/32"],
        "apps": {"star": {"path": "/star", "hosting_model": "in_process",
                          "app": "inproc_starlette:app", "interface": "asgi",
                          "cwd": str(APPS)}},
    }
    with BastionProcess(tmp_path, config, tls_ca=tls_ca) as running:
        for listener, make, client in ((0, v2, ("203.0.113.20", 41000)),
                                       (1, v1, ("2001:db8::20", 41001))):
            status, got = exchange(running, listener, make(client[0], client[1], 443),
                                   path="/star/info", tls=listener == 1)
            assert status == 200, got
            assert got["client"] == list(client)


def test_connections_waiting_for_their_header_count_in_max_connections(
        tmp_path: Path, tls_ca: trustme.CA) -> None:
    config: dict[str, Any] = {
        "listen": [{"address": f"127.0.0.1:{free_port()}", "proxy_protocol": True}],
        "trusted_proxies": ["127.0.0.0/8"],
        "limits": {"max_connections": 2, "header_timeout": "30s"},
        "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app")}},
    }
    with BastionProcess(tmp_path, config) as running:
        time.sleep(0.3)  # the start's own probe connection is gone
        silent = [connect(running, 0) for _ in range(2)]
        try:
            late = connect(running, 0)  # completed by the kernel, not accepted
            late.sendall(v2("203.0.113.5", 7, 8) + b"GET /info HTTP/1.1\r\nHost: x\r\n"
                         b"Connection: close\r\n\r\n")
            late.settimeout(1.0)
            with pytest.raises(TimeoutError):
                late.recv(1)  # nothing while two headers are awaited
            silent.pop().close()  # one gives up: the late one is accepted and served
            late.settimeout(20)
            data = read_all(late)
            late.close()
            assert data.startswith(b"HTTP/1.1 200 "), data[:200]
            assert b'"client": "203.0.113.5"' in data
        finally:
            for sock in silent:
                sock.close()


def test_reloads_under_fresh_proxy_connections_lose_nothing(bastion: BastionProcess) -> None:
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def client(listener: int) -> None:
        while not stop.is_set():
            try:
                status, got = exchange(bastion, listener, v2("203.0.113.44", 9, 10),
                                       tls=listener == 1)
                assert status == 200 and got["client"] == "203.0.113.44", status
                served[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in (0, 0, 1)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(3):
            time.sleep(0.3)
            config = yaml.safe_load(bastion.path.read_text())
            config["limits"]["keepalive_timeout"] = f"{60 + round_}s"  # a new generation
            bastion.path.write_text(yaml.safe_dump(config))
            status, answer = bastion.admin_post("/reload")
            assert status == 200, answer
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert served[0] > 10
