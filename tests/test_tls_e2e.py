"""TLS end to end: a real Bastion, real handshakes over loopback.

* SNI: several certificates on one listener (exact names, a ``*.example.com`` wildcard,
  the first as the default for no SNI or an unknown name);
* HSTS on HTTPS responses (app answers and error pages, HTTP/1.1 and HTTP/2), never on
  plain HTTP; ``redirect_https`` answers 308 to the HTTPS listener without reaching an app;
* certificate reload on SIGHUP and on a file change: new connections get the new
  certificate, open connections keep working, a broken pair is refused and logged;
* client certificates (``optional`` / ``required`` with ``client_ca``): the app sees
  ``X-Bastion-Client-Cert`` only when a certificate was presented, never the client's own;
* TLS 1.2 minimum with ECDHE AEAD ciphers, ALPN h2 / http/1.1 per client offer.

Every client here is a blocking ``ssl`` socket (or ``http.client``, or curl for HTTP/2)
with a timeout; every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import SERVER_NAMES, ca_pem_path, tls_config
from cryptography import x509
from harness import BastionProcess, app_command, free_port, wait_until

HSTS = 31536000
ECHO = {"command": app_command("uvicorn", "echo_asgi:app")}
RELOAD_WAIT = 8.0  # watch_certificates: poll every 2 s, one more interval to settle


# -- certificates --------------------------------------------------------------------------


class Pair:
    """A leaf certificate (with chain) and its key written as PEM files."""

    def __init__(self, ca: trustme.CA, directory: Path, stem: str, *names: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.leaf = ca.issue_cert(*names)
        self.cert = directory / f"{stem}.pem"
        self.key = directory / f"{stem}.key"
        self.write(self.cert, self.key)

    def write(self, cert: Path, key: Path, *, key_of: Pair | None = None) -> None:
        """Write this certificate to ``cert`` and its key (or ``key_of``'s key) to ``key``."""
        cert.write_bytes(b"".join(pem.bytes() for pem in self.leaf.cert_chain_pems))
        key.write_bytes((key_of or self).leaf.private_key_pem.bytes())

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode())

    @property
    def b64(self) -> str:
        return base64.b64encode(self.der).decode("ascii")

    def entry(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


def dns_names(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def serial(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


# -- clients -------------------------------------------------------------------------------


def client_context(ca: trustme.CA | None = None, *, alpn: list[str] | None = None,
                   client: Pair | None = None) -> ssl.SSLContext:
    """A client context: verifying against ``ca``, or verifying nothing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        ca.configure_trust(context)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    if client is not None:
        client.leaf.configure_cert(context)
    return context


def tls_connect(port: int, context: ssl.SSLContext, server_hostname: str | None = None,
                timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def peer_der(port: int, server_hostname: str | None = None) -> bytes:
    """The certificate a new connection gets (no verification)."""
    with tls_connect(port, client_context(), server_hostname) as sock:
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return der


def read_all(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything until the peer closes (or ``limit`` seconds)."""
    sock.settimeout(limit)
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


class Answer:
    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self.header_list = [(k.lower(), v) for k, v in resp.getheaders()]
        self.body = resp.read()

    def json(self) -> Any:
        return json.loads(self.body)


def https(port: int, method: str, path: str, *, host: str | None = None,
          headers: dict[str, str] | None = None, body: bytes | None = None,
          context: ssl.SSLContext | None = None, sni: str | None = None) -> Answer:
    conn = http.client.HTTPSConnection(sni or "127.0.0.1", port, timeout=15,
                                       context=context or client_context())
    if sni is not None:  # connect to loopback, send ``sni`` as the server name
        conn.sock = tls_connect(port, context or client_context(), sni)
    try:
        conn.request(method, path, body=body, headers={**({"Host": host} if host else {}),
                                                       **(headers or {})})
        return Answer(conn.getresponse())
    finally:
        conn.close()


def plain(port: int, method: str, path: str, *, host: str | None = None,
          headers: dict[str, str] | None = None, body: bytes | None = None) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers={**({"Host": host} if host else {}),
                                                       **(headers or {})})
        return Answer(conn.getresponse())
    finally:
        conn.close()


def seen_headers(answer: Answer, name: str) -> list[str]:
    """The values of header ``name`` the echo app saw (from /info)."""
    assert answer.status == 200, (answer.status, answer.body[:300])
    return [v for k, v in answer.json()["headers"] if k.lower() == name.lower()]


def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


def curl_h2(port: int, path: str, *, ca_file: Path, extra: list[str] | None = None
            ) -> tuple[str, dict[str, list[str]], bytes]:
    """One HTTP/2 request with curl; (http version, response headers, body)."""
    url = f"https://localhost:{port}{path}"
    out = subprocess.run(
        [curl(), "-sS", "--http2", "--cacert", str(ca_file), "-D", "-", "-o", "-",
         "--max-time", "15", *(extra or []), url],
        capture_output=True, timeout=30, check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0].split()[0], headers, body


def start(tmp: Path, config: dict[str, Any], ca: trustme.CA) -> BastionProcess:
    config.setdefault("admin_socket", str(tmp / "admin.sock"))
    return BastionProcess(tmp, config, tls_ca=ca).start()


# -- the main Bastion: SNI, HSTS, redirect, versions, ALPN ----------------------------------


class Main:
    """A Bastion with a plain listener, a redirecting one and an HTTPS one with four
    certificates; the echo app lives at /e."""

    def __init__(self, b: BastionProcess, pairs: dict[str, Pair], ca_file: Path) -> None:
        self.b = b
        self.pairs = pairs
        self.ca_file = ca_file
        self.plain = b.port(0)
        self.redirect = b.port(1)
        self.https = b.port(2)


@pytest.fixture(scope="module")
def main(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Main]:
    tmp = tmp_path_factory.mktemp("tls-e2e-main")
    pairs = {
        "default": Pair(tls_ca, tmp / "tls", "default", "default.test", "localhost"),
        "exact": Pair(tls_ca, tmp / "tls", "exact", "exact.test", "www.exact.test"),
        "wild": Pair(tls_ca, tmp / "tls", "wild", "*.example.com"),
        "apex": Pair(tls_ca, tmp / "tls", "apex", "example.com", "api.example.com"),
    }
    config = {
        "listen": [
            {"address": f"127.0.0.1:{free_port()}"},
            {"address": f"127.0.0.1:{free_port()}", "redirect_https": True},
            {"address": f"127.0.0.1:{free_port()}",
             "tls": {"certificates": [p.entry() for p in pairs.values()], "hsts": HSTS}},
        ],
        "apps": {"echo": {**ECHO, "path": "/e"}},
    }
    b = start(tmp, config, tls_ca)
    try:
        yield Main(b, pairs, ca_pem_path(tls_ca, tmp / "ca"))
    finally:
        b.stop()


# 1. SNI ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server_name", "expected"), [
    (None, "default"),                   # no SNI at all
    ("default.test", "default"),
    ("exact.test", "exact"),
    ("www.exact.test", "exact"),
    ("EXACT.Test", "exact"),             # names are case-insensitive
    ("www.example.com", "wild"),
    ("shop.example.com", "wild"),
    ("example.com", "apex"),             # the wildcard does not cover the bare domain
    ("api.example.com", "wild"),         # the first pair whose names match wins
    ("a.b.example.com", "default"),      # a wildcard covers exactly one label
    ("unknown.test", "default"),         # no match: the first pair
])
def test_sni_selects_certificate(main: Main, server_name: str | None, expected: str) -> None:
    der = peer_der(main.https, server_name)
    assert dns_names(der) == dns_names(main.pairs[expected].der)
    assert der == main.pairs[expected].der


