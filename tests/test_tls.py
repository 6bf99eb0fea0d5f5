"""TLS contexts (proxy.tls) and the development certificate (proxy.devcert).

Pure tests of name matching, then real handshakes: an asyncio TLS server on 127.0.0.1
(the way the listener uses the context, through ``SSLObject``) in a background thread,
and blocking ``ssl`` clients in the test thread.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import trustme

from bastion.proxy.config.model import CertificatePair, TLSSettings
from bastion.proxy.control import devcert
from bastion.proxy.control.devcert import DevCert, describe, dev_cert_dir, ensure_dev_cert
from bastion.proxy.edge.tls import (
    TLSConfigError,
    TLSContextSet,
    build_server_context,
    certificate_names,
    match_server_name,
)

# -- pure: name matching ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("example.com", "example.com", True),
        ("Example.COM", "example.com", True),
        ("example.com", "EXAMPLE.com.", True),
        ("example.com", "www.example.com", False),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "WWW.Example.Com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "wwwexample.com", False),
        ("www.*.com", "www.example.com", False),
        ("w*.example.com", "www.example.com", False),
        ("*", "localhost", False),
        ("", "", False),
        ("example.com", "", False),
    ],
)
def test_match_server_name(pattern: str, name: str, expected: bool) -> None:
    assert match_server_name(pattern, name) is expected


# -- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What a client saw."""

    dns_names: tuple[str, ...]
    alpn: str | None
    version: str | None
    cipher: str
    body: bytes


def write_pair(ca: trustme.CA, directory: Path, stem: str, *names: str) -> CertificatePair:
    """Issue a certificate for ``names`` and write it (with chain) and its key as PEM."""
    leaf = ca.issue_cert(*names)
    cert = directory / f"{stem}.pem"
    key = directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return CertificatePair(cert=str(cert), key=str(key))


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    peer = ssl_object.getpeercert() if ssl_object is not None else None
    writer.write(f"ok alpn={alpn} client={'yes' if peer else 'no'}\n".encode())
    try:
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


@contextmanager
def serving(context: ssl.SSLContext) -> Iterator[int]:
    """Run an asyncio TLS server with ``context`` in a thread; yield its port."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # failed handshakes are expected
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(_handle, "127.0.0.1", 0, ssl=context)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def client_context(ca: trustme.CA | None = None, cafile: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if ca is not None:
        ca.configure_trust(context)
    return context


def connect(port: int, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
    """Handshake, read the server's one-line reply until EOF, report what was seen."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            peer = tls.getpeercert() or {}
            alt_names = cast(tuple[tuple[str, str], ...], peer.get("subjectAltName", ()))
            sans = tuple(value for kind, value in alt_names if kind == "DNS")
            cipher = tls.cipher()
            alpn, version = tls.selected_alpn_protocol(), tls.version()
            body = b""
            while chunk := tls.recv(4096):
                body += chunk
            return Reply(sans, alpn, version, cipher[0] if cipher else "", body)


def refused(port: int, context: ssl.SSLContext, server_hostname: str) -> bool:
    """Whether the server rejects the client: a failed handshake, or (TLS 1.3, where the
    server checks the client certificate after the client finishes) no reply at all."""
    try:
        reply = connect(port, context, server_hostname)
    except (ssl.SSLError, ConnectionError):
        return True
    return not reply.body.startswith(b"ok ")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def sni_settings(ca: trustme.CA, tmp_path: Path) -> TLSSettings:
    return TLSSettings(
        certificates=(
            write_pair(ca, tmp_path, "default", "default.test"),
            write_pair(ca, tmp_path, "exact", "a.example.com", "shared.example.com"),
            write_pair(ca, tmp_path, "wild", "*.wild.example.com"),
            write_pair(ca, tmp_path, "shared", "shared.example.com", "b.example.com"),
        )
    )


# -- SNI -------------------------------------------------------------------------------


def test_certificate_names(ca: trustme.CA, tmp_path: Path) -> None:
    pair = write_pair(ca, tmp_path, "x", "A.example.com", "*.b.example.com", "127.0.0.1")
    assert certificate_names(pair.cert) == ["a.example.com", "*.b.example.com"]


@pytest.mark.parametrize(
    ("server_hostname", "expected"),
    [
        ("default.test", ("default.test",)),
        ("a.example.com", ("a.example.com", "shared.example.com")),
        ("A.Example.Com", ("a.example.com", "shared.example.com")),
        ("x.wild.example.com", ("*.wild.example.com",)),
        ("b.example.com", ("shared.example.com", "b.example.com")),
        # the first matching pair wins
        ("shared.example.com", ("a.example.com", "shared.example.com")),
        # no match: the default (hostname check off so the handshake can finish)
        ("unknown.example.org", ("default.test",)),
        ("x.y.wild.example.com", ("default.test",)),
        (None, ("default.test",)),
    ],
)
def test_sni_selects_certificate(
    ca: trustme.CA,
    sni_settings: TLSSettings,
    server_hostname: str | None,
    expected: tuple[str, ...],
) -> None:
    context = build_server_context(sni_settings, ["http/1.1"])
    client = client_context(ca)
    if expected == ("default.test",) and server_hostname != "default.test":
        client.check_hostname = False
    with serving(context) as port:
        reply = connect(port, client, server_hostname)
    assert reply.dns_names == expected
    assert reply.body.startswith(b"ok ")


