"""The app's response checked at the edge: malformed answers become 502 (or an aborted
connection once the head is out), the broken upstream connection is not reused, and a
pooled connection the app closed is retried once only for idempotent requests without a
body. The app is tests/apps/raw_upstream.py, which answers ``/bad/KIND`` with a chosen
malformation and counts the requests it got.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BastionProcess, app_command, simple_config

HEAD_502 = ["cl-conflict", "status-line", "garbage", "nul-header", "no-colon", "space-name",
            "cl-sign", "te-and-cl", "empty"]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionProcess]:
    tmp: Path = tmp_path_factory.mktemp("upstream")
    config = simple_config(
        {"raw": {"command": app_command("python", "raw_upstream.py"), "start_mode": "always",
                 "rapid_fails_per_minute": 1000}},
        limits={"header_timeout": 5, "body_timeout": 5},
    )
    bastion = BastionProcess(tmp, config)
    bastion.start()
    try:
        bastion.get("/__reset", host="h")
        yield bastion
    finally:
        bastion.stop()


def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send ``data``, read until close or timeout: (bytes, closed cleanly)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return got, False
            except TimeoutError:
                return got, False
            if not chunk:
                return got, True
            got += chunk


@pytest.mark.parametrize("kind", HEAD_502)
def test_malformed_head_is_502(edge: BastionProcess, kind: str) -> None:
    response = edge.get(f"/bad/{kind}", host="h")
    assert response.status == 502, (kind, response.status, response.body[:200])
    # The app still serves afterwards (a fresh upstream connection).
    assert edge.get("/ok", host="h").status == 200


@pytest.mark.parametrize("kind", ["truncated", "truncated-chunked", "bad-chunk"])
def test_broken_body_aborts_or_502(edge: BastionProcess, kind: str) -> None:
    data, _ = raw(edge.port(), f"GET /bad/{kind} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    if data.startswith(b"HTTP/1.1 502"):
        return  # refused before the head went out
    assert data.startswith(b"HTTP/1.1 200")
    head, _, body = data.partition(b"\r\n\r\n")
    # The head was out: the body must be visibly incomplete (cut short, never completed).
    if b"content-length: 100" in head.lower():
        assert len(body) < 100
    else:
        assert not body.endswith(b"0\r\n\r\n")


def test_pooled_connection_closed_by_app_is_retried_for_get(edge: BastionProcess) -> None:
    assert edge.get("/close-next", host="h").status == 200
    # The pooled connection is closed by the app on its next request: a GET is retried.
    assert edge.get("/after", host="h").status == 200


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_pooled_connection_closed_by_app_not_retried_with_body(edge: BastionProcess,
                                                               method: str) -> None:
    assert edge.get("/close-next", host="h").status == 200
    response = edge.request(method, "/post", body=b"data", host="h")
    assert response.status == 502  # a body was sent: never sent a second time


def test_client_disconnect_cancels_upstream(edge: BastionProcess) -> None:
    edge.get("/__reset", host="h")
    sock = socket.create_connection(("127.0.0.1", edge.port()), timeout=5)
    sock.sendall(b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n")
    deadline = time.monotonic() + 10
    while edge.get("/__count", host="h").json()["count"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.close()
    while "disconnect /hang" not in edge.get("/__count", host="h").json()["events"]:
        assert time.monotonic() < deadline, "the app never saw the client go away"
        time.sleep(0.05)