def test_sni_certificate_verifies_and_serves(main: Main, tls_ca: trustme.CA) -> None:
    # A verifying client (hostname checked against the chosen certificate) gets an answer.
    context = client_context(tls_ca)
    for name in ("www.example.com", "exact.test", "example.com"):
        answer = https(main.https, "GET", "/e/info", host=name, context=context, sni=name)
        assert answer.status == 200
        assert answer.json()["scheme"] == "https"


# 2. HSTS -------------------------------------------------------------------------------------


def test_hsts_on_https_app_response(main: Main) -> None:
    answer = https(main.https, "GET", "/e/info", host="www.example.com")
    assert answer.status == 200
    assert answer.headers.get("strict-transport-security") == f"max-age={HSTS}"
    assert [k for k, _ in answer.header_list].count("strict-transport-security") == 1


def test_hsts_on_https_error_pages(main: Main) -> None:
    answer = https(main.https, "GET", "/nowhere", host="www.example.com")
    assert answer.status == 404
    assert answer.headers.get("strict-transport-security") == f"max-age={HSTS}"
    # A request refused by the strict parser (two Host headers): 400, still with HSTS.
    with tls_connect(main.https, client_context()) as sock:
        sock.sendall(b"GET /e/info HTTP/1.1\r\nHost: a.example.com\r\n"
                     b"Host: b.example.com\r\n\r\n")
        data = read_all(sock)
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    assert head.startswith("http/1.1 400"), head
    assert f"strict-transport-security: max-age={HSTS}" in head


