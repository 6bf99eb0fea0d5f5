"""Static files and X-Accel-Redirect through a real Bastion, over HTTP/1.1, TLS and HTTP/2.

One Bastion (a plain and a TLS listener) serves a directory tree at ``/static`` and an
internal location at ``/protected``, beside three real apps: a Django view using
django-sendfile2's nginx backend, a Flask view setting ``X-Accel-Redirect`` itself, and
a plain app. One real nginx serves the same tree, and the conditional and range answers
of both are compared header for header. Raw sockets send the traversal corpus exactly
as written (no client normalises it).
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme
import yaml
from conftest import ca_pem_path, tls_config
from harness import BastionProcess, app_command, free_port, wait_port

SECRET = b"SECRET-OUTSIDE-ROOT"
BIG = 3 * 1024 * 1024 + 12345  # above SMALL: streamed (sendfile / pread)
HUGE = 96 * 1024 * 1024  # for the flat-memory check
CSS = b"body { color: red; }\n" * 200


def make_tree(base: Path) -> dict[str, Path]:
    """The served tree, a secret beside it, and the protected (internal) tree."""
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_bytes(b"hello static\n")
    (root / "sub" / "index.html").write_bytes(b"<p>index</p>\n")
    (root / "page.html").write_bytes(b"<html>page</html>\n" * 100)
    (root / "style.css").write_bytes(CSS)
    (root / "style.css.gz").write_bytes(gzip.compress(CSS))
    (root / "style.css.br").write_bytes(b"BROTLI-ENCODED-BYTES")
    (root / "space name.txt").write_bytes(b"spaced\n")
    (root / "%2e%2e").write_bytes(b"a file with an odd name\n")
    (root / "big.bin").write_bytes(os.urandom(BIG))
    with open(root / "huge.bin", "wb") as f:
        block = os.urandom(1024 * 1024)
        for _ in range(HUGE // len(block)):
            f.write(block)
    (base / "secret.txt").write_bytes(SECRET)
    (base / "outside").mkdir()
    (base / "outside" / "secret.txt").write_bytes(SECRET)
    os.symlink(base / "secret.txt", root / "escape")
    os.symlink(base / "outside", root / "escape-dir")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("a.txt", root / "inner-link")
    os.mkfifo(root / "fifo")
    protected = base / "protected"
    protected.mkdir()
    (protected / "report.pdf").write_bytes(b"%PDF-1.4 report " * 5000)
    (protected / "doc one.txt").write_bytes(b"document one\n")
    return {"root": root, "protected": protected, "base": base}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tree(tmp_path_factory.mktemp("static"))


@pytest.fixture(scope="module")
def bastion(tree: dict[str, Path], ca: trustme.CA,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("static-bastion")
    config: dict[str, Any] = {
        "listen": [{"address": f"127.0.0.1:{free_port()}"},
                   {"address": f"127.0.0.1:{free_port()}",
                    "tls": tls_config(ca, tmp / "tls")}],
        "apps": {
            "django": {"path": "/dj", "environment": {"SENDFILE_ROOT": str(tree["protected"])},
                       "command": app_command("gunicorn", "accel_django:app", "--workers", "1")},
            "flask": {"path": "/fl",
                      "command": app_command("gunicorn", "accel_flask:app", "--workers", "1")},
            "plain": {"path": "/app", "command": app_command("python", "plain_app.py", "{port}")},
        },
        "static": {
            "files": {"path": "/static", "root": str(tree["root"]), "index": "index.html",
                      "precompressed": True, "cache_control": "public, max-age=60"},
            "protected": {"path": "/protected", "root": str(tree["protected"]),
                          "internal": True},
        },
    }
    with BastionProcess(tmp, config, tls_ca=ca) as proc:
        yield proc


# -- clients ---------------------------------------------------------------------------
class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes,
                 raw_head: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head


def raw_request(port: int, target: str, headers: dict[str, str] | None = None,
                method: str = "GET", ca: trustme.CA | None = None,
                body: bytes = b"") -> Answer:
    """One request written byte for byte, on a new connection (TLS with ``ca``)."""
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=20)
    if ca is not None:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    first, *fields = head.decode("latin-1").split("\r\n")
    parsed: dict[str, str] = {}
    for line in fields:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        parsed[key] = parsed[key] + ", " + value.strip() if key in parsed else value.strip()
    return Answer(int(first.split()[1]), parsed, rest, head.decode("latin-1"))


def curl_h2(bastion: BastionProcess, tree: dict[str, Path], target: str,
            *args: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/2 request with curl over TLS: status, headers, body."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    ca_file = ca_pem_path(bastion.tls_ca, tree["base"] / "ca")
    done = subprocess.run(
        ["curl", "-s", "--http2", "--path-as-is", "--cacert", str(ca_file), "-D", "-",
         *args, f"https://127.0.0.1:{bastion.port(1)}{target}"],
        capture_output=True, timeout=60)
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    first, *fields = head.decode("latin-1").split("\r\n")
    assert first.startswith("HTTP/2"), first
    headers = {}
    for line in fields:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(first.split()[1]), headers, body


# -- basic answers -----------------------------------------------------------------------
def test_small_file(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    got = raw_request(bastion.port(), "/static/a.txt")
    assert got.status == 200
    assert got.body == b"hello static\n"
    assert got.headers["content-type"] == "text/plain"
    assert got.headers["content-length"] == "13"
    assert got.headers["cache-control"] == "public, max-age=60"
    assert got.headers["accept-ranges"] == "bytes"
    info = os.stat(tree["root"] / "a.txt")
    assert got.headers["etag"] == f'"{int(info.st_mtime):x}-{info.st_size:x}"'
    assert got.headers["last-modified"].endswith(" GMT")
    assert got.headers["server"] == "bastion"
    assert abs(email.utils.parsedate_to_datetime(got.headers["date"]).timestamp()
               - time.time()) < 5


def test_keep_alive_serves_several(bastion: BastionProcess) -> None:
    with socket.create_connection(("127.0.0.1", bastion.port()), timeout=10) as sock:
        request = b"GET /static/a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request * 3)
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"hello static\n") < 3 and time.monotonic() < deadline:
            data += sock.recv(65536)
    assert data.count(b"HTTP/1.1 200 OK") == 3


def test_keep_alive_after_sendfile(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    # Two large files (sent with sendfile beside the transport), then a small one, on one
    # pipelined connection: each arrives whole and in order.
    expected = (tree["root"] / "big.bin").read_bytes()
    with socket.create_connection(("127.0.0.1", bastion.port()), timeout=20) as sock:
        sock.sendall(b"GET /static/big.bin HTTP/1.1\r\nHost: x\r\n\r\n" * 2
                     + b"GET /static/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
    bodies = []
    for _ in range(3):
        head, _, data = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        bodies.append(data[:length])
        data = data[length:]
    assert bodies == [expected, expected, b"hello static\n"] and data == b""


def test_head(bastion: BastionProcess) -> None:
    got = raw_request(bastion.port(), "/static/big.bin", method="HEAD")
    assert got.status == 200
    assert got.headers["content-length"] == str(BIG)
    assert got.body == b""


def test_other_methods(bastion: BastionProcess) -> None:
    got = raw_request(bastion.port(), "/static/a.txt", method="POST", body=b"x")
    assert got.status == 405
    assert got.headers["allow"] == "GET, HEAD"


def test_index_redirect_and_no_listing(bastion: BastionProcess) -> None:
    got = raw_request(bastion.port(), "/static/sub/")
    assert (got.status, got.body) == (200, b"<p>index</p>\n")
    assert got.headers["content-type"] == "text/html"
    got = raw_request(bastion.port(), "/static/sub?x=1")
    assert got.status == 301
    assert got.headers["location"] == "/static/sub/?x=1"
    got = raw_request(bastion.port(), "/static/empty/")
    assert got.status == 403
    got = raw_request(bastion.port(), "/static/")
    assert got.status == 403
    assert b"a.txt" not in got.body
    got = raw_request(bastion.port(), "/static")
    assert (got.status, got.headers["location"]) == (301, "/static/")


def test_odd_names(bastion: BastionProcess) -> None:
    assert raw_request(bastion.port(), "/static/space%20name.txt").body == b"spaced\n"
    got = raw_request(bastion.port(), "/static/%252e%252e")  # the file called "%2e%2e"
    assert got.body == b"a file with an odd name\n"
    got = raw_request(bastion.port(), "/static/inner-link")  # a link inside the root
    assert got.body == b"hello static\n"


def test_changed_file_is_seen(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    # Small files are kept in memory briefly (static.SmallFiles.VALID = 1 s), no longer.
    name = tree["root"] / "changing.txt"
    name.write_bytes(b"first\n")
    assert raw_request(bastion.port(), "/static/changing.txt").body == b"first\n"
    replacement = tree["root"] / "changing.tmp"
    replacement.write_bytes(b"second, longer\n")
    os.replace(replacement, name)
    time.sleep(1.1)
    got = raw_request(bastion.port(), "/static/changing.txt")
    assert got.body == b"second, longer\n"
    assert got.headers["content-length"] == "15"
    name.unlink()
    time.sleep(1.1)
    assert raw_request(bastion.port(), "/static/changing.txt").status == 404


def test_big_file_plain_and_tls(bastion: BastionProcess, tree: dict[str, Path],
                                ca: trustme.CA) -> None:
    digest = hashlib.sha256((tree["root"] / "big.bin").read_bytes()).hexdigest()
    plain = raw_request(bastion.port(), "/static/big.bin")
    assert plain.status == 200 and len(plain.body) == BIG
    assert hashlib.sha256(plain.body).hexdigest() == digest
    secure = raw_request(bastion.port(1), "/static/big.bin", ca=ca)
    assert secure.status == 200
    assert hashlib.sha256(secure.body).hexdigest() == digest
    part = raw_request(bastion.port(1), "/static/big.bin", {"Range": "bytes=1000000-2999999"},
                       ca=ca)
    assert part.status == 206 and len(part.body) == 2_000_000
    assert part.body == (tree["root"] / "big.bin").read_bytes()[1000000:3000000]


def test_http2(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    status, headers, body = curl_h2(bastion, tree, "/static/big.bin")
    assert status == 200
    assert body == (tree["root"] / "big.bin").read_bytes()
    etag = headers["etag"]
    status, headers, body = curl_h2(bastion, tree, "/static/a.txt", "-H",
                                    f"If-None-Match: {etag}")
    assert status == 200  # another file's tag
    info = os.stat(tree["root"] / "a.txt")
    own = f'"{int(info.st_mtime):x}-{info.st_size:x}"'
    status, headers, body = curl_h2(bastion, tree, "/static/a.txt", "-H",
                                    f"If-None-Match: {own}")
    assert (status, body) == (304, b"")
    status, headers, body = curl_h2(bastion, tree, "/static/big.bin", "-H",
                                    "Range: bytes=-10")
    assert status == 206 and headers["content-range"] == f"bytes {BIG - 10}-{BIG - 1}/{BIG}"
    assert body == (tree["root"] / "big.bin").read_bytes()[-10:]
    status, headers, body = curl_h2(bastion, tree, "/static/big.bin", "-I")
    assert status == 200 and headers["content-length"] == str(BIG)
    status, headers, body = curl_h2(bastion, tree, "/static/style.css", "-H",
                                    "Accept-Encoding: gzip")
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == CSS


def test_precompressed(bastion: BastionProcess) -> None:
    port = bastion.port()
    got = raw_request(port, "/static/style.css", {"Accept-Encoding": "gzip, deflate"})
    assert got.headers["content-encoding"] == "gzip"
    assert got.headers["content-type"] == "text/css"
    assert got.headers["vary"] == "Accept-Encoding"
    assert gzip.decompress(got.body) == CSS
    got = raw_request(port, "/static/style.css", {"Accept-Encoding": "gzip, br"})
    assert (got.headers["content-encoding"], got.body) == ("br", b"BROTLI-ENCODED-BYTES")
    got = raw_request(port, "/static/style.css", {"Accept-Encoding": "gzip;q=0.9, br;q=0.5"})
    assert got.headers["content-encoding"] == "gzip"
    got = raw_request(port, "/static/style.css", {"Accept-Encoding": "gzip;q=0, br;q=0"})
    assert "content-encoding" not in got.headers and got.body == CSS
    assert got.headers["vary"] == "Accept-Encoding"
    got = raw_request(port, "/static/style.css")
    assert "content-encoding" not in got.headers and got.body == CSS
    got = raw_request(port, "/static/a.txt", {"Accept-Encoding": "gzip"})
    assert "content-encoding" not in got.headers  # no sibling: the file itself
    # The compressed variant has its own validators: its tag revalidates it.
    gz = raw_request(port, "/static/style.css", {"Accept-Encoding": "gzip"})
    again = raw_request(port, "/static/style.css", {"Accept-Encoding": "gzip",
                                                    "If-None-Match": gz.headers["etag"]})
    assert again.status == 304 and again.headers["vary"] == "Accept-Encoding"


# -- traversal ---------------------------------------------------------------------------
TRAVERSAL = [
    "/static/../secret.txt", "/static/..%2fsecret.txt", "/static/%2e%2e/secret.txt",
    "/static/%2e%2e%2fsecret.txt", "/static/%2E%2E/secret.txt", "/static/.%2e/secret.txt",
    "/static/%2e./secret.txt", "/static/..%5csecret.txt", "/static/..\\secret.txt",
    "/static/%252e%252e/secret.txt", "/static/%c0%ae%c0%ae/secret.txt", "/static/escape",
    "/static/escape-dir/secret.txt", "/static/escape-dir/", "/static/sub/../../secret.txt",
    "/static/sub/%2e%2e/%2e%2e/secret.txt", "/static/./../secret.txt",
    "/static//../secret.txt", "/static/a.txt%00.png", "/static/a.txt%00", "/static/%00",
    "/static/....//secret.txt", "/static/..;/secret.txt", "/static/%2e%2e%5c%2e%2e%5csecret.txt",
    "/static/..%252fsecret.txt", "/static/%u002e%u002e/secret.txt",
    "/static/..%c0%afsecret.txt", "/static/fifo", "/static/sub/..%2f..%2fsecret.txt",
    "/static/%2e%2e", "/static/..", "/%2e%2e/secret.txt", "/static%2f..%2fsecret.txt",
    "/static/abs-link", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2fetc%2fpasswd", "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/protected/../secret.txt", "/static/sub%2f..%2f..%2fsecret.txt",
]


def test_traversal_corpus(bastion: BastionProcess, ca: trustme.CA) -> None:
    assert len(TRAVERSAL) >= 30
    for target in TRAVERSAL:
        for tls in (None, ca):
            got = raw_request(bastion.port(1 if tls else 0), target, ca=tls)
            assert got.status in (400, 404), (target, got.status)
            assert SECRET not in got.body and b"root:" not in got.body, target


def test_traversal_corpus_http2(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    for target in TRAVERSAL:
        status, _, body = curl_h2(bastion, tree, target)
        # A path HTTP/2 itself refuses resets the stream (curl: no status).
        assert status in (0, 400, 404), (target, status)
        assert SECRET not in body and b"root:" not in body, target


# -- X-Accel-Redirect --------------------------------------------------------------------
def test_internal_location_is_not_served_directly(bastion: BastionProcess) -> None:
    assert raw_request(bastion.port(), "/protected/report.pdf").status == 404


def test_django_sendfile(bastion: BastionProcess, tree: dict[str, Path],
                         ca: trustme.CA) -> None:
    expected = (tree["protected"] / "report.pdf").read_bytes()
    for tls in (None, ca):
        got = raw_request(bastion.port(1 if tls else 0), "/dj/file/report.pdf", ca=tls)
        assert got.status == 200, got.raw_head
        assert got.body == expected
        assert got.headers["content-type"] == "application/pdf"
        assert got.headers["content-disposition"] == 'attachment; filename="report.pdf"'
        assert "downloaded=report.pdf" in got.headers["set-cookie"]
        assert "x-accel-redirect" not in got.headers
        assert "x-app-only" not in got.headers
        assert got.headers["accept-ranges"] == "bytes"
    got = raw_request(bastion.port(), "/dj/file/doc%20one.txt")
    assert (got.status, got.body) == (200, b"document one\n")
    etag = raw_request(bastion.port(), "/dj/file/report.pdf").headers["etag"]
    got = raw_request(bastion.port(), "/dj/file/report.pdf", {"If-None-Match": etag})
    assert (got.status, got.body) == (304, b"")
    got = raw_request(bastion.port(), "/dj/file/report.pdf", {"Range": "bytes=0-7"})
    assert (got.status, got.body) == (206, b"%PDF-1.4")
    got = raw_request(bastion.port(), "/dj/file/report.pdf", method="HEAD")
    assert got.status == 200 and got.headers["content-length"] == str(len(expected))
    assert got.body == b""


def test_django_sendfile_http2(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    status, headers, body = curl_h2(bastion, tree, "/dj/file/report.pdf")
    assert status == 200
    assert body == (tree["protected"] / "report.pdf").read_bytes()
    assert headers["content-disposition"] == 'attachment; filename="report.pdf"'


def test_flask_accel(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    got = raw_request(bastion.port(), "/fl/file/report.pdf", {"Range": "bytes=4-7"})
    assert (got.status, got.body) == (206, b"-1.4")
    assert got.headers["content-type"] == "application/x-report"  # the app's own
    assert got.headers["cache-control"] == "private, max-age=5"
    assert b"never sent" not in got.body
    got = raw_request(bastion.port(), "/fl/file/report.pdf", method="POST", body=b"a=1")
    assert got.status == 200  # served as a GET, as nginx does
    assert got.body == (tree["protected"] / "report.pdf").read_bytes()
    got = raw_request(bastion.port(), "/fl/file/nothing.pdf")
    assert got.status == 404 and b"never sent" not in got.body
    got = raw_request(bastion.port(), "/fl/file/..%2f..%2fsecret.txt")
    assert got.status in (400, 404) and SECRET not in got.body


def test_accel_to_unmapped_path(bastion: BastionProcess) -> None:
    got = raw_request(bastion.port(), "/dj/missing")
    assert got.status == 404
    assert b"the app's own body" not in got.body
    assert "X-Accel-Redirect: '/nowhere/file.txt', which no static location maps" \
        in bastion.log()


def test_apps_still_proxied(bastion: BastionProcess) -> None:
    got = raw_request(bastion.port(), "/dj/page")
    assert got.status == 200 and b"<p>django page</p>" in got.body  # (chunked)
    assert raw_request(bastion.port(), "/app/x").status == 200


# -- memory ------------------------------------------------------------------------------
def test_huge_file_memory_stays_flat(bastion: BastionProcess, tree: dict[str, Path]) -> None:
    process = psutil.Process(bastion.pid)
    raw_request(bastion.port(), "/static/a.txt")
    before = process.memory_info().rss
    peak = before
    with socket.create_connection(("127.0.0.1", bastion.port()), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /static/huge.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = 0
        digest = hashlib.sha256()
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        head, _, first = head.partition(b"\r\n\r\n")
        digest.update(first)
        received = len(first)
        reads = 0
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
            reads += 1
            if reads % 64 == 0:
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.001)  # a slower reader: the server must wait, not buffer
    assert received == HUGE
    expected = hashlib.sha256()
    with open(tree["root"] / "huge.bin", "rb") as f:
        while block := f.read(1 << 20):
            expected.update(block)
    assert digest.hexdigest() == expected.hexdigest()
    assert peak - before < 16 * 1024 * 1024, (before, peak)


# -- against nginx -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def nginx(tree: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                       else None)
    if binary is None:
        pytest.skip("nginx is not installed (./run test installs it as root)")
    tmp = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = tmp / "nginx.conf"
    temp = {name: tmp / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf.write_text(f"""
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /static/ {{ alias {tree['root']}/; }}
    }}
}}
""")
    proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=10)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _conditional_cases(tree: dict[str, Path]) -> list[dict[str, str]]:
    info = os.stat(tree["root"] / "big.bin")
    etag = f'"{int(info.st_mtime):x}-{info.st_size:x}"'
    last = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(int(info.st_mtime)))
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(int(info.st_mtime) + 60))
    size = info.st_size
    return [
        {}, {"If-None-Match": etag}, {"If-None-Match": '"nope"'}, {"If-None-Match": "*"},
        {"If-None-Match": f"W/{etag}"}, {"If-None-Match": f'"x", {etag}'},
        {"If-Modified-Since": last}, {"If-Modified-Since": old},
        {"If-Modified-Since": later}, {"If-Modified-Since": "garbage"},
        {"If-Modified-Since": last, "If-None-Match": '"nope"'},
        {"If-Modified-Since": old, "If-None-Match": etag},
        {"If-Match": etag}, {"If-Match": '"nope"'}, {"If-Match": "*"},
        {"If-Match": f"W/{etag}"},
        {"If-Unmodified-Since": last}, {"If-Unmodified-Since": old},
        {"If-Unmodified-Since": later}, {"If-Unmodified-Since": "garbage"},
        {"Range": "bytes=0-99"}, {"Range": "bytes=100-"}, {"Range": "bytes=-100"},
        {"Range": "bytes=-99999999"}, {"Range": "bytes=0-"}, {"Range": f"bytes={size}-"},
        {"Range": f"bytes={size - 1}-"}, {"Range": f"bytes=10-{size + 100}"},
        {"Range": "bytes=5-3"}, {"Range": "bytes=abc"}, {"Range": "items=0-1"},
        {"Range": "bytes=-0"}, {"Range": "bytes=5-3,10-19"}, {"Range": "BYTES=1-2"},
        {"Range": "bytes=0-9", "If-Range": etag}, {"Range": "bytes=0-9", "If-Range": '"x"'},
        {"Range": "bytes=0-9", "If-Range": last}, {"Range": "bytes=0-9", "If-Range": old},
        {"Range": "bytes=0-9", "If-None-Match": etag},
        {"Range": "bytes=0-9", "If-Match": '"nope"'},
    ]


COMPARED = ("content-length", "content-range", "etag", "last-modified", "accept-ranges")


def test_same_answers_as_nginx(bastion: BastionProcess, nginx: int,
                               tree: dict[str, Path]) -> None:
    cases = _conditional_cases(tree)
    assert len(cases) >= 40
    for method in ("GET", "HEAD"):
        for headers in cases:
            ours = raw_request(bastion.port(), "/static/big.bin", headers, method=method)
            theirs = raw_request(nginx, "/static/big.bin", headers, method=method)
            where = (method, headers)
            assert ours.status == theirs.status, where
            for name in COMPARED:
                if ours.status >= 400 and name == "content-length":
                    continue  # error pages differ
                assert ours.headers.get(name) == theirs.headers.get(name), (where, name)
            if ours.status < 400:
                assert ours.body == theirs.body, where


def test_several_ranges_give_the_whole_file(bastion: BastionProcess, nginx: int) -> None:
    # nginx answers multipart/byteranges; refusing several ranges with the whole file is
    # what RFC 9110 14.2 allows (and what Bastion does).
    theirs = raw_request(nginx, "/static/a.txt", {"Range": "bytes=0-1,4-5"})
    assert theirs.status == 206 and "multipart/byteranges" in theirs.headers["content-type"]
    ours = raw_request(bastion.port(), "/static/a.txt", {"Range": "bytes=0-1,4-5"})
    assert (ours.status, ours.body) == (200, b"hello static\n")


def test_directory_redirect_like_nginx(bastion: BastionProcess, nginx: int) -> None:
    ours = raw_request(bastion.port(), "/static/sub")
    theirs = raw_request(nginx, "/static/sub")
    assert ours.status == theirs.status == 301
    assert theirs.headers["location"].endswith(ours.headers["location"])
    assert raw_request(bastion.port(), "/static/empty/").status == \
        raw_request(nginx, "/static/empty/").status == 403



# -- reload ------------------------------------------------------------------------------
def test_reload_moves_a_location(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, text in ((first, b"first root\n"), (second, b"second root\n")):
        folder.mkdir()
        (folder / "which.txt").write_bytes(text)
    config: dict[str, Any] = {
        "listen": [{"address": f"127.0.0.1:{free_port()}"}],
        "apps": {"plain": {"path": "/app",
                           "command": app_command("python", "plain_app.py", "{port}")}},
        "static": {"files": {"path": "/files", "root": str(first)}},
    }
    with BastionProcess(tmp_path, config) as proc:
        assert raw_request(proc.port(), "/files/which.txt").body == b"first root\n"
        assert raw_request(proc.port(), "/moved/which.txt").status == 404
        proc.config["static"] = {"files": {"path": "/moved", "root": str(second)}}
        proc.path.write_text(yaml.safe_dump(proc.config))
        status, body = proc.admin_post("/reload")
        assert status == 200, body
        deadline = time.monotonic() + 10
        while raw_request(proc.port(), "/moved/which.txt").status != 200:
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.05)
        assert raw_request(proc.port(), "/moved/which.txt").body == b"second root\n"
        assert raw_request(proc.port(), "/files/which.txt").status == 404
