"""In-process hosting end to end: real Bastion, worker processes calling real
Starlette, FastAPI, Flask and Django apps (tests/apps/inproc_*.py) at path prefixes,
over HTTP/1.1, TLS and HTTP/2, next to an out-of-process app under uvicorn.

One Bastion (module scope) serves the behaviour tests; a second one, with a low
rapid-fail limit, takes the crashes; a third checks lifespan shutdown, recycle and
reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import trustme
import yaml
from conftest import tls_config
from harness import APPS, BastionProcess, app_command, simple_config, wait_until
from test_http2 import H2Client

MB = 1024 * 1024

FRAMEWORKS = {  # app name -> (path base, import string, interface)
    "star": ("/star", "inproc_starlette:app", "asgi"),
    "fast": ("/fast", "inproc_fastapi:app", "asgi"),
    "flask": ("/flask", "inproc_flask:app", "wsgi"),
    "django": ("/dj", "inproc_django:application", "wsgi"),
    "djasgi": ("/djasgi", "inproc_django:asgi_application", "asgi"),
}


def hosted(path: str, app: str, interface: str = "asgi", **extra: Any) -> dict[str, Any]:
    return {"path": path, "hosting_model": "in_process", "app": app, "interface": interface,
            "cwd": str(APPS), **extra}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA
           ) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("inprocess")
    apps: dict[str, Any] = {
        name: hosted(path, app, interface) for name, (path, app, interface) in FRAMEWORKS.items()
    }
    apps["star"]["environment"] = {"LIFESPAN_LOG": str(tmp / "lifespan.log")}
    apps["rawasgi"] = hosted("/rawasgi", "inproc_raw:asgi")
    apps["rawwsgi"] = hosted("/rawwsgi", "inproc_raw:wsgi", "wsgi", threads=4)
    apps["broken"] = hosted("/broken", "inproc_broken:app")
    apps["timeout"] = hosted("/timeout", "inproc_raw:asgi", request_timeout=0.3)
    apps["oop"] = {"path": "/oop", "command": app_command("uvicorn", "echo_asgi:app")}
    config = simple_config(apps, tls=tls_config(ca, tmp / "tls"), workers=2,
                           detailed_errors=True, limits={"max_body_size": "100MB"})
    with BastionProcess(tmp, config, tls_ca=ca) as proc:
        assert wait_until(lambda: _hosted_ready(proc, "star"), 20), proc.log()
        yield proc


def _hosted_ready(proc: BastionProcess, app: str, count: int = 2) -> bool:
    try:
        rows = proc.status()["apps"][app]["processes"]
    except (OSError, KeyError, ValueError):
        return False
    return len([r for r in rows if r["state"] == "ready"]) >= count


def worker_pids(proc: BastionProcess) -> set[int]:
    return {w["pid"] for w in proc.status()["workers"]}


# -- the request as the app sees it --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_framework_sees_https_client_and_prefix(served: BastionProcess, name: str) -> None:
    base = FRAMEWORKS[name][0]
    response = served.get(f"{base}/info", listener=1)
    assert response.status == 200, response.body
    info = response.json()
    assert info["scheme"] == "https"
    assert info["client"][0] == "127.0.0.1" and info["client"][1] > 0
    assert info["root_path"] == base
    assert info["path"] in (f"{base}/info", "/info")  # ASGI full path; WSGI PATH_INFO
    assert info["url_for"] == f"https://127.0.0.1:{served.port(1)}{base}/info"
    assert info["pid"] in worker_pids(served) and info["pid"] != served.pid
    redirect = served.get(f"{base}/redirect", listener=1)
    assert redirect.status == 302
    assert redirect.headers["location"] == f"https://127.0.0.1:{served.port(1)}{base}/info"


def test_plain_http_scheme_and_no_bastion_headers(served: BastionProcess) -> None:
    info = served.get("/star/info", headers={"X-Bastion-Token": "forged",
                                             "X-Forwarded-Proto": "https"}).json()
    assert info["scheme"] == "http"
    assert info["http_version"] == "1.1"
    names = {k.lower() for k in info["headers"]}
    assert not any(n.startswith("x-bastion") or n.startswith("x-forwarded") for n in names)
    assert info["state"] == info["pid"]  # the lifespan state reached the request


def test_http2(served: BastionProcess, ca: trustme.CA) -> None:
    client = H2Client(served.port(1), ca)
    try:
        sids = [client.start("GET", f"{base}/info") for base, _, _ in FRAMEWORKS.values()]
        for result in client.wait(*sids):
            assert result["status"] == 200
            info = json.loads(bytes(result["body"]))
            assert info["scheme"] == "https"
        star = json.loads(bytes(client.get("/star/info")["body"]))
        assert star["http_version"] == "2"
        assert star["client"][0] == "127.0.0.1" and star["client"][1] > 0
        body = b"z" * (3 * MB + 17)
        sid = client.start("POST", "/star/upload", end=False)
        client.send_body(sid, body)
        (result,) = client.wait(sid)
        assert json.loads(bytes(result["body"])) == {
            "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        download = client.get("/flask/download?size=2000000")
        assert download["status"] == 200 and len(download["body"]) == 2000000
    finally:
        client.close()


# -- WebSockets ---------------------------------------------------------------------------
@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websocket_echo(served: BastionProcess, ca: trustme.CA, tls: bool) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    base = (f"wss://127.0.0.1:{served.port(1)}" if tls
            else f"ws://127.0.0.1:{served.port(0)}")

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{base}/star/ws",
                                          ssl=context if tls else False) as sock:
                for i in range(10):
                    await sock.send_str(f"hello {i} ✓")
                    assert await sock.receive_str() == f"hello {i} ✓"
                blob = bytes(range(256)) * 1024
                await sock.send_bytes(blob)
                assert await sock.receive_bytes() == blob
                await sock.ping(b"are you there")
                await sock.send_str("after ping")
                assert await sock.receive_str() == "after ping"
                await sock.close(code=4001)
            assert sock.close_code == 4001
            # a WSGI app takes no upgrade: the request goes on as a plain one
            async with session.get(f"{base}/flask/hello", ssl=context if tls else False,
                                   headers={"Upgrade": "websocket",
                                            "Connection": "Upgrade",
                                            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                            "Sec-WebSocket-Version": "13"}) as plain:
                assert plain.status == 200 and await plain.text() == "hello flask"

    asyncio.run(asyncio.wait_for(go(), 30))


def test_websocket_refused_by_the_app_is_403(served: BastionProcess) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(f"ws://127.0.0.1:{served.port(0)}/star/nowhere")
            assert caught.value.status == 403

    asyncio.run(asyncio.wait_for(go(), 30))


# -- bodies both ways, memory flat -----------------------------------------------------------
def _upload(port: int, path: str, size: int) -> dict[str, Any]:
    """A streamed upload of ``size`` bytes (chunked: the app reads it as it arrives)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    block = bytes(range(256)) * 256  # 64 KiB

    def pieces() -> Iterator[bytes]:
        left = size
        while left > 0:
            piece = block[:min(left, len(block))]
            left -= len(piece)
            yield piece

    try:
        conn.request("POST", path, body=pieces(), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        assert response.status == 200
        return dict(json.loads(response.read()))
    finally:
        conn.close()


def _download(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        total = 0
        while chunk := response.read(256 * 1024):
            total += len(chunk)
        return total
    finally:
        conn.close()


def _workers_rss(proc: BastionProcess) -> int:
    return max(psutil.Process(pid).memory_info().rss for pid in worker_pids(proc))


@pytest.mark.parametrize("name", ["star", "flask"])
def test_50mb_streamed_both_ways_with_flat_memory(served: BastionProcess, name: str) -> None:
    base = FRAMEWORKS[name][0]
    size = 50 * MB
    _download(served.port(), f"{base}/download?size={MB}")  # warm both paths
    before = _workers_rss(served)
    expected = hashlib.sha256()
    block = bytes(range(256)) * 256
    for offset in range(0, size, len(block)):
        expected.update(block[:min(len(block), size - offset)])
    assert _upload(served.port(), f"{base}/upload", size) == {
        "size": size, "sha256": expected.hexdigest()}
    assert _download(served.port(), f"{base}/download?size={size}") == size
    grown = _workers_rss(served) - before
    assert grown < 20 * MB, f"a worker grew by {grown / MB:.1f} MiB for 50 MiB bodies"


# -- failures ----------------------------------------------------------------------------
def test_exception_before_the_response_is_500_and_next_is_served(served: BastionProcess
                                                                  ) -> None:
    for base in ("/rawasgi", "/rawwsgi"):
        failed = served.get(f"{base}/raise")
        assert failed.status == 500
        assert b"ValueError" in failed.body and b"raised before the response" in failed.body
        assert served.get(f"{base}/ok").status == 200
    empty = served.get("/rawasgi/nothing")
    assert empty.status == 500 and b"without a complete response" in empty.body
    assert served.get("/star/boom").status == 500  # Starlette's own error handling
    assert served.get("/star/hello").body == b"hello"
    assert wait_until(lambda: b"boom from the app" in served.log_path.read_bytes(), 5)


def test_request_timeout_is_504_and_cancels_the_app(served: BastionProcess) -> None:
    started = time.monotonic()
    response = served.get("/timeout/slow")  # the app would sleep for 1 s
    assert response.status == 504
    assert time.monotonic() - started < 0.9
    # cancelled, not left running: nothing of it is in flight any more
    assert wait_until(lambda: sum(r["in_flight"] for r in
                                  served.status()["apps"]["timeout"]["processes"]) == 0, 0.6)
    assert served.get("/timeout/ok").status == 200


def test_wsgi_environ_under_prefix(served: BastionProcess) -> None:
    assert served.get("/rawwsgi/a/b?x=1").body == b"raw wsgi /rawwsgi /a/b"


def test_import_error_is_502_with_reason_and_others_serve(served: BastionProcess) -> None:
    failed = served.get("/broken/")
    assert failed.status == 502
    assert b"this app is broken on purpose" in failed.body
    assert b"Traceback" in failed.body  # detailed_errors
    status = served.status()["apps"]["broken"]
    assert status["state"] in ("failed", "backoff")
    assert "this app is broken on purpose" in status["reason"]
    assert served.get("/oop/info").status == 200  # the out-of-process app is untouched
    assert served.get("/star/hello").status == 200


def test_status_lists_the_workers_hosting_it(served: BastionProcess) -> None:
    for _ in range(6):
        assert served.get("/fast/hello").status == 200
    assert wait_until(lambda: sum(
        r["requests"] for r in served.status()["apps"]["fast"]["processes"]) >= 6, 5)
    status = served.status()["apps"]["fast"]
    assert status["hosting_model"] == "in_process" and status["state"] == "ready"
    assert {r["pid"] for r in status["processes"]} == worker_pids(served)
    assert all(r["rss"] > 0 for r in status["processes"])
    shown = subprocess.run([sys.executable, "-m", "bastion", "status", "--socket",
                            served.config["admin_socket"]], capture_output=True, text=True,
                           timeout=30).stdout
    rows = [line.split() for line in shown.splitlines() if line.split()[:1] == ["fast"]]
    assert {int(row[2]) for row in rows} == worker_pids(served)
    assert all(row[1] == "ready/ready" and row[3] == "in-proc" for row in rows)


def test_admin_stop_and_start(served: BastionProcess) -> None:
    assert served.admin_post("/apps/fast/stop")[0] == 200
    assert wait_until(lambda: served.get("/fast/hello").status == 503, 5)
    assert served.admin_post("/apps/fast/start")[0] == 200
    assert wait_until(lambda: served.get("/fast/hello").status == 200, 5)


def test_app_offline_file(tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "hello_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    assert scope['type'] == 'http'\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'up'})\n")
    config = simple_config({"h": {"path": "/", "hosting_model": "in_process",
                                  "app": "hello_app:app", "cwd": str(app_dir)}}, workers=1)
    with BastionProcess(tmp_path, config) as proc:
        assert wait_until(lambda: proc.get("/").body == b"up", 10)
        (app_dir / "app_offline.htm").write_text("<h1>back soon</h1>")
        assert wait_until(lambda: proc.get("/").status == 503, 5)
        assert b"back soon" in proc.get("/").body
        (app_dir / "app_offline.htm").unlink()
        assert wait_until(lambda: proc.get("/").body == b"up", 5)


# -- crashes ------------------------------------------------------------------------------
def _cut(proc: BastionProcess, path: str) -> bool:
    """True when the request's connection was cut without an answer."""
    try:
        proc.get(path, timeout=10)
    except (TimeoutError, http.client.RemoteDisconnected, ConnectionError):
        return True
    return False


def test_os_exit_costs_its_worker_then_rapid_fail(tmp_path: Path) -> None:
    apps = {
        "raw": hosted("/raw", "inproc_raw:asgi", rapid_fails_per_minute=3),
        "oop": {"path": "/oop", "command": app_command("uvicorn", "echo_asgi:app")},
    }
    config = simple_config(apps, workers=2)
    with BastionProcess(tmp_path, config) as proc:
        assert wait_until(lambda: _hosted_ready(proc, "raw"), 20), proc.log()
        first = worker_pids(proc)
        assert _cut(proc, "/raw/die")
        # the other worker serves at once; the dead one is replaced
        assert wait_until(lambda: proc.get("/raw/ok").status == 200, 10)
        assert wait_until(lambda: len(worker_pids(proc)) == 2
                          and worker_pids(proc) != first, 15), proc.log()
        status = proc.status()["apps"]["raw"]
        assert status["restarts"] == 1 and "status 7" in status["last_exit"]
        assert proc.get("/oop/info").status == 200
        # two more crashes fill the window (3 a minute): 503 with Retry-After
        for _ in range(2):
            assert wait_until(lambda: _hosted_ready(proc, "raw"), 15), proc.log()
            assert _cut(proc, "/raw/die")
        assert wait_until(lambda: proc.status()["apps"]["raw"]["state"] == "backoff", 10)
        resting = proc.get("/raw/ok")
        assert resting.status == 503 and int(resting.headers["retry-after"]) >= 1
        assert proc.get("/oop/info").status == 200


def test_a_blocked_event_loop_is_caught_by_the_worker_watchdog(tmp_path: Path) -> None:
    apps = {"raw": hosted("/", "inproc_raw:asgi")}
    config = simple_config(apps, workers=1, worker_timeout="2s")
    with BastionProcess(tmp_path, config) as proc:
        assert wait_until(lambda: _hosted_ready(proc, "raw", 1), 20), proc.log()
        (stuck,) = worker_pids(proc)
        started = time.monotonic()
        assert _cut(proc, "/block")  # its worker is killed, not waited for (30 s)
        assert time.monotonic() - started < 10
        assert wait_until(lambda: proc.get("/ok").status == 200, 15), proc.log()
        assert stuck not in worker_pids(proc)
        assert proc.status()["apps"]["raw"]["restarts"] == 1
        assert "no heartbeat" in proc.log()


def test_max_concurrency_and_max_queue_per_worker(tmp_path: Path) -> None:
    apps = {"raw": hosted("/", "inproc_raw:asgi", max_concurrency=1, max_queue=1)}
    with BastionProcess(tmp_path, simple_config(apps, workers=1)) as proc:
        assert wait_until(lambda: proc.get("/ok").status == 200, 20), proc.log()
        statuses: list[int] = []

        def slow() -> None:
            statuses.append(proc.get("/slow", timeout=20).status)

        first = threading.Thread(target=slow)
        first.start()
        assert wait_until(lambda: proc.status()["apps"]["raw"]["processes"][0]["in_flight"]
                          == 1, 5)
        second = threading.Thread(target=slow)  # waits for the slot
        second.start()
        time.sleep(0.3)
        refused = proc.get("/ok")  # the queue (1) is full: 503 at once
        assert refused.status == 503 and refused.headers["retry-after"] == "1"
        first.join(20)
        second.join(20)
        assert statuses == [200, 200]
        assert proc.get("/ok").status == 200


# -- lifespan, recycle, reload ------------------------------------------------------------
def test_lifespan_recycle_under_load_and_reload(tmp_path: Path) -> None:
    log = tmp_path / "lifespan.log"
    apps = {"star": hosted("/", "inproc_starlette:app",
                           environment={"LIFESPAN_LOG": str(log)})}
    config = simple_config(apps, workers=2)
    proc = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: _hosted_ready(proc, "star"), 20), proc.log()
        first = worker_pids(proc)
        assert sorted(log.read_text().split()) == sorted(
            w for pid in first for w in ("startup", str(pid)))
        failures: list[str] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                try:
                    response = proc.get("/hello", timeout=10)
                    if response.status != 200:
                        failures.append(str(response.status))
                except OSError as exc:
                    failures.append(repr(exc))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            assert proc.admin_post("/apps/star/recycle")[0] == 200
            assert wait_until(lambda: not worker_pids(proc) & first
                              and _hosted_ready(proc, "star"), 30), proc.log()
        finally:
            done.set()
            for thread in threads:
                thread.join(20)
        assert failures == []
        # the old workers ran their shutdown once each (while draining)
        assert wait_until(lambda: all(f"shutdown {pid}" in log.read_text() for pid in first),
                          15), log.read_text()
        lines = log.read_text().split("\n")
        for pid in first:
            assert lines.count(f"shutdown {pid}") == 1
            assert lines.count(f"startup {pid}") == 1
        # reload with a changed app: the new generation serves it
        config["apps"]["star"]["environment"]["EXTRA"] = "1"
        proc.path.write_text(yaml.safe_dump(config))
        assert proc.admin_post("/reload")[0] == 200
        assert proc.get("/hello").body == b"hello"
        second = worker_pids(proc)
    finally:
        proc.stop()
    lines = log.read_text().split("\n")
    for pid in second:
        assert lines.count(f"startup {pid}") == 1 and lines.count(f"shutdown {pid}") == 1