def test_hsts_over_http2(main: Main) -> None:
    version, headers, _ = curl_h2(main.https, "/e/info", ca_file=main.ca_file)
    assert version == "HTTP/2"
    assert headers.get("strict-transport-security") == [f"max-age={HSTS}"]
    version, headers, _ = curl_h2(main.https, "/nowhere", ca_file=main.ca_file)
    assert version == "HTTP/2"
    assert headers.get("strict-transport-security") == [f"max-age={HSTS}"]


def test_no_hsts_on_plain_http(main: Main) -> None:
    for path, status in (("/e/info", 200), ("/nowhere", 404)):
        answer = plain(main.plain, "GET", path, host="www.example.com")
        assert answer.status == status
        assert "strict-transport-security" not in answer.headers
    redirect = plain(main.redirect, "GET", "/x", host="www.example.com")
    assert redirect.status == 308
    assert "strict-transport-security" not in redirect.headers


# 3. redirect_https ---------------------------------------------------------------------------


def _app_count(main: Main) -> int:
    return int(plain(main.plain, "GET", "/e/count").json()["count"])


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("POST", b"a=1&b=2"),
                                              ("HEAD", None), ("PUT", b"x" * 1000)])
def test_redirect_https_308(main: Main, method: str, body: bytes | None) -> None:
    before = _app_count(main)
    cases = [
        ("www.example.com", "/path/x?q=1&r=%2F", f"https://www.example.com:{main.https}"),
        (f"shop.test:{main.redirect}", "/", f"https://shop.test:{main.https}"),
        ("127.0.0.1", "/e/info?a=b", f"https://127.0.0.1:{main.https}"),
        (f"[::1]:{main.redirect}", "/a%20b/?", f"https://[::1]:{main.https}"),
    ]
    for host, target, origin in cases:
        answer = plain(main.redirect, method, target, host=host, body=body)
        assert answer.status == 308, (host, target, answer.status)
        assert answer.headers["location"] == origin + target
    # The redirects never reached the app: only the second /count request counted.
    assert _app_count(main) == before + 1


