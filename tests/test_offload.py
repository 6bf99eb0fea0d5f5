"""Offload end to end: a real Bastion in front of real gunicorn apps, over HTTP/1.1, TLS
and HTTP/2. Compression of app responses (``pools.NAME.compression``) and buffering of
slow clients (``pools.NAME.buffering``, ``limits.buffer_memory``)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import socket
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import brotli
import pytest
import trustme
from conftest import tls_config
from harness import APPS, BastionProcess, app_command, free_port, wait_until
from test_http2 import H2Client

sys.path.insert(0, str(APPS))
from offload_wsgi import html  # noqa: E402

PROTOCOLS = ("h1", "tls", "h2")


def gunicorn(*extra: str) -> list[str]:
    return app_command("gunicorn", "offload_wsgi:app", "--workers", "1", *extra)


# -- compression ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("offload")
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}"},
                   {"address": f"127.0.0.1:{free_port()}", "tls": tls_config(tls_ca, tmp / "tls")}],
        "pools": {"plain": {"compression": "off"}},
        "apps": {"shop": {"command": gunicorn(), "path": "/"},
                 "raw": {"command": gunicorn(), "path": "/raw", "pool": "plain"}},
    }
    with BastionProcess(tmp, config, tls_ca=tls_ca) as proc:
        assert proc.get("/fast").status == 200
        assert proc.get("/raw/fast").status == 200
        yield proc


def fetch(proc: BastionProcess, protocol: str, path: str, accept: str | None = "gzip",
          method: str = "GET", ca: trustme.CA | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names, values joined) and the body as received."""
    headers = {} if accept is None else {"Accept-Encoding": accept}
    if protocol == "h2":
        assert ca is not None
        client = H2Client(proc.port(1), ca)
        try:
            resp = client.get(path, headers=list(headers.items())) if method == "GET" else \
                client.wait(client.start(method, path, headers=list(headers.items())))[0]
        finally:
            client.close()
        fields: dict[str, str] = {}
        for name, value in resp["headers"]:
            key = name.decode().lower()
            fields[key] = fields[key] + ", " + value.decode() if key in fields else value.decode()
        return resp["status"], fields, bytes(resp["body"])
    resp = proc.request(method, path, headers=headers, listener=1 if protocol == "tls" else 0)
    return resp.status, resp.headers, resp.body


def decoded(headers: dict[str, str], body: bytes) -> bytes:
    coding = headers.get("content-encoding")
    if coding == "gzip":
        return gzip.decompress(body)
    if coding == "br":
        return bytes(brotli.decompress(body))
    return body


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("path", "accept", "coding", "vary"), [
    ("/page?size=20000", "gzip", "gzip", True),  # small: compressed whole, with a length
    ("/page?size=300000", "gzip, deflate", "gzip", True),  # streamed
    ("/chunked?size=300000", "gzip", "gzip", True),  # no length from the app
    ("/page?size=300000", "gzip;q=0.5, br", "br", True),
    ("/page?size=20000", "br;q=0, gzip;q=0", None, True),  # q=0: as it is, still Vary
    ("/page?size=20000", None, None, True),  # no Accept-Encoding
    ("/page?size=500", "gzip", None, False),  # below min_size
    ("/image?size=20000", "gzip", None, False),  # not a listed type
    ("/notransform?size=20000", "gzip", None, False),
    ("/raw/page?size=20000", "gzip", None, False),  # the pool has compression off
])
def test_compression(site: BastionProcess, tls_ca: trustme.CA, protocol: str, path: str,
                     accept: str | None, coding: str | None, vary: bool) -> None:
    status, headers, body = fetch(site, protocol, path, accept, ca=tls_ca)
    assert status == 200
    assert headers.get("content-encoding") == coding
    assert ("accept-encoding" in headers.get("vary", "").lower()) is vary
    size = int(path.split("size=")[1])
    expected = html(size) if "image" not in path else None
    data = decoded(headers, body)
    assert len(data) == size and (expected is None or data == expected)
    if coding is not None:
        assert len(body) < size // 3
        if "content-length" in headers:
            assert int(headers["content-length"]) == len(body)
        else:
            assert protocol == "h2" or headers.get("transfer-encoding") == "chunked"
        assert size > 20000 or "content-length" in headers  # a held body keeps a length


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_app_that_encodes_itself(site: BastionProcess, tls_ca: trustme.CA,
                                 protocol: str) -> None:
    status, headers, body = fetch(site, protocol, "/encoded?size=50000", "gzip, br", ca=tls_ca)
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == html(50000)  # encoded once, by the app


def test_head_gets_the_head_of_a_get(site: BastionProcess) -> None:
    status, headers, body = fetch(site, "h1", "/page?size=20000", "gzip", method="HEAD")
    assert status == 200 and body == b""
    assert headers["content-encoding"] == "gzip" and "content-length" not in headers
    assert "accept-encoding" in headers["vary"].lower()