def test_alpn_negotiates_http11(ca: trustme.CA, sni_settings: TLSSettings) -> None:
    client = client_context(ca)
    client.set_alpn_protocols(["h2", "http/1.1"])
    with serving(build_server_context(sni_settings, ["http/1.1"])) as port:
        reply = connect(port, client, "a.example.com")
    assert reply.alpn == "http/1.1"
    assert b"alpn=http/1.1" in reply.body

    only_h1 = client_context(ca)
    only_h1.set_alpn_protocols(["http/1.1"])
    with serving(build_server_context(sni_settings, ["h2", "http/1.1"])) as port:
        assert connect(port, only_h1, "x.wild.example.com").alpn == "http/1.1"
        assert connect(port, client, "x.wild.example.com").alpn == "h2"


# -- protocol versions and ciphers -----------------------------------------------------


def test_tls12_uses_ecdhe_aead(ca: trustme.CA, sni_settings: TLSSettings) -> None:
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with serving(build_server_context(sni_settings, ["http/1.1"])) as port:
        reply = connect(port, client, "default.test")
    assert reply.version == "TLSv1.2"
    assert reply.cipher.startswith("ECDHE-")
    assert "GCM" in reply.cipher or "CHACHA20" in reply.cipher


def test_tls12_without_ecdhe_is_refused(ca: trustme.CA, sni_settings: TLSSettings) -> None:
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("AES128-SHA:AES256-GCM-SHA384")  # RSA key exchange only
    with serving(build_server_context(sni_settings, ["http/1.1"])) as port:
        with pytest.raises(ssl.SSLError):
            connect(port, client, "default.test")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls11_client_is_refused(ca: trustme.CA, sni_settings: TLSSettings) -> None:
    client = client_context(ca)
    try:
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
        client.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"local OpenSSL cannot configure a TLS 1.1 client: {exc}")
    with serving(build_server_context(sni_settings, ["http/1.1"])) as port:
        with pytest.raises(ssl.SSLError) as info:
            connect(port, client, "default.test")
    if "NO_PROTOCOLS_AVAILABLE" in str(info.value).upper().replace(" ", "_"):
        pytest.skip("local OpenSSL refuses to offer TLS 1.1 at all")
    assert "PROTOCOL" in str(info.value).upper()


# -- loading errors --------------------------------------------------------------------


def test_mismatched_key_names_the_file(ca: trustme.CA, tmp_path: Path) -> None:
    one = write_pair(ca, tmp_path, "one", "one.test")
    two = write_pair(ca, tmp_path, "two", "two.test")
    bad = TLSSettings(certificates=(CertificatePair(cert=one.cert, key=two.key),))
    with pytest.raises(TLSConfigError) as info:
        build_server_context(bad, ["http/1.1"])
    assert two.key in str(info.value)
    assert "does not match" in str(info.value)


def test_missing_and_non_pem_files(ca: trustme.CA, tmp_path: Path) -> None:
    good = write_pair(ca, tmp_path, "good", "good.test")
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match="missing.pem: cannot read certificate"):
        build_server_context(TLSSettings((CertificatePair(missing, good.key),)), [])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(TLSConfigError, match="garbage.pem: not a PEM certificate"):
        build_server_context(TLSSettings((CertificatePair(str(garbage), good.key),)), [])
    with pytest.raises(TLSConfigError, match="garbage.pem: not a PEM private key"):
        build_server_context(TLSSettings((CertificatePair(good.cert, str(garbage)),)), [])
    with pytest.raises(TLSConfigError, match="client_ca"):
        build_server_context(
            TLSSettings((good,), client_certificates="required", client_ca=None), []
        )
    with pytest.raises(TLSConfigError, match="missing.pem: cannot read client CA"):
        build_server_context(
            TLSSettings((good,), client_certificates="optional", client_ca=missing), []
        )


# -- client certificates ---------------------------------------------------------------


def test_required_client_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_file))
    settings = TLSSettings(
        certificates=(write_pair(ca, tmp_path, "srv", "srv.test"),),
        client_certificates="required",
        client_ca=str(client_ca_file),
    )
    with serving(build_server_context(settings, ["http/1.1"])) as port:
        # No certificate: TLS 1.2 fails in the handshake, TLS 1.3 right after it.
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            anonymous = client_context(ca)
            anonymous.maximum_version = version
            assert refused(port, anonymous, "srv.test"), version

        # A certificate from another CA is not enough.
        stranger = client_context(ca)
        trustme.CA().issue_cert("mallory@example.com").configure_cert(stranger)
        assert refused(port, stranger, "srv.test")

        member = client_context(ca)
        client_ca.issue_cert("alice@example.com").configure_cert(member)
        assert b"client=yes" in connect(port, member, "srv.test").body


