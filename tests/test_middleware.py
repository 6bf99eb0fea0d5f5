"""Tests for integration_middleware: unit tests per flavour plus one real server process each.

The real-process tests run uvicorn, gunicorn and ``aiohttp.web.run_app`` with the apps in
tests/apps/middleware_apps.py; the servers' own proxy-header handling is switched off so that
whatever the app sees was done by the middleware.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment
from wsgiref.util import setup_testing_defaults

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the repository is not necessarily installed
    sys.path.insert(0, str(REPO))

from integration_middleware import IntegrationMiddleware, WSGIIntegrationMiddleware  # noqa: E402
from integration_middleware._core import (  # noqa: E402
    forwarded_for,
    forwarded_proto,
    normalize_path_base,
    split_host,
    split_path,
)

APPS = REPO / "tests" / "apps"
TOKEN = "s3cret-token-value-0123456789abcdef"
PAIRED = {
    "X-Bastion-Token": TOKEN,
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "shop.example.com",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Prefix": "/shop",
    "X-Bastion-Client-Cert": "TUlJQ2VydA==",
}


# --------------------------------------------------------------------------- pure logic


def test_split_path_segment_boundary() -> None:
    assert split_path("/shop", "/shop/a/b") == ("/shop", "/a/b")
    assert split_path("/shop", "/shop") == ("/shop", "")
    assert split_path("/shop", "/shop/") == ("/shop", "/")
    assert split_path("/shop", "/shopping") is None
    assert split_path("/shop", "/other") is None
    assert split_path("", "/shop") is None


def test_normalize_path_base() -> None:
    assert normalize_path_base("") == ""
    assert normalize_path_base("/") == ""
    assert normalize_path_base(None) == ""
    assert normalize_path_base("/shop/") == "/shop"
    assert normalize_path_base("shop") == "/shop"


def test_forwarded_for_takes_rightmost_valid_ip() -> None:
    assert forwarded_for(["198.51.100.1, 203.0.113.7"]) == "203.0.113.7"
    assert forwarded_for(["198.51.100.1", "2001:db8::1"]) == "2001:db8::1"
    assert forwarded_for(["[2001:db8::2]"]) == "2001:db8::2"
    assert forwarded_for(["203.0.113.7, not-an-ip"]) is None
    assert forwarded_for(["203.0.113.7:1234"]) is None
    assert forwarded_for(None) is None


def test_forwarded_proto_and_host() -> None:
    assert forwarded_proto(["https"]) == "https"
    assert forwarded_proto(["HTTP"]) == "http"
    assert forwarded_proto(["https"], websocket=True) == "wss"
    assert forwarded_proto(["http"], websocket=True) == "ws"
    assert forwarded_proto(["ftp"]) is None
    assert forwarded_proto(["javascript"]) is None
    assert split_host("example.com:8443") == ("example.com", 8443)
    assert split_host("example.com") == ("example.com", None)
    assert split_host("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert split_host("example.com:99999") == ("example.com", None)


# --------------------------------------------------------------------------- ASGI


class Recorder:
    """An ASGI app recording the scopes it was called with."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


def http_scope(path: str = "/shop/a", headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"q=1",
        "root_path": "",
        "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in {"host": "shop.example.com", **(headers or {})}.items()
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 9000),
    }