def test_redirect_https_omits_port_443(tls_ca: trustme.CA, tmp_path: Path) -> None:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 443))
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.1:443 here: {exc.strerror}")
    finally:
        probe.close()
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}", "redirect_https": True},
                   {"address": "127.0.0.1:443", "tls": tls_config(tls_ca, tmp_path / "tls")}],
        "apps": {"echo": ECHO},
    }
    b = start(tmp_path, config, tls_ca)
    try:
        for method in ("GET", "POST"):
            answer = plain(b.port(0), method, "/p/q?x=1", host=f"shop.test:{b.port(0)}",
                           body=b"data" if method == "POST" else None)
            assert answer.status == 308
            assert answer.headers["location"] == "https://shop.test/p/q?x=1"
    finally:
        b.stop()


# 6. versions, ciphers, ALPN ------------------------------------------------------------------


def test_tls13_by_default(main: Main) -> None:
    with tls_connect(main.https, client_context(), "www.example.com") as sock:
        assert sock.version() == "TLSv1.3"


def test_tls12_negotiates_ecdhe_aead(main: Main) -> None:
    context = client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls_connect(main.https, context, "www.example.com") as sock:
        assert sock.version() == "TLSv1.2"
        name, _, bits = sock.cipher()
        assert name.startswith("ECDHE-"), name
        assert "GCM" in name or "CHACHA20" in name, name
        assert bits >= 128


def test_tls12_without_ecdhe_or_aead_is_refused(main: Main) -> None:
    for ciphers in ("AES256-GCM-SHA384:AES128-GCM-SHA256",  # RSA key exchange
                    "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA"):  # CBC
        context = client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(main.https, context, "www.example.com").close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1_1", "TLSv1"])
def test_old_protocol_versions_refused(main: Main, version: str) -> None:
    context = client_context()
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = getattr(ssl.TLSVersion, version)
        context.maximum_version = getattr(ssl.TLSVersion, version)
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"local OpenSSL cannot offer {version}: {exc}")
    try:
        sock = tls_connect(main.https, context, "www.example.com")
    except ssl.SSLError as exc:
        if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "no protocols available" in str(exc):
            pytest.skip(f"local OpenSSL refuses to offer {version}")
        # Refused by the server: a protocol_version alert (or a failed handshake).
        return
    except ConnectionError:
        return
    version_got = sock.version()
    sock.close()
    pytest.fail(f"a {version} client negotiated {version_got}")


@pytest.mark.parametrize(("offer", "expected"), [
    (["h2", "http/1.1"], "h2"),
    (["http/1.1", "h2"], "h2"),      # the server's preference: h2 first
    (["h2"], "h2"),
    (["http/1.1"], "http/1.1"),
    (None, None),                    # no ALPN: HTTP/1.1
])
def test_alpn_per_client_offer(main: Main, offer: list[str] | None,
                               expected: str | None) -> None:
    with tls_connect(main.https, client_context(alpn=offer), "www.example.com") as sock:
        assert sock.selected_alpn_protocol() == expected
        if expected == "h2":
            # The server speaks HTTP/2: its first frame after our preface is SETTINGS.
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            frame = b""
            while len(frame) < 9:
                chunk = sock.recv(9 - len(frame))
                assert chunk, "closed before the first HTTP/2 frame"
                frame += chunk
            assert frame[3] == 0x4, frame
        else:
            sock.sendall(b"GET /e/info HTTP/1.1\r\nHost: www.example.com\r\n"
                         b"Connection: close\r\n\r\n")
            assert read_all(sock).startswith(b"HTTP/1.1 200 ")


# 5 (spoofing on listeners without client certificates) ---------------------------------


def test_client_cert_header_from_client_is_dropped(main: Main) -> None:
    spoof = {"X-Bastion-Client-Cert": "Zm9vYmFy"}
    for answer in (
        plain(main.plain, "GET", "/e/info", headers=spoof),
        https(main.https, "GET", "/e/info", headers=spoof, host="www.example.com"),
        https(main.https, "GET", "/e/info", headers={"x-bastion-client-cert": "Zm9v"},
              host="www.example.com"),
    ):
        assert seen_headers(answer, "x-bastion-client-cert") == []
    _, _, body = curl_h2(main.https, "/e/info", ca_file=main.ca_file,
                         extra=["-H", "X-Bastion-Client-Cert: Zm9vYmFy"])
    assert [v for k, v in json.loads(body)["headers"]
            if k.lower() == "x-bastion-client-cert"] == []


