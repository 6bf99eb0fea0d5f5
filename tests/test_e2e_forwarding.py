"""End to end: real Bastion, real uvicorn / gunicorn apps, real sockets and TLS (trustme).

One Bastion (module-scoped) serves most tests; its apps start on demand:

| app    | server   | hosts                | path     |
|--------|----------|----------------------|----------|
| root   | uvicorn  | 127.0.0.1            | /        |
| api    | uvicorn  | 127.0.0.1            | /api     |
| shop   | uvicorn  | any                  | /shop    |
| exact  | uvicorn  | exact.example.com    | /        |
| wild   | uvicorn  | *.example.com        | /        |
| wsgi   | gunicorn | wsgi.test            | /shop    |
| broken | python   | 127.0.0.1            | /broken  |  (exits at once)

Apps naming a host win over any-host apps (proxy/routing.py), so /shop is reached with a
Host no app names (``shop.test``). A second one (``detailed_errors: true``, ``trusted_proxies: [127.0.0.0/8]``) covers the
settings that change behaviour globally. Clients send from 127.0.0.2 where the client
address matters, so "the app saw the client's IP" cannot be confused with "the app saw
the address of Bastion's own loopback connection" (127.0.0.1).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme
from conftest import tls_config
from harness import BastionProcess, Response, app_command, simple_config

CLIENT = "127.0.0.2"  # a loopback source address distinct from Bastion's own
MiB = 1024 * 1024
BIG = 50 * MiB


def _uvicorn(**extra: Any) -> dict[str, Any]:
    return {"command": app_command("uvicorn", "echo_asgi:app"), **extra}


MAIN_APPS: dict[str, dict[str, Any]] = {
    "root": _uvicorn(hosts=["127.0.0.1"], path="/"),
    "api": _uvicorn(hosts=["127.0.0.1"], path="/api"),
    "shop": _uvicorn(path="/shop"),
    "exact": _uvicorn(hosts=["exact.example.com"], path="/"),
    "wild": _uvicorn(hosts=["*.example.com"], path="/"),
    "wsgi": {"command": app_command("gunicorn", "echo_wsgi:app"), "hosts": ["wsgi.test"],
             "path": "/shop"},
    "broken": {"command": app_command("python", "misbehave.py", "exit-at-once"),
               "hosts": ["127.0.0.1"], "path": "/broken"},
}
WSGI_HOST = "wsgi.test"
SHOP_HOST = "shop.test"  # no app names it: the any-host app at /shop answers


def _start(tmp: Path, config: dict[str, Any], ca: trustme.CA) -> Iterator[BastionProcess]:
    b = BastionProcess(tmp, config, tls_ca=ca)
    try:
        b.start()
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def bastion(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("e2e-main")
    # 50 MB uploads stream through: above the 30m default max_body_size.
    config = simple_config(MAIN_APPS, tls=tls_config(tls_ca, tmp / "tls"),
                           limits={"max_body_size": "64m"})
    yield from _start(tmp, config, tls_ca)


@pytest.fixture(scope="module")
def trusting(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("e2e-trusting")
    config = simple_config(
        {"root": _uvicorn(path="/"),
         "broken": {"command": app_command("python", "misbehave.py", "exit-at-once"),
                    "path": "/broken"}},
        detailed_errors=True, trusted_proxies=["127.0.0.0/8"],
    )
    yield from _start(tmp, config, tls_ca)


# -- client helpers ----------------------------------------------------------------------


def _connection(b: BastionProcess, listener: int, source: str = CLIENT,
                timeout: float = 30.0) -> http.client.HTTPConnection:
    port = b.port(listener)
    if "tls" in b.config["listen"][listener]:
        context = ssl.create_default_context()
        b.tls_ca.configure_trust(context)
        return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context,
                                           source_address=(source, 0))
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))


def call(b: BastionProcess, method: str, path: str, *, listener: int = 0,
         headers: dict[str, str] | list[tuple[str, str]] | None = None,
         body: bytes | None = None, host: str | None = None) -> Response:
    """One request through Bastion from ``CLIENT``; headers may repeat (list form)."""
    conn = _connection(b, listener)
    try:
        conn.putrequest(method, path, skip_host=host is not None, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for name, value in items:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def info(b: BastionProcess, path: str = "/info", **kw: Any) -> dict[str, Any]:
    """What the echo app saw, asserting a 200."""
    r = call(b, kw.pop("method", "GET"), path, **kw)
    assert r.status == 200, (r.status, r.body[:500], b.log()[-2000:])
    data: dict[str, Any] = r.json()
    return data


def seen_headers(data: dict[str, Any]) -> dict[str, list[str]]:
    """The app's request headers, lower-case names, values in order."""
    out: dict[str, list[str]] = {}
    for name, value in data["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def app_port(b: BastionProcess, app: str) -> int:
    procs = [p for p in b.status()["apps"][app]["processes"] if p["state"] == "ready"]
    assert procs, b.status()["apps"][app]
    return int(procs[0]["port"])


# -- 1. GET, POST, HEAD over HTTP and HTTPS, uvicorn and gunicorn -------------------------

FLAVOURS = {
    # name: (Host header, path prefix, flavour the app reports)
    "uvicorn": (None, "", "asgi"),
    "gunicorn": (WSGI_HOST, "/shop", "wsgi"),
}


@pytest.mark.parametrize("listener", [0, 1], ids=["http", "https"])
@pytest.mark.parametrize("server", sorted(FLAVOURS))
def test_get_and_post(bastion: BastionProcess, server: str, listener: int) -> None:
    host, prefix, flavour = FLAVOURS[server]
    got = info(bastion, f"{prefix}/info?x=1&y=%20z", listener=listener, host=host)
    assert got["flavour"] == flavour
    assert got["method"] == "GET"
    assert got["query"] == "x=1&y=%20z"
    assert got["body"] == ""

    payload = b"name=bastion&data=" + bytes(range(32, 127)) * 10
    r = call(bastion, "POST", f"{prefix}/echo", listener=listener, host=host, body=payload,
             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 200, r.body[:300]
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    assert got["flavour"] == flavour
    assert got["method"] == "POST"
    assert got["body"].encode("latin-1") == payload
    assert int(r.headers["content-length"]) == len(r.body)


def _raw_exchange(b: BastionProcess, listener: int, request: bytes) -> bytes:
    """Send raw bytes (from CLIENT) and read until the server closes: everything it sent."""
    sock = socket.create_connection(("127.0.0.1", b.port(listener)), timeout=15,
                                    source_address=(CLIENT, 0))
    if "tls" in b.config["listen"][listener]:
        context = ssl.create_default_context()
        b.tls_ca.configure_trust(context)
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        return data


@pytest.mark.parametrize("listener", [0, 1], ids=["http", "https"])
@pytest.mark.parametrize("server", sorted(FLAVOURS))
def test_head_gives_headers_and_no_body(bastion: BastionProcess, server: str,
                                        listener: int) -> None:
    host, prefix, _ = FLAVOURS[server]
    host = host or "127.0.0.1"
    get = call(bastion, "GET", f"{prefix}/info", listener=listener, host=host)
    assert get.status == 200
    # Raw bytes, with the connection closed after the answer: http.client would hide a
    # body sent after a HEAD response, a raw read does not.
    raw = _raw_exchange(bastion, listener,
                        f"HEAD {prefix}/info HTTP/1.1\r\nHost: {host}\r\n"
                        "Connection: close\r\n\r\n".encode())
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:500]
    assert head.startswith(b"HTTP/1.1 200"), head
    headers = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
               for line in head.split(b"\r\n")[1:]}
    assert headers[b"content-type"] == b"application/json"
    # The HEAD answer announces the length a GET would have (method name differs by 1).
    assert abs(int(headers[b"content-length"]) - len(get.body)) <= 1
    assert rest == b"", rest[:200]


