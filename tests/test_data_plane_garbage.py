"""Serving a request leaves no reference cycle behind in the data plane.

A cycle is freed only by the cycle collector, whose collections walk every young object
(and, in full collections, the whole heap): under HTTP/2 load, a stream and its flow
pointing at each other cost a worker about a fifth of its time. Here a real Bastion
worker serves an in-process app (``tests/apps/inproc_garbage.py``) that turns its own
worker's collector off, lets traffic through, then collects with ``gc.DEBUG_SAVEALL``
and reports every unreachable ``bastion`` object: there must be none, over HTTP/1.1
(plain and TLS) and over HTTP/2 on both engines, with many streams on one connection,
for requests to that in-process app and to an app process (uvicorn) behind it.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from conftest import tls_config
from harness import APPS, BastionProcess, app_command, simple_config
from test_http2 import H2Client

REQUESTS = 200


def config(tmp: Path, ca: trustme.CA) -> dict[str, object]:
    apps = {"garbage": {"path": "/", "hosting_model": "in_process",
                        "app": "inproc_garbage:app", "cwd": str(APPS)},
            "proxied": {"path": "/oop", "command": app_command("uvicorn", "echo_asgi:app"),
                        "start_mode": "always"}}
    # One worker: every request of a test reaches the same process.
    return simple_config(apps, tls=tls_config(ca, tmp / "tls"), workers=1)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module", params=["ng2", "h2"])
def served(request: pytest.FixtureRequest, ca: trustme.CA,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionProcess]:
    engine: str = request.param
    if engine == "ng2" and importlib.util.find_spec("bastion.proxy.edge._ng2") is None:
        pytest.skip("the native HTTP/2 engine is not built here")
    tmp = tmp_path_factory.mktemp(f"garbage-{engine}")
    with BastionProcess(tmp, config(tmp, ca), env={"BASTION_H2_ENGINE": engine},
                        tls_ca=ca) as proc:
        assert proc.get("/").body == b"ok", proc.log()
        assert proc.get("/oop/").status == 200, proc.log()
        yield proc


def h1_requests(proc: BastionProcess, listener: int, ca: trustme.CA, base: str) -> None:
    port = proc.port(listener)
    if listener:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for i in range(REQUESTS):  # one kept-alive connection
            conn.request("GET", f"{base}/r/{i}")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and (base or body == b"ok")
    finally:
        conn.close()


def h2_requests(proc: BastionProcess, ca: trustme.CA, base: str) -> None:
    client = H2Client(proc.port(1), ca)
    try:
        for start in range(0, REQUESTS, 20):  # twenty streams at a time, one connection
            sids = [client.start("GET", f"{base}/r/{i}") for i in range(start, start + 20)]
            for answer in client.wait(*sids):
                assert answer["status"] == 200 and (base or bytes(answer["body"]) == b"ok")
    finally:
        client.close()


def leftovers(proc: BastionProcess, traffic: str, ca: trustme.CA) -> dict[str, int]:
    protocol, _, proxied = traffic.partition("-")
    base = "/oop" if proxied else ""
    assert proc.get("/gc/start").body == b"started"
    if protocol == "h2":
        h2_requests(proc, ca, base)
    else:
        h1_requests(proc, 1 if protocol == "tls" else 0, ca, base)
    found: dict[str, int] = json.loads(proc.get("/gc/count").body)
    return found


@pytest.mark.parametrize("traffic", ["http", "tls", "h2", "http-proxied", "h2-proxied"])
def test_requests_leave_no_reference_cycles(served: BastionProcess, traffic: str,
                                            ca: trustme.CA) -> None:
    assert leftovers(served, traffic, ca) == {}, served.log()


def test_the_check_sees_a_planted_cycle(served: BastionProcess) -> None:
    """An empty answer above means something: a bastion object the app leaves in a
    cycle on purpose is reported."""
    assert served.get("/gc/start").body == b"started"
    assert served.get("/gc/plant").body == b"planted"
    found = json.loads(served.get("/gc/count").body)
    assert found.get("bastion.proxy.edge.health.NodeState") == 1, found