def test_etag_weakened_and_vary_merged(site: BastionProcess) -> None:
    _, headers, body = fetch(site, "h1", "/page?size=20000&etag=1&vary=1", "gzip")
    assert headers["etag"] == 'W/"v1"'
    assert headers["vary"] == "Cookie, Accept-Encoding"
    assert "accept-ranges" not in headers
    _, plain, _ = fetch(site, "h1", "/page?size=20000&etag=1", None)
    assert plain["etag"] == '"v1"'  # not compressed: the app's own


def raw_get(port: int, path: str, accept: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: {accept}\r\n"
                 "Connection: close\r\n\r\n".encode())
    return sock


def test_streamed_response_stays_streamed(site: BastionProcess) -> None:
    # The app sends three parts one second apart: each is decodable on arrival.
    sock = raw_get(site.port(), "/stream?gap=1", "gzip")
    started = time.monotonic()
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, rest = received.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head.lower()
    decoder = zlib.decompressobj(31)
    text = b""
    buffer = rest
    seen: dict[int, float] = {}
    while len(seen) < 3:
        # undo the chunked framing of what we have so far
        while True:
            line, sep, tail = buffer.partition(b"\r\n")
            if not sep:
                break
            size = int(line, 16)
            if len(tail) < size + 2:
                break
            text += decoder.decompress(tail[:size])
            buffer = tail[size + 2:]
        for i in range(3):
            if i not in seen and b"part %d" % i in text:
                seen[i] = time.monotonic() - started
        if len(seen) < 3:
            data = sock.recv(65536)
            assert data, "closed early"
            buffer += data
    sock.close()
    assert seen[0] < seen[2] - 1.0  # the first part was there before the last was made


def test_event_stream_not_compressed_by_default(site: BastionProcess) -> None:
    _, headers, body = fetch(site, "h1", "/events?gap=0.05", "gzip")
    assert "content-encoding" not in headers
    assert b"data: part 2" in body


# -- buffering of slow clients -------------------------------------------------------------
# A response far bigger than what loopback sockets hold on their own (a few MiB each way).
BIG = 24 * 1024 * 1024


@pytest.fixture(scope="module")
def slow_site(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[BastionProcess]:
    """One gunicorn sync worker per app: ``/on`` buffered, ``/off`` not."""
    tmp = tmp_path_factory.mktemp("slow")
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}"},
                   {"address": f"127.0.0.1:{free_port()}", "tls": tls_config(tls_ca, tmp / "tls")}],
        "limits": {"buffer_memory": "128m"},
        "pools": {"buffered": {"buffering": {"request": "4m", "response": "64m"}},
                  "streamed": {"buffering": "off"}},
        "apps": {"on": {"command": gunicorn("--timeout", "60"), "path": "/on",
                        "pool": "buffered"},
                 "off": {"command": gunicorn("--timeout", "60"), "path": "/off",
                         "pool": "streamed"}},
    }
    with BastionProcess(tmp, config, tls_ca=tls_ca) as proc:
        assert proc.get("/on/fast").status == 200
        assert proc.get("/off/fast").status == 200
        yield proc


def slow_reader(port: int, path: str) -> socket.socket:
    """A client that asks for ``path`` and reads nothing for now."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    return sock


def slow_uploader(port: int, path: str, body: bytes) -> socket.socket:
    """A client that sends a head and the first 64 KiB of ``body``, then waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
                 "\r\n".encode() + body[:65536])
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    sock.close()
    return data


def fast_answer(proc: BastionProcess, path: str, within: float) -> float | None:
    """Seconds a fast client waited for ``path``, or None when not answered ``within``."""
    conn = http.client.HTTPConnection("127.0.0.1", proc.port(), timeout=within)
    started = time.monotonic()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"fast"
        return time.monotonic() - started
    except TimeoutError:
        return None
    finally:
        conn.close()


def metrics(proc: BastionProcess) -> dict[str, float]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(proc.config["admin_socket"])
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bastion\r\nConnection: close\r\n\r\n")
    text = read_all(sock).partition(b"\r\n\r\n")[2].decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("bastion_buffer"):
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


@pytest.mark.parametrize("buffered", [True, False], ids=["buffering-on", "buffering-off"])
def test_slow_readers(slow_site: BastionProcess, buffered: bool) -> None:
    base = "/on" if buffered else "/off"
    readers = [slow_reader(slow_site.port(), f"{base}/image?size={BIG}") for _ in range(2)]
    try:
        time.sleep(0.5)  # the app has started on the first
        waited = fast_answer(slow_site, f"{base}/fast", within=3.0)
        if buffered:
            # The app gave both answers to Bastion at once and was free for this one.
            assert waited is not None and waited < 2.0
            assert metrics(slow_site)["bastion_buffered_bytes"] > 0
        else:
            assert waited is None  # the single sync worker is held by a slow reader
    finally:
        bodies = [read_all(sock) for sock in readers]
    for data in bodies:  # every slow reader gets its whole answer in the end
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == BIG
    assert fast_answer(slow_site, f"{base}/fast", within=10.0) is not None
    if buffered:
        assert metrics(slow_site)["bastion_buffered_bytes"] == 0  # all given back