# -- 2. 50 MB both ways with flat memory ----------------------------------------------------


class PeakRSS:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _upload(b: BastionProcess, path: str, host: str, size: int) -> tuple[dict[str, Any], str]:
    """POST ``size`` bytes streamed from a generator; the app's answer and our sha256."""
    block = os.urandom(MiB)
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < size:
            part = block[: min(MiB, size - sent)]
            digest.update(part)
            sent += len(part)
            yield part

    conn = _connection(b, 0, timeout=60)
    try:
        conn.request("POST", path, body=body(),
                     headers={"Host": host, "Content-Length": str(size),
                              "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        answer = resp.read()
        assert resp.status == 200, answer[:300]
        return json.loads(answer), digest.hexdigest()
    finally:
        conn.close()


def _download(b: BastionProcess, path: str, host: str) -> tuple[int, str, str | None]:
    """GET ``path`` reading 64 KiB at a time; byte count, sha256, Content-Length."""
    conn = _connection(b, 0, timeout=60)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        assert resp.status == 200
        digest = hashlib.sha256()
        count = 0
        while chunk := resp.read(65536):
            digest.update(chunk)
            count += len(chunk)
        return count, digest.hexdigest(), resp.getheader("Content-Length")
    finally:
        conn.close()


def _sha_of_repeated(byte: bytes, size: int) -> str:
    digest = hashlib.sha256()
    block = byte * MiB
    for start in range(0, size, MiB):
        digest.update(block[: min(MiB, size - start)])
    return digest.hexdigest()


MEMORY_CASES = {
    "uvicorn": ("127.0.0.1", "", b"x"),
    "gunicorn": (WSGI_HOST, "/shop", b"y"),
}


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_50mb_up_and_down_with_flat_memory(bastion: BastionProcess, server: str) -> None:
    host, prefix, filler = MEMORY_CASES[server]
    # Warm-up: the app is running, and Bastion has streamed both ways once.
    _upload(bastion, f"{prefix}/upload", host, 2 * MiB)
    _download(bastion, f"{prefix}/download?size={2 * MiB}", host)
    before = psutil.Process(bastion.pid).memory_info().rss

    started = time.monotonic()
    with PeakRSS(bastion.pid) as up_rss:
        answer, sha = _upload(bastion, f"{prefix}/upload", host, BIG)
    up_time = time.monotonic() - started
    assert answer == {"size": BIG, "sha256": sha}

    started = time.monotonic()
    with PeakRSS(bastion.pid) as down_rss:
        count, sha, length = _download(bastion, f"{prefix}/download?size={BIG}", host)
    down_time = time.monotonic() - started
    assert length == str(BIG)
    assert count == BIG
    assert sha == _sha_of_repeated(filler, BIG)

    up_growth = up_rss.peak - before
    down_growth = down_rss.peak - before
    print(f"\n[memory {server}] Bastion RSS before {before / MiB:.1f} MiB; "
          f"50 MiB upload: peak {up_rss.peak / MiB:.1f} MiB (+{up_growth / MiB:.1f} MiB, "
          f"{up_rss.samples} samples, {up_time:.2f}s); "
          f"50 MiB download: peak {down_rss.peak / MiB:.1f} MiB (+{down_growth / MiB:.1f} MiB, "
          f"{down_rss.samples} samples, {down_time:.2f}s)")
    assert up_rss.samples >= 2 and down_rss.samples >= 2
    assert up_growth < 16 * MiB
    assert down_growth < 16 * MiB


# -- 3. what the app sees ------------------------------------------------------------------


@pytest.mark.parametrize("listener", [0, 1], ids=["http", "https"])
def test_asgi_app_sees_scheme_client_root_path(bastion: BastionProcess, listener: int) -> None:
    scheme = ["http", "https"][listener]
    got = info(bastion, "/shop/info?q=1", listener=listener, host=SHOP_HOST,
               headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "gopher"})
    assert got["app"] == "shop"
    assert got["scheme"] == scheme
    assert got["client"] == CLIENT
    assert got["root_path"] == "/shop"
    assert got["path"] == "/shop/info"
    assert got["query"] == "q=1"
    headers = seen_headers(got)
    assert headers["x-forwarded-for"] == [CLIENT]
    assert headers["x-forwarded-proto"] == [scheme]
    assert headers["x-forwarded-prefix"] == ["/shop"]
    assert "x-bastion-token" not in headers
    assert "6.6.6.6" not in json.dumps(got)


@pytest.mark.parametrize("listener", [0, 1], ids=["http", "https"])
def test_wsgi_app_sees_scheme_client_script_name(bastion: BastionProcess, listener: int) -> None:
    scheme = ["http", "https"][listener]
    got = info(bastion, "/shop/deep/info?q=2", listener=listener, host=WSGI_HOST,
               headers={"X-Forwarded-For": "6.6.6.6"})
    assert got["flavour"] == "wsgi"
    assert got["scheme"] == scheme
    assert got["client"] == CLIENT
    assert got["script_name"] == "/shop"
    assert got["path_info"] == "/deep/info"
    assert got["query"] == "q=2"
    headers = seen_headers(got)
    assert headers["x-forwarded-for"] == [CLIENT]
    assert headers["x-forwarded-prefix"] == ["/shop"]
    assert "x-bastion-token" not in headers
    assert "6.6.6.6" not in json.dumps(got)


def test_app_environment(bastion: BastionProcess) -> None:
    got = info(bastion, "/shop/info", host=SHOP_HOST)
    assert got["token_set"] is True
    assert got["path_base"] == "/shop"
    assert got["port"] == got["env_port"] == str(app_port(bastion, "shop"))
    root = info(bastion, "/info")
    assert root["app"] == "root"
    assert root["path_base"] == ""
    assert root["root_path"] == ""


# -- 4. the app's own port refuses requests without the token --------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef"])
def test_direct_request_without_token_never_reaches_app(bastion: BastionProcess,
                                                        token: str | None) -> None:
    before = call(bastion, "GET", "/count").json()["count"]
    port = app_port(bastion, "root")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"X-Bastion-Token": token} if token else {}
        conn.request("GET", "/info", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 400, body[:300]
    assert b"flavour" not in body
    after = call(bastion, "GET", "/count").json()["count"]
    # Only our second /count reached app code.
    assert after == before + 1


# -- 5. header hygiene -----------------------------------------------------------------------


def test_header_hygiene(bastion: BastionProcess) -> None:
    got = info(bastion, "/info", host="127.0.0.1:" + str(bastion.port()), headers=[
        ("X-Bastion-Evil", "1"),
        ("X-Bastion-Token", "forged"),
        ("X_Forwarded_For", "1.2.3.4"),
        ("Connection", "close, X-Drop-Me"),
        ("X-Drop-Me", "1"),
        ("Forwarded", "for=9.9.9.9"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Forwarded-Port", "1"),
        ("X-Keep-Me", "kept"),
    ])
    headers = seen_headers(got)
    for name in ("x-bastion-evil", "x-bastion-token", "x_forwarded_for", "x-drop-me",
                 "forwarded", "connection"):
        assert name not in headers, (name, headers)
    dump = json.dumps(got)
    for value in ("1.2.3.4", "9.9.9.9", "evil.test", "forged"):
        assert value not in dump
    assert headers["x-keep-me"] == ["kept"]
    assert headers["x-forwarded-for"] == [CLIENT]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == [f"127.0.0.1:{bastion.port()}"]
    assert headers["x-forwarded-port"] == [str(bastion.port())]
    assert headers["host"] == [f"127.0.0.1:{bastion.port()}"]
    assert "x-forwarded-prefix" not in headers  # the root app's base is "/"


def test_forwarded_port_is_the_listener_reached(bastion: BastionProcess) -> None:
    got = info(bastion, "/info", listener=1)
    headers = seen_headers(got)
    assert headers["x-forwarded-port"] == [str(bastion.port(1))]
    assert headers["x-forwarded-proto"] == ["https"]


# -- 6. routing -------------------------------------------------------------------------------

INTERNALS = ("uvicorn", "gunicorn", "echo_asgi", "echo_wsgi", "misbehave", "tests/apps",
             "Traceback", "python", "exact.example.com", "wsgi.test")


def _assert_no_internals(b: BastionProcess, body: bytes) -> None:
    text = body.decode("utf-8", "replace")
    for word in INTERNALS:
        assert word.lower() not in text.lower(), word
    for proc in b.descendants():
        assert str(proc.pid) not in text
    for app in b.status()["apps"].values():
        for proc in app["processes"]:
            assert f":{proc['port']}" not in text


@pytest.mark.parametrize(("host", "path"), [
    ("nowhere.test", "/"),
    ("nowhere.test", "/info"),
    ("example.com", "/info"),  # *.example.com does not cover example.com itself
    ("nowhere.test", "/shopping"),
])
def test_404_without_app(bastion: BastionProcess, host: str, path: str) -> None:
    r = call(bastion, "GET", path, host=host)
    assert r.status == 404
    assert r.headers["content-type"].startswith("text/html")
    assert b"<html" in r.body.lower() and b"404" in r.body
    _assert_no_internals(bastion, r.body)


@pytest.mark.parametrize(("host", "path", "app"), [
    ("exact.example.com", "/info", "exact"),
    ("Exact.Example.COM", "/info", "exact"),
    ("exact.example.com:PORT", "/info", "exact"),
    ("www.example.com", "/info", "wild"),
    ("shop.example.com", "/info", "wild"),
    (WSGI_HOST, "/shop/info", "wsgi"),
    ("127.0.0.1", "/api", "api"),
    ("127.0.0.1", "/api/x", "api"),
    ("127.0.0.1", "/api/x/y?z=1", "api"),
    ("127.0.0.1", "/apix", "root"),
    ("127.0.0.1", "/ap", "root"),
    (SHOP_HOST, "/shop", "shop"),
    (SHOP_HOST, "/shop/", "shop"),
])
def test_routing(bastion: BastionProcess, host: str, path: str, app: str) -> None:
    host = host.replace("PORT", str(bastion.port()))
    got = info(bastion, path, host=host)
    if app == "wsgi":  # echo_wsgi reports no app name
        assert (got["flavour"], got["script_name"] + got["path_info"]) == ("wsgi", path)
    else:
        assert got["app"] == app
        assert got["path"] == path.split("?")[0]
    headers = seen_headers(got)
    assert headers["host"] == [host]
    assert headers["x-forwarded-host"] == [host]


# -- 7. error pages ---------------------------------------------------------------------------


def test_502_page_hides_app_output(bastion: BastionProcess) -> None:
    r = call(bastion, "GET", "/broken/")
    assert r.status == 502, r.body[:300]
    assert r.headers["content-type"].startswith("text/html")
    assert b"broken" in r.body  # the page names the app
    assert b"giving up at once" not in r.body
    assert b"misbehave" not in r.body


def test_502_page_with_detailed_errors_shows_app_output(trusting: BastionProcess) -> None:
    r = call(trusting, "GET", "/broken/")
    assert r.status == 502, r.body[:300]
    assert r.headers["content-type"].startswith("text/html")
    assert b"broken" in r.body
    assert b"giving up at once" in r.body


# -- 8. trusted proxies ----------------------------------------------------------------------


def test_trusted_proxy_chain_is_kept_and_extended(trusting: BastionProcess) -> None:
    got = info(trusting, "/info", headers={"X-Forwarded-For": "6.6.6.6"})
    headers = seen_headers(got)
    assert headers["x-forwarded-for"] == [f"6.6.6.6, {CLIENT}"]


def test_untrusted_client_chain_is_replaced(bastion: BastionProcess) -> None:
    got = info(bastion, "/info", headers={"X-Forwarded-For": "6.6.6.6"})
    assert seen_headers(got)["x-forwarded-for"] == [CLIENT]


@pytest.mark.parametrize("listener", [0, 1], ids=["http", "https"])
@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_chunked_upload_streams_through(bastion: BastionProcess, server: str,
                                        listener: int) -> None:
    host, prefix, _ = MEMORY_CASES[server]
    blocks = [os.urandom(100_000) for _ in range(30)]
    conn = _connection(bastion, listener)
    try:
        # No Content-Length: http.client sends the generator with chunked encoding.
        conn.request("POST", f"{prefix}/upload", body=iter(blocks), headers={"Host": host},
                     encode_chunked=True)
        resp = conn.getresponse()
        answer = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, answer[:300]
    whole = b"".join(blocks)
    assert json.loads(answer) == {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}