# 5. client certificates ----------------------------------------------------------------------


class ClientCerts:
    def __init__(self, b: BastionProcess, client: Pair, foreign: Pair, ca_file: Path) -> None:
        self.b = b
        self.client = client
        self.foreign = foreign
        self.ca_file = ca_file
        self.optional = b.port(0)
        self.required = b.port(1)


@pytest.fixture(scope="module")
def certs(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientCerts]:
    tmp = tmp_path_factory.mktemp("tls-e2e-client")
    client_ca = trustme.CA()
    ca_file = ca_pem_path(client_ca, tmp / "client-ca")
    client = Pair(client_ca, tmp / "clients", "client", "client.test")
    foreign = Pair(trustme.CA(), tmp / "clients", "foreign", "client.test")
    tls = tls_config(tls_ca, tmp / "tls")
    config = {
        "listen": [
            {"address": f"127.0.0.1:{free_port()}",
             "tls": {**tls, "client_certificates": "optional", "client_ca": str(ca_file)}},
            {"address": f"127.0.0.1:{free_port()}",
             "tls": {**tls, "client_certificates": "required", "client_ca": str(ca_file)}},
        ],
        "apps": {"echo": ECHO},
    }
    b = start(tmp, config, tls_ca)
    try:
        yield ClientCerts(b, client, foreign, ca_pem_path(tls_ca, tmp / "ca"))
    finally:
        b.stop()


def test_optional_client_cert_reaches_app(certs: ClientCerts) -> None:
    answer = https(certs.optional, "GET", "/info", context=client_context(client=certs.client))
    assert seen_headers(answer, "x-bastion-client-cert") == [certs.client.b64]
    assert base64.b64decode(seen_headers(answer, "x-bastion-client-cert")[0]) == certs.client.der


def test_optional_without_client_cert_has_no_header(certs: ClientCerts) -> None:
    answer = https(certs.optional, "GET", "/info")
    assert seen_headers(answer, "x-bastion-client-cert") == []


def test_optional_client_cert_from_another_ca_is_refused(certs: ClientCerts) -> None:
    # Presented but not issued by client_ca: the handshake fails (or nothing is answered).
    try:
        answer = https(certs.optional, "GET", "/info",
                       context=client_context(client=certs.foreign))
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected):
        return
    pytest.fail(f"a certificate from an unknown CA was accepted: {answer.status}, "
                f"app saw {seen_headers(answer, 'x-bastion-client-cert')}")


def test_client_cannot_spoof_client_cert_header(certs: ClientCerts) -> None:
    spoof = {"X-Bastion-Client-Cert": certs.foreign.b64}
    answer = https(certs.optional, "GET", "/info", headers=spoof)
    assert seen_headers(answer, "x-bastion-client-cert") == []
    answer = https(certs.optional, "GET", "/info", headers=spoof,
                   context=client_context(client=certs.client))
    assert seen_headers(answer, "x-bastion-client-cert") == [certs.client.b64]


def test_required_without_cert_gets_no_response(certs: ClientCerts) -> None:
    try:
        sock = tls_connect(certs.required, client_context())
    except (ssl.SSLError, ConnectionError):
        return  # refused in the handshake (TLS 1.2)
    # TLS 1.3: the client finishes first; the server's alert comes with the first read.
    with sock:
        try:
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            data = read_all(sock)
        except (ssl.SSLError, ConnectionError):
            return
    assert not data.startswith(b"HTTP/"), data[:200]


def test_required_with_tls12_and_no_cert_fails_handshake(certs: ClientCerts) -> None:
    context = client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(certs.required, context).close()


