"""``limits`` end to end, with small timeouts: slow heads (slowloris) and
slow bodies dropped while a normal client is served, keep-alive idle close,
``max_connections`` (further clients wait in the backlog), ``max_body_size`` by
Content-Length and while streaming, and the access log (combined and JSON, parse-level
refusals included, reopened on SIGUSR1). The app is tests/apps/raw_upstream.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BastionProcess, app_command, simple_config, wait_until

TIMEOUT = 1.5  # header, body and keep-alive timeouts of the main Bastion


def _app() -> dict[str, object]:
    return {"command": app_command("python", "raw_upstream.py"), "start_mode": "always"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    config = simple_config(
        {"raw": _app()},
        access_log=str(tmp / "access.log"),
        limits={"header_timeout": TIMEOUT, "body_timeout": TIMEOUT,
                "keepalive_timeout": TIMEOUT, "max_body_size": "200k"},
    )
    bastion = BastionProcess(tmp, config)
    bastion.start()
    try:
        bastion.get("/__reset", host="h")
        yield bastion
    finally:
        bastion.stop()


def connect(bastion: BastionProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", bastion.port()), timeout=10)


def read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything until the server closes, and when that happened."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic()


def count(bastion: BastionProcess) -> int:
    return int(bastion.get("/__count", host="h").json()["count"])


def test_slowloris_dropped_while_others_are_served(edge: BastionProcess) -> None:
    slow = connect(edge)
    started = time.monotonic()
    slow.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n")
    stop = threading.Event()

    def drip() -> None:
        while not stop.is_set():
            try:
                slow.sendall(b"X-A: 1\r\n")
            except OSError:
                return
            time.sleep(0.2)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    # A normal client is served meanwhile.
    for _ in range(3):
        assert edge.get("/ok", host="h").status == 200
    data, ended = read_all(slow)
    stop.set()
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert TIMEOUT - 0.3 < ended - started < TIMEOUT + 3
    slow.close()


def test_silent_connection_gets_408(edge: BastionProcess) -> None:
    sock = connect(edge)
    data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 408")
    sock.close()


def test_slow_body_408_before_the_app(edge: BastionProcess) -> None:
    before = count(edge)
    sock = connect(edge)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789")
    data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert count(edge) == before
    sock.close()


def test_slow_body_after_streaming_started(edge: BastionProcess) -> None:
    sock = connect(edge)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 150000\r\n\r\n"
                 + b"a" * 100000)
    data, _ = read_all(sock)  # the head of the app's answer was not out yet: 408
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
    sock.close()


def test_keepalive_idle_close(edge: BastionProcess) -> None:
    sock = connect(edge)
    sock.sendall(b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n")
    first = b""
    while b"\r\n\r\n" not in first:
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    head, _, body = first.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    idle_from = time.monotonic()
    rest, ended = read_all(sock)
    assert rest == b""  # closed silently, no 408 for an idle keep-alive connection
    assert ended - idle_from < TIMEOUT + 3
    sock.close()


def test_body_too_large_by_length_and_while_streaming(edge: BastionProcess) -> None:
    before = count(edge)
    response = edge.request("POST", "/", body=b"a" * 300_000, host="h")
    assert response.status == 413
    assert count(edge) == before
    sock = connect(edge)
    body = b"".join(b"%x\r\n" % 50_000 + b"a" * 50_000 + b"\r\n" for _ in range(6))
    sock.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + body + b"0\r\n\r\n")
    data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    sock.close()


def test_access_log_lines_and_reopen(edge: BastionProcess) -> None:
    log = edge.tmp / "access.log"
    assert edge.get("/logged?x=1", host="h", headers={"User-Agent": "probe"}).status == 200
    sock = connect(edge)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n")
    read_all(sock)
    sock.close()
    assert wait_until(lambda: "/logged?x=1" in log.read_text())
    line = next(x for x in log.read_text().splitlines() if "/logged?x=1" in x)
    assert line.startswith("127.0.0.1 - - [")
    assert '"GET /logged?x=1 HTTP/1.1" 200 ' in line and '"probe" raw ' in line
    pid = line.split()[-2]
    assert pid.isdigit()
    assert wait_until(lambda: any('"- - -" 400 ' in x for x in log.read_text().splitlines()))
    rotated = edge.tmp / "access.log.1"
    os.rename(log, rotated)
    os.kill(edge.pid, signal.SIGUSR1)
    assert wait_until(lambda: log.exists())
    assert edge.get("/after-rotate", host="h").status == 200
    assert wait_until(lambda: "/after-rotate" in log.read_text())
    assert "/after-rotate" not in rotated.read_text()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("limits-small")
    config = simple_config(
        {"raw": _app()}, access_log=str(tmp / "access.json"), access_log_format="json",
        limits={"max_connections": 3, "header_timeout": 30, "keepalive_timeout": 30},
    )
    bastion = BastionProcess(tmp, config)
    bastion.start()
    try:
        bastion.get("/__reset", host="h")
        yield bastion
    finally:
        bastion.stop()


def test_max_connections_waits_in_backlog(small: BastionProcess) -> None:
    time.sleep(0.3)  # the readiness probes' connections are gone
    held = [connect(small) for _ in range(3)]
    waiting = connect(small)  # accepted by the kernel, not by Bastion
    waiting.sendall(b"GET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    waiting.settimeout(1.0)
    with pytest.raises(TimeoutError):
        waiting.recv(100)
    held[0].close()  # a slot frees: the waiting client is served
    waiting.settimeout(10)
    data, _ = read_all(waiting)
    assert data.startswith(b"HTTP/1.1 200")
    for sock in held[1:]:
        sock.close()
    waiting.close()
    assert small.proc is not None and small.proc.poll() is None
    assert wait_until(lambda: small.get("/again", host="h").status == 200)


def test_access_log_json(small: BastionProcess) -> None:
    assert small.get("/json-line", host="h").status == 200
    path = small.tmp / "access.json"
    assert wait_until(lambda: "/json-line" in path.read_text())
    entry = next(json.loads(x) for x in path.read_text().splitlines() if "/json-line" in x)
    assert entry["method"] == "GET" and entry["status"] == 200 and entry["app"] == "raw"
    assert entry["client"] == "127.0.0.1" and entry["pid"] > 0 and entry["bytes"] > 0
    assert entry["duration"] >= 0


def test_lost_access_log_lines_are_reported_once_and_counted(tmp_path: Path) -> None:
    """A log that cannot be written (here /dev/full: ENOSPC) loses its lines: said once
    in Bastion's log, not once per line, and counted in /metrics; requests go on."""
    config = simple_config(
        {"raw": {"command": app_command("python", "raw_upstream.py"), "start_mode": "always"}},
        access_log="/dev/full",
    )
    bastion = BastionProcess(tmp_path, config)
    bastion.start()
    try:
        for _ in range(20):
            assert bastion.get("/ok", host="h").status == 200

        def lost() -> float:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(bastion.config["admin_socket"])
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            sock.close()
            for line in data.decode().splitlines():
                if line.startswith("bastion_access_log_lost_lines_total"):
                    return float(line.split()[-1])
            raise AssertionError("no bastion_access_log_lost_lines_total")

        assert wait_until(lambda: lost() >= 20, 10)
        reports = [line for line in bastion.log().splitlines() if "line(s) lost" in line]
        assert len(reports) == 1, reports
        assert "/dev/full" in reports[0]
    finally:
        bastion.stop()