@pytest.mark.parametrize("buffered", [True, False], ids=["buffering-on", "buffering-off"])
def test_slow_uploaders(slow_site: BastionProcess, buffered: bool) -> None:
    base = "/on" if buffered else "/off"
    body = bytes(range(256)) * 2048  # 512 KiB
    uploads = [slow_uploader(slow_site.port(), f"{base}/upload", body) for _ in range(2)]
    try:
        time.sleep(0.5)
        waited = fast_answer(slow_site, f"{base}/fast", within=3.0)
        if buffered:
            assert waited is not None and waited < 2.0  # no app process is held by them
        else:
            assert waited is None  # the app reads the first upload as it comes
    finally:
        for sock in uploads:
            sock.sendall(body[65536:])
        answers = [read_all(sock) for sock in uploads]
    for data in answers:
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(payload) == {"size": len(body),
                                       "sha256": hashlib.sha256(body).hexdigest()}


def test_pipelined_answers_both_buffered(slow_site: BastionProcess) -> None:
    # Two answers pipelined on one connection that reads nothing: the second starts
    # while the first still fills the client's buffer, and is held within the budget too
    # (not read from the app without any account).
    size = 8 * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", slow_site.port()), timeout=30)
    ask = f"GET /on/image?size={size} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    try:
        sock.sendall(ask + ask.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        assert wait_until(lambda: metrics(slow_site)["bastion_buffered_bytes"] > size, 5.0)
    finally:
        data = read_all(sock)
    assert data.count(b"HTTP/1.1 200") == 2 and len(data) > 2 * size
    assert wait_until(lambda: metrics(slow_site)["bastion_buffered_bytes"] == 0, 5.0)


def test_slow_reader_over_h2(slow_site: BastionProcess, tls_ca: trustme.CA) -> None:
    # An HTTP/2 client that reads nothing: its stream window closes, Bastion buffers.
    client = H2Client(slow_site.port(1), tls_ca)
    try:
        client.start("GET", f"/on/image?size={BIG}")
        time.sleep(0.5)
        waited = fast_answer(slow_site, "/on/fast", within=3.0)
        assert waited is not None and waited < 2.0
    finally:
        client.close()


def test_cap_reached_still_served(tmp_path: Path) -> None:
    # A worker may hold 128 KiB in all: an 8 MiB answer to a slow reader goes on
    # streamed, and so does an upload.
    cap = 128 * 1024
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}"}],
        "limits": {"buffer_memory": cap},
        "pools": {"default": {"buffering": {"request": "4m", "response": "16m"}}},
        "apps": {"on": {"command": gunicorn(), "path": "/on"}},
    }
    with BastionProcess(tmp_path, config) as proc:
        assert proc.get("/on/fast").status == 200
        reader = slow_reader(proc.port(), f"/on/image?size={BIG}")
        time.sleep(0.5)
        figures = metrics(proc)
        assert figures["bastion_buffer_cap_bytes"] == cap
        assert figures["bastion_buffer_cap_reached_total"] >= 1
        assert figures["bastion_buffered_bytes_peak"] <= cap
        data = read_all(reader)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == BIG
        upload = bytes(200) * 4096  # 800 KiB: more than the cap, streamed beyond it
        answer = proc.request("POST", "/on/upload", body=upload)
        assert answer.status == 200 and answer.json()["size"] == len(upload)
        after = metrics(proc)
        assert after["bastion_buffer_cap_reached_total"] > figures["bastion_buffer_cap_reached_total"]
        assert after["bastion_buffered_bytes"] == 0 and after["bastion_buffered_bytes_peak"] <= cap



def test_slow_uploader_over_h2(slow_site: BastionProcess, tls_ca: trustme.CA) -> None:
    # An HTTP/2 upload that stalls after 256 KiB (beyond the 64 KiB every request gets
    # before the app is asked): buffered, the app is not asked yet.
    body = bytes(range(256)) * 2048  # 512 KiB
    first = 256 * 1024
    client = H2Client(slow_site.port(1), tls_ca)
    try:
        sid = client.start("POST", "/on/upload", headers=[("content-length", str(len(body)))],
                           end=False)
        sent = 0
        while sent < first:
            window = min(client.conn.local_flow_control_window(sid),
                         client.conn.max_outbound_frame_size, first - sent)
            if window <= 0:
                client.pump()
                continue
            client.conn.send_data(sid, body[sent:sent + window])
            client.flush()
            sent += window
        time.sleep(0.5)
        waited = fast_answer(slow_site, "/on/fast", within=3.0)
        assert waited is not None and waited < 2.0
        client.send_body(sid, body[first:])
        answer = client.wait(sid)[0]
    finally:
        client.close()
    assert answer["status"] == 200
    assert json.loads(bytes(answer["body"])) == {"size": len(body),
                                                 "sha256": hashlib.sha256(body).hexdigest()}