def test_required_with_cert_succeeds(certs: ClientCerts) -> None:
    for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(client=certs.client)
        context.maximum_version = maximum
        answer = https(certs.required, "GET", "/info", context=context)
        assert seen_headers(answer, "x-bastion-client-cert") == [certs.client.b64]


def test_client_cert_over_http2(certs: ClientCerts, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    cert = tmp_path / "client.pem"
    certs.client.write(cert, key)
    for port in (certs.optional, certs.required):
        version, _, body = curl_h2(
            port, "/info", ca_file=certs.ca_file,
            extra=["--cert", str(cert), "--key", str(key),
                   "-H", f"X-Bastion-Client-Cert: {certs.foreign.b64}"])
        assert version == "HTTP/2"
        seen = [v for k, v in json.loads(body)["headers"] if k == "x-bastion-client-cert"]
        assert seen == [certs.client.b64]
    _, _, body = curl_h2(certs.optional, "/info", ca_file=certs.ca_file)
    assert [v for k, v in json.loads(body)["headers"] if k == "x-bastion-client-cert"] == []


# 4. certificate reload -----------------------------------------------------------------------


class Reloadable:
    """A Bastion with one HTTPS listener whose certificate files a test rewrites."""

    def __init__(self, tmp: Path, ca: trustme.CA) -> None:
        self.tmp = tmp
        self.ca = ca
        self.first = Pair(ca, tmp / "tls", "server", *SERVER_NAMES)
        self.cert, self.key = self.first.cert, self.first.key
        config = {
            "listen": [{"address": f"127.0.0.1:{free_port()}",
                        "tls": {"certificates": [self.first.entry()], "hsts": HSTS}}],
            # The drain grace after a reload is min(request_timeout, 30 s): keep it short.
            "apps": {"echo": {**ECHO, "request_timeout": "5s"}},
        }
        self.b = start(tmp, config, ca)
        self.port = self.b.port(0)
        # The certificate watcher takes its first look right after "listening on":
        # a change made before that would be its baseline, not a change.
        assert wait_until(lambda: "listening on https://" in self.b.log(), timeout=10)
        assert self.b.get("/info").status == 200  # the app is up, the watcher running

    def new_pair(self, stem: str) -> Pair:
        return Pair(self.ca, self.tmp / "next", stem, *SERVER_NAMES)

    def install(self, pair: Pair, *, key_of: Pair | None = None,
                keep_mtime: bool = False) -> None:
        """Write ``pair`` over the served files; ``keep_mtime`` hides it from the watcher."""
        times = [os.stat(p).st_mtime_ns for p in (self.cert, self.key)]
        pair.write(self.cert, self.key, key_of=key_of)
        if keep_mtime:
            for path, mtime in zip((self.cert, self.key), times, strict=True):
                os.utime(path, ns=(mtime, mtime))

    def connection(self) -> http.client.HTTPSConnection:
        context = client_context(self.ca)
        return http.client.HTTPSConnection("localhost", self.port, timeout=10, context=context)

    def serves(self, pair: Pair) -> bool:
        """Whether a new connection gets ``pair``'s certificate. A connection reset counts
        as "not yet": now and then (about one in a thousand handshakes racing the switch)
        the old generation resets a connection it had just accepted."""
        try:
            return peer_der(self.port, "localhost") == pair.der
        except ConnectionResetError:
            return False

    def wait_for_certificate(self, pair: Pair, timeout: float = RELOAD_WAIT) -> bool:
        return wait_until(lambda: self.serves(pair), timeout=timeout, interval=0.2)

    def stop(self) -> None:
        self.b.stop()


@pytest.fixture
def reloadable(tls_ca: trustme.CA, tmp_path: Path) -> Iterator[Reloadable]:
    r = Reloadable(tmp_path, tls_ca)
    try:
        yield r
    finally:
        r.stop()


def _get(conn: http.client.HTTPSConnection, path: str = "/info") -> Answer:
    conn.request("GET", path)
    return Answer(conn.getresponse())


def _trigger(r: Reloadable, trigger: str, pair: Pair, key_of: Pair | None = None) -> None:
    if trigger == "sighup":
        r.install(pair, key_of=key_of, keep_mtime=True)  # only the signal reloads
        os.kill(r.b.pid, signal.SIGHUP)
    else:
        r.install(pair, key_of=key_of)


@pytest.mark.parametrize("trigger", ["sighup", "file_change"])
def test_reload_new_connections_get_new_certificate(reloadable: Reloadable,
                                                    trigger: str) -> None:
    r = reloadable
    assert peer_der(r.port, "localhost") == r.first.der
    assert r.b.get("/info").status == 200
    new = r.new_pair("second")
    assert serial(new.der) != serial(r.first.der)
    _trigger(r, trigger, new)
    assert r.wait_for_certificate(new), f"still the old certificate\n{r.b.log()[-2000:]}"
    # And it serves, verified against the CA, with the new certificate.
    conn = r.connection()
    try:
        assert _get(conn).status == 200
        assert conn.sock.getpeercert(binary_form=True) == new.der
    finally:
        conn.close()
    assert r.b.proc is not None and r.b.proc.poll() is None


def test_sighup_without_changes_keeps_certificate(reloadable: Reloadable) -> None:
    r = reloadable
    os.kill(r.b.pid, signal.SIGHUP)
    assert wait_until(lambda: "certificates re-read in place" in r.b.log(), timeout=8)
    assert peer_der(r.port, "localhost") == r.first.der


@pytest.mark.parametrize("trigger", ["sighup", "file_change"])
def test_certificate_reload_keeps_open_keepalive_connection(reloadable: Reloadable,
                                                            trigger: str) -> None:
    """Only the certificate files changed: the contexts are swapped in place, so an open
    keep-alive connection goes on serving on the same socket (old certificate), while
    new connections get the new one."""
    r = reloadable
    conn = r.connection()
    try:
        assert _get(conn).status == 200
        sock = conn.sock
        assert sock.getpeercert(binary_form=True) == r.first.der
        new = r.new_pair("second")
        _trigger(r, trigger, new)
        assert r.wait_for_certificate(new), "the reload did not happen"
        second = _get(conn)
        assert second.status == 200
        assert conn.sock is sock, "the client had to reconnect"
        assert conn.sock.getpeercert(binary_form=True) == r.first.der
    finally:
        conn.close()


@pytest.mark.parametrize("trigger", ["sighup", "file_change"])
def test_config_reload_closes_idle_keepalive_connection_at_once(reloadable: Reloadable,
                                                                trigger: str) -> None:
    """A real configuration change starts a new generation of workers. Like nginx, the
    old one closes its idle keep-alive connections at once (the client's next request
    goes out on a new connection, to the new generation); nothing is left hanging until
    the grace period ends."""
    r = reloadable
    conn = r.connection()
    try:
        assert _get(conn).status == 200
        sock = conn.sock
        assert sock.getpeercert(binary_form=True) == r.first.der
        config = dict(r.b.config, limits={"keepalive_timeout": "76s"})
        r.b.path.write_text(yaml.safe_dump(config))
        new = r.new_pair("second")
        _trigger(r, trigger, new)
        assert r.wait_for_certificate(new), "the reload did not happen"
        assert wait_until(lambda: "reloaded" in r.b.log(), timeout=8)
        sock.settimeout(5.0)
        started = time.monotonic()
        try:
            eof = sock.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            eof = True
        assert eof, "the idle connection got data instead of being closed"
        assert time.monotonic() - started < 4.0
        fresh = r.connection()
        try:
            assert _get(fresh).status == 200
            assert fresh.sock.getpeercert(binary_form=True) == new.der
        finally:
            fresh.close()
    finally:
        conn.close()


def test_reload_lets_request_in_flight_finish(reloadable: Reloadable) -> None:
    r = reloadable
    assert r.b.get("/info").status == 200  # the app is up
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            conn = r.connection()
            result["answer"] = _get(conn, "/slow?s=2")
            result["der"] = conn.sock.getpeercert(binary_form=True)
            conn.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    new = r.new_pair("second")
    _trigger(r, "sighup", new)
    assert r.wait_for_certificate(new)
    thread.join(15)
    assert "error" not in result, result
    assert result["answer"].status == 200
    assert result["der"] == r.first.der


def _break(r: Reloadable, trigger: str) -> None:
    """Install a certificate with the key of another one (both valid PEM)."""
    _trigger(r, trigger, r.new_pair("broken"), key_of=r.new_pair("other"))


@pytest.mark.parametrize("trigger", ["sighup", "file_change"])
def test_broken_pair_keeps_old_certificate(reloadable: Reloadable, trigger: str) -> None:
    r = reloadable
    conn = r.connection()
    try:
        assert _get(conn).status == 200
        _break(r, trigger)
        # Past the moment the watcher (or the signal) tried to reload.
        if trigger == "file_change":
            assert wait_until(lambda: "certificate files changed" in r.b.log(),
                              timeout=RELOAD_WAIT), "the watcher did not notice the change"
        time.sleep(1.0)
        assert r.b.proc is not None and r.b.proc.poll() is None
        for _ in range(3):
            assert peer_der(r.port, "localhost") == r.first.der
        fresh = r.connection()
        try:
            assert _get(fresh).status == 200
            assert fresh.sock.getpeercert(binary_form=True) == r.first.der
        finally:
            fresh.close()
    finally:
        conn.close()


def _refusal_line(r: Reloadable) -> str | None:
    """Bastion's own log line saying the reload was refused, naming the key file."""
    for line in r.b.log().splitlines():
        if (" bastion: " in line and "reload" in line.lower() and "does not match" in line
                and str(r.key) in line):
            return line
    return None


@pytest.mark.parametrize("trigger", ["sighup", "file_change"])
def test_broken_pair_refusal_is_logged(reloadable: Reloadable, trigger: str) -> None:
    r = reloadable
    _break(r, trigger)
    assert wait_until(lambda: _refusal_line(r) is not None,
                      timeout=3.0 if trigger == "sighup" else RELOAD_WAIT), r.b.log()[-3000:]


def test_watcher_loads_good_pair_after_broken_one(reloadable: Reloadable) -> None:
    r = reloadable
    _break(r, "file_change")
    assert wait_until(lambda: "certificate files changed" in r.b.log(), timeout=RELOAD_WAIT)
    time.sleep(0.5)  # the watcher has tried the broken pair and refused it
    assert peer_der(r.port, "localhost") == r.first.der
    good = r.new_pair("good")
    r.install(good)
    assert r.wait_for_certificate(good), "the watcher did not load the repaired pair"


# 6. Failed handshakes are counted ----------------------------------------------------------


def _handshake_errors(b: BastionProcess) -> float:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(b.config["admin_socket"])
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bastion\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    for line in data.decode().splitlines():
        if line.startswith("bastion_tls_handshake_errors_total"):
            return float(line.split()[-1])
    raise AssertionError("no bastion_tls_handshake_errors_total in /metrics")


def test_failed_handshakes_are_counted(main: Main) -> None:
    before = _handshake_errors(main.b)
    for _ in range(3):  # plain HTTP to the TLS port: each handshake fails
        with socket.create_connection(("127.0.0.1", main.https), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            with contextlib.suppress(OSError):
                sock.recv(100)
    assert wait_until(lambda: _handshake_errors(main.b) >= before + 3, timeout=10)
    # A good handshake is not counted.
    now = _handshake_errors(main.b)
    tls_connect(main.https, client_context(), "www.example.com").close()
    time.sleep(1.5)
    assert _handshake_errors(main.b) == now