def test_optional_client_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_file))
    settings = TLSSettings(
        certificates=(write_pair(ca, tmp_path, "srv", "srv.test"),),
        client_certificates="optional",
        client_ca=str(client_ca_file),
    )
    with serving(build_server_context(settings, ["http/1.1"])) as port:
        assert b"client=no" in connect(port, client_context(ca), "srv.test").body
        member = client_context(ca)
        client_ca.issue_cert("alice@example.com").configure_cert(member)
        assert b"client=yes" in connect(port, member, "srv.test").body


# -- reload ----------------------------------------------------------------------------


def test_reload_swaps_certificates_and_keeps_old_on_failure(ca: trustme.CA, tmp_path: Path) -> None:
    first = TLSSettings((write_pair(ca, tmp_path, "first", "first.test"),))
    second = TLSSettings((write_pair(ca, tmp_path, "second", "second.test"),))
    contexts = TLSContextSet(first, ["http/1.1"])
    client = client_context(ca)
    client.check_hostname = False
    with serving(contexts.context) as port:
        assert connect(port, client, "anything.test").dns_names == ("first.test",)
        contexts.reload(second)
        assert connect(port, client, "anything.test").dns_names == ("second.test",)
        broken = TLSSettings(
            (CertificatePair(str(tmp_path / "nope.pem"), second.certificates[0].key),)
        )
        with pytest.raises(TLSConfigError, match="nope.pem"):
            contexts.reload(broken)
        assert contexts.settings is second
        assert connect(port, client, "anything.test").dns_names == ("second.test",)
        # Re-reading the same paths picks up new file contents.
        write_pair(ca, tmp_path, "second", "renewed.test")
        contexts.reload()
        assert connect(port, client, "anything.test").dns_names == ("renewed.test",)


# -- development certificate -----------------------------------------------------------


def test_dev_cert_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BASTION_DATA_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert dev_cert_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BASTION_DATA_DIR")
    assert dev_cert_dir() == tmp_path / "xdg" / "bastion"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dev_cert_dir() == tmp_path / "home" / ".local" / "share" / "bastion"


def test_dev_cert_made_once_then_reused(tmp_path: Path) -> None:
    first = ensure_dev_cert(tmp_path / "data")
    assert first.created
    second = ensure_dev_cert(tmp_path / "data")
    assert not second.created
    assert second.fingerprint_sha256 == first.fingerprint_sha256
    assert len(first.fingerprint_sha256.split(":")) == 32
    for key in (first.key_path, first.key_path.parent / devcert.CA_KEY_FILE):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = describe(second)
    assert f"curl --cacert {second.ca_path}" in text
    assert second.fingerprint_sha256 in text
    assert "valid until" in text


def test_dev_cert_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BASTION_DATA_DIR", str(tmp_path / "env"))
    cert = ensure_dev_cert()
    assert cert.cert_path.parent == tmp_path / "env"


# "*.localhost" is in the certificate (Bastion's own SNI matching uses it), but OpenSSL
# clients refuse a wildcard directly above a single-label name, so it is not tested here.
@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", "::1"])
def test_dev_cert_verifies_with_its_ca(tmp_path: Path, server_hostname: str) -> None:
    cert = ensure_dev_cert(tmp_path)
    settings = TLSSettings((CertificatePair(str(cert.cert_path), str(cert.key_path)),))
    client = client_context(cafile=cert.ca_path)
    with serving(build_server_context(settings, ["http/1.1"])) as port:
        reply = connect(port, client, server_hostname)
    assert reply.dns_names == ("localhost", "*.localhost")


def test_dev_cert_broken_files_are_replaced(tmp_path: Path) -> None:
    first = ensure_dev_cert(tmp_path)
    first.cert_path.write_text("not a certificate")
    second = ensure_dev_cert(tmp_path)
    assert second.created
    assert second.fingerprint_sha256 != first.fingerprint_sha256
    first.key_path.unlink()
    assert ensure_dev_cert(tmp_path).created


def test_dev_cert_renewed_before_expiry_with_same_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ensure_dev_cert(tmp_path)
    ca_before = first.ca_path.read_bytes()
    real_now = devcert._now
    monkeypatch.setattr(
        devcert, "_now", lambda: real_now() + devcert.LEAF_VALIDITY - devcert.RENEW_BEFORE
    )
    renewed = ensure_dev_cert(tmp_path)
    assert renewed.created
    assert renewed.fingerprint_sha256 != first.fingerprint_sha256
    assert renewed.ca_path.read_bytes() == ca_before  # the user's trust in the CA survives


def test_dev_cert_concurrent_callers_agree(tmp_path: Path) -> None:
    results: list[DevCert] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        results.append(ensure_dev_cert(tmp_path))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4
    assert sum(result.created for result in results) == 1
    assert len({result.fingerprint_sha256 for result in results}) == 1