def run_asgi(
    app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    queue = list(incoming or [{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=5))
    return sent


def header_dict(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def test_asgi_without_token_is_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_TOKEN", raising=False)
    inner = Recorder()
    scope = http_scope(headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"})
    sent = run_asgi(IntegrationMiddleware(inner), scope)
    assert inner.scopes == [scope] and inner.scopes[0] is scope
    assert scope["scheme"] == "http" and scope["client"] == ("127.0.0.1", 40000)
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_asgi_unpaired_http_gets_400(token: str | None, caplog: pytest.LogCaptureFixture) -> None:
    inner = Recorder()
    headers = {} if token is None else {"X-Bastion-Token": token}
    with caplog.at_level(logging.WARNING, logger="integration_middleware"):
        sent = run_asgi(IntegrationMiddleware(inner, token=TOKEN), http_scope(headers=headers))
    assert inner.scopes == []
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert (b"content-type", b"text/plain; charset=utf-8") in sent[0]["headers"]
    assert sent[1]["body"] == b"400 Bad Request: not paired with Bastion"
    records = [r for r in caplog.records if r.name == "integration_middleware"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    line = records[0].getMessage()
    assert "127.0.0.1:40000" in line and "/shop/a" in line
    assert TOKEN not in line


def test_asgi_duplicate_token_header_is_refused() -> None:
    inner = Recorder()
    scope = http_scope()
    scope["headers"] += [(b"x-bastion-token", TOKEN.encode())] * 2
    sent = run_asgi(IntegrationMiddleware(inner, token=TOKEN), scope)
    assert inner.scopes == [] and sent[0]["status"] == 400


def test_asgi_paired_http_rewrites_scope() -> None:
    inner = Recorder()
    scope = http_scope("/shop/a", headers={**PAIRED, "X-Original-For": "spoofed"})
    sent = run_asgi(IntegrationMiddleware(inner, token=TOKEN, path_base="/shop"), scope)
    assert sent[0]["status"] == 200
    (seen,) = inner.scopes
    assert seen["scheme"] == "https"
    assert seen["client"] == ("203.0.113.7", 0)
    assert seen["server"] == ("shop.example.com", 8443)
    assert seen["root_path"] == "/shop"
    assert seen["path"] == "/shop/a"
    assert seen["raw_path"] == b"/shop/a"
    assert seen["extensions"]["bastion"] == {"client_cert": "TUlJQ2VydA=="}
    headers = header_dict(seen)
    assert "x-bastion-token" not in headers
    assert headers["x-original-for"] == "127.0.0.1"
    assert headers["x-original-proto"] == "http"
    assert headers["host"] == "shop.example.com"
    # the caller's scope is not modified
    assert scope["scheme"] == "http" and scope["root_path"] == ""


def test_asgi_paired_path_outside_base_and_bad_headers_left_alone() -> None:
    inner = Recorder()
    scope = http_scope(
        "/shopping",
        headers={"X-Bastion-Token": TOKEN, "X-Forwarded-Proto": "ftp", "X-Forwarded-For": "nope"},
    )
    run_asgi(IntegrationMiddleware(inner, token=TOKEN, path_base="/shop"), scope)
    (seen,) = inner.scopes
    assert seen["path"] == "/shopping" and seen["root_path"] == ""
    assert seen["scheme"] == "http"
    assert seen["client"] == ("127.0.0.1", 40000)
    assert seen["server"] == ("127.0.0.1", 9000)
    assert "bastion" not in seen.get("extensions", {})
    assert "x-bastion-token" not in header_dict(seen)


def test_asgi_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_TOKEN", TOKEN)
    monkeypatch.setenv("BASTION_PATH_BASE", "/shop")
    inner = Recorder()
    mw = IntegrationMiddleware(inner)
    assert run_asgi(mw, http_scope())[0]["status"] == 400
    run_asgi(mw, http_scope("/shop", headers={"X-Bastion-Token": TOKEN}))
    assert inner.scopes[0]["root_path"] == "/shop"


def ws_scope(headers: dict[str, str]) -> dict[str, Any]:
    scope = http_scope("/shop/ws", headers=headers)
    scope.update(type="websocket", scheme="ws", subprotocols=[])
    return scope


def test_asgi_unpaired_websocket_closed_1008() -> None:
    inner = Recorder()
    sent = run_asgi(
        IntegrationMiddleware(inner, token=TOKEN),
        ws_scope({"X-Bastion-Token": "bad"}),
        [{"type": "websocket.connect"}],
    )
    assert inner.scopes == []
    assert len(sent) == 1
    assert sent[0]["type"] == "websocket.close" and sent[0]["code"] == 1008


def test_asgi_paired_websocket_gets_wss() -> None:
    inner = Recorder()
    run_asgi(
        IntegrationMiddleware(inner, token=TOKEN, path_base="/shop"),
        ws_scope(PAIRED),
        [{"type": "websocket.connect"}],
    )
    (seen,) = inner.scopes
    assert seen["scheme"] == "wss" and seen["root_path"] == "/shop"
    assert header_dict(seen)["x-original-proto"] == "ws"


def test_asgi_lifespan_passes_through() -> None:
    inner = Recorder()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    run_asgi(IntegrationMiddleware(inner, token=TOKEN), scope, [])
    assert inner.scopes == [scope] and inner.scopes[0] is scope


# --------------------------------------------------------------------------- WSGI


class WSGIRecorder:
    def __init__(self) -> None:
        self.environs: list[dict[str, Any]] = []

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        self.environs.append(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


def wsgi_environ(path: str = "/shop/a", headers: dict[str, str] | None = None) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "PATH_INFO": path,
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
    }
    for k, v in (headers or {}).items():
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    setup_testing_defaults(environ)
    return environ


def run_wsgi(app: Any, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    status: list[str] = []
    headers: list[tuple[str, str]] = []

    def start_response(s: str, h: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        headers.extend(h)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return status[0], headers, body


def test_wsgi_without_token_is_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_TOKEN", raising=False)
    inner = WSGIRecorder()
    environ = wsgi_environ(headers={"X-Forwarded-Proto": "https"})
    status, _, _ = run_wsgi(WSGIIntegrationMiddleware(inner), environ)
    assert status == "200 OK"
    assert inner.environs[0] is environ and environ["wsgi.url_scheme"] == "http"


@pytest.mark.parametrize("token", [None, "wrong"])
def test_wsgi_unpaired_gets_400(token: str | None, caplog: pytest.LogCaptureFixture) -> None:
    inner = WSGIRecorder()
    headers = {} if token is None else {"X-Bastion-Token": token}
    with caplog.at_level(logging.WARNING, logger="integration_middleware"):
        status, hdrs, body = run_wsgi(
            WSGIIntegrationMiddleware(inner, token=TOKEN), wsgi_environ(headers=headers)
        )
    assert inner.environs == []
    assert status == "400 Bad Request"
    assert ("Content-Type", "text/plain; charset=utf-8") in hdrs
    assert body == b"400 Bad Request: not paired with Bastion"
    (record,) = [r for r in caplog.records if r.name == "integration_middleware"]
    assert "127.0.0.1:40000" in record.getMessage() and TOKEN not in record.getMessage()


@pytest.mark.parametrize(
    ("path", "script_name", "path_info"),
    [("/shop/a", "/shop", "/a"), ("/shop", "/shop", ""), ("/shopping", "", "/shopping")],
)
def test_wsgi_paired_rewrites_environ(path: str, script_name: str, path_info: str) -> None:
    inner = WSGIRecorder()
    environ = wsgi_environ(path, headers=PAIRED)
    status, _, _ = run_wsgi(
        WSGIIntegrationMiddleware(inner, token=TOKEN, path_base="/shop"), environ
    )
    assert status == "200 OK"
    (seen,) = inner.environs
    assert seen.get("SCRIPT_NAME", "") == script_name and seen["PATH_INFO"] == path_info
    assert seen["wsgi.url_scheme"] == "https"
    assert seen["REMOTE_ADDR"] == "203.0.113.7" and "REMOTE_PORT" not in seen
    assert seen["SERVER_NAME"] == "shop.example.com" and seen["SERVER_PORT"] == "8443"
    assert seen["HTTP_HOST"] == environ["HTTP_HOST"]
    assert "HTTP_X_BASTION_TOKEN" not in seen
    assert seen["HTTP_X_ORIGINAL_FOR"] == "127.0.0.1"
    assert seen["HTTP_X_ORIGINAL_PROTO"] == "http"
    assert seen["bastion.client_cert"] == "TUlJQ2VydA=="
    assert environ["HTTP_X_BASTION_TOKEN"] == TOKEN  # caller's environ untouched


def test_wsgi_server_already_split_script_name() -> None:
    inner = WSGIRecorder()
    environ = wsgi_environ("/a", headers={"X-Bastion-Token": TOKEN})
    environ["SCRIPT_NAME"] = "/shop"
    run_wsgi(WSGIIntegrationMiddleware(inner, token=TOKEN, path_base="/shop"), environ)
    assert (inner.environs[0]["SCRIPT_NAME"], inner.environs[0]["PATH_INFO"]) == ("/shop", "/a")


# --------------------------------------------------------------------------- aiohttp (real socket)


def test_aiohttp_in_process() -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from integration_middleware.aiohttp import make_middleware

    calls: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(
            {
                "scheme": request.scheme,
                "remote": request.remote,
                "host": request.host,
                "path": request.path,
                "path_base": request.get("bastion.path_base"),
                "cert": request.get("bastion.client_cert"),
                "headers": dict(request.headers),
                "url": str(request.url),
            }
        )
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application(middlewares=[make_middleware(token=TOKEN, path_base="/shop")])
        app.router.add_get("/{tail:.*}", handler)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            r = await client.get("/shop/a")
            assert r.status == 400
            assert await r.text() == "400 Bad Request: not paired with Bastion"
            assert r.headers["Content-Type"].startswith("text/plain")
            r = await client.get("/shop/a", headers={"X-Bastion-Token": "wrong"})
            assert r.status == 400
            assert calls == []
            r = await client.get("/shop/a", headers=PAIRED)
            assert r.status == 200
            r = await client.get("/other", headers={"X-Bastion-Token": TOKEN})
            assert r.status == 200

    asyncio.run(asyncio.wait_for(main(), timeout=20))
    first, second = calls
    assert first["scheme"] == "https"
    assert first["remote"] == "203.0.113.7"
    assert first["host"] == "shop.example.com"
    assert first["path"] == "/shop/a" and first["path_base"] == "/shop"
    assert first["url"] == "https://shop.example.com/shop/a"
    assert first["cert"] == "TUlJQ2VydA=="
    lowered = {k.lower(): v for k, v in first["headers"].items()}
    assert "x-bastion-token" not in lowered
    assert lowered["x-original-for"] == "127.0.0.1"
    assert lowered["x-original-proto"] == "http"
    assert second["path_base"] is None and second["scheme"] == "http"


def test_aiohttp_without_token_is_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_TOKEN", raising=False)
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from integration_middleware.aiohttp import make_middleware

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.scheme} {request.remote}")

    async def main() -> str:
        app = web.Application(middlewares=[make_middleware()])
        app.router.add_get("/", handler)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            r = await client.get("/", headers={"X-Forwarded-Proto": "https"})
            assert r.status == 200
            return await r.text()

    assert asyncio.run(asyncio.wait_for(main(), timeout=20)) == "http 127.0.0.1"


def test_package_import_is_stdlib_only() -> None:
    code = (
        "import sys, integration_middleware as m\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp imported eagerly'\n"
        "import integration_middleware._core, integration_middleware.asgi, "
        "integration_middleware.wsgi\n"
        "assert 'aiohttp' not in sys.modules\n"
        "assert callable(m.aiohttp.middleware)\n"
        "assert 'aiohttp' in sys.modules\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('proxy', 'module')]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, cwd="/")


# --------------------------------------------------------------------------- real processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"server did not listen within {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def server_command(flavour: str, port: int) -> list[str]:
    if flavour == "asgi":
        return [
            sys.executable, "-m", "uvicorn", "--app-dir", str(APPS),
            "--host", "127.0.0.1", "--port", str(port),
            "--no-proxy-headers", "--no-access-log", "middleware_apps:asgi_app",
        ]  # fmt: skip
    if flavour == "wsgi":
        return [
            sys.executable, "-m", "gunicorn", "--chdir", str(APPS),
            "--bind", f"127.0.0.1:{port}", "--workers", "1",
            # trust no proxy, so the middleware (not gunicorn) applies X-Forwarded-Proto
            "--forwarded-allow-ips", "192.0.2.1",
            "middleware_apps:wsgi_app",
        ]  # fmt: skip
    return [sys.executable, str(APPS / "middleware_apps.py"), "aiohttp", str(port)]


@pytest.fixture(params=["asgi", "wsgi", "aiohttp"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    flavour: str = request.param
    port = free_port()
    hits = tmp_path / "hits.txt"
    log = tmp_path / "server.log"
    env = {
        **os.environ,
        "BASTION_TOKEN": TOKEN,
        "BASTION_PATH_BASE": "/shop",
        "MW_HITS_FILE": str(hits),
        "PYTHONPATH": str(REPO),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            server_command(flavour, port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_listening(proc, port, log)
        yield flavour, port, hits
    finally:
        stop(proc)


def request(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "shop.example.com", **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_real_server(server: tuple[str, int, Path], caplog: pytest.LogCaptureFixture) -> None:
    flavour, port, hits = server

    status, body = request(port, "/shop/a?x=1", {})
    assert status == 400 and b"not paired with Bastion" in body
    status, body = request(port, "/shop/a?x=1", {"X-Bastion-Token": "wrong"})
    assert status == 400
    assert not hits.exists(), "the app was reached by an unpaired request"

    status, body = request(port, "/shop/a?x=1", PAIRED)
    assert status == 200, body
    seen = json.loads(body)
    assert hits.read_text().splitlines() == ["/shop/a"]
    assert seen["scheme"] == "https"
    assert seen["client"][0] == "203.0.113.7"
    assert seen["root_path"] == "/shop"
    assert seen["client_cert"] == "TUlJQ2VydA=="
    assert "x-bastion-token" not in seen["headers"]
    assert seen["headers"]["x-original-for"] == "127.0.0.1"
    assert seen["headers"]["x-original-proto"] == "http"
    assert seen["path"] == {"asgi": "/shop/a", "wsgi": "/a", "aiohttp": "/shop/a"}[flavour]
    if flavour == "asgi":
        assert seen["client"] == ["203.0.113.7", 0]
        assert seen["server"] == ["shop.example.com", 8443]
    elif flavour == "wsgi":
        assert seen["client"] == ["203.0.113.7", None]
        assert seen["server"] == ["shop.example.com", "8443"]
    else:
        assert seen["server"][0] == "shop.example.com"
