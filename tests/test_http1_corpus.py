"""A corpus of malformed and ambiguous HTTP/1.1 requests, as raw bytes, against a real
Bastion in front of a real app (tests/apps/raw_upstream.py) that counts what reaches it.

The corpus itself is tests/http1_cases.py (shared with the in-memory run of
tests/test_edge_memory.py). Each case names the status Bastion must
answer (a set where RFC 9112 allows either) and whether the app may see the request:
every rejected one must reach no app, and the connection must close after it. The whole
corpus runs twice: with the data plane as built by ``./run`` (compiled with mypyc where a
compiler was there) and as plain Python (``BASTION_INTERPRETED=1`` in Bastion's
environment).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import BastionProcess, app_command, simple_config
from http1_cases import CORPUS, IDS, MAX_BODY, MAX_HEADER, Case


def _config(tmp: Path) -> dict[str, Any]:
    return simple_config(
        {"raw": {"command": app_command("python", "raw_upstream.py"), "start_mode": "always"}},
        limits={"max_header_size": MAX_HEADER, "max_body_size": MAX_BODY,
                "header_timeout": 2, "body_timeout": 2, "keepalive_timeout": 5},
    )


@pytest.fixture(scope="module", params=["built", "interpreted"])
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp(f"corpus-{request.param}")
    env = {"BASTION_INTERPRETED": "1"} if request.param == "interpreted" else {}
    bastion = BastionProcess(tmp, _config(tmp), env=env)
    bastion.start()
    try:
        bastion.get("/__reset", host="h")  # waits for the app
        yield bastion
    finally:
        bastion.stop()


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``raw``; return everything received and whether the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return data, False
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk
        return data, False


def app_count(bastion: BastionProcess) -> int:
    return int(bastion.get("/__count", host="h").json()["count"])


def status_of(data: bytes) -> int | None:
    if not data.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):  # never HTTP/0.9 or 2.0
        return None
    return int(data[9:12])


@pytest.mark.parametrize("c", CORPUS, ids=IDS)
def test_corpus(edge: BastionProcess, c: Case) -> None:
    before = app_count(edge)
    data, closed = exchange(edge.port(), c.raw)
    status = status_of(data)
    assert status in c.status, f"{c.id}: got {data[:200]!r}"
    assert closed, f"{c.id}: the connection stayed open"
    after = app_count(edge)
    if c.reaches is None:
        return
    if c.reaches:
        assert after == before + 1, c.id
        if c.check is not None:
            body = data.split(b"\r\n\r\n", 1)[1]
            c.check(json.loads(body))
    else:
        assert after == before, f"{c.id}: the app received a rejected request"


def test_corpus_size() -> None:
    assert len(CORPUS) >= 100
