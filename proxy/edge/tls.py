"""Server-side TLS: contexts per certificate, SNI selection, client certificates, reload.

Theory of operation
-------------------
A TLS listener has one or more certificate pairs (``tls.certificates``).
:class:`TLSContextSet` builds one :class:`ssl.SSLContext` per pair, all with the same
hardened settings: TLS 1.2 minimum, ECDHE with AEAD ciphers only for TLS 1.2
(``ECDHE+AESGCM:ECDHE+CHACHA20``; TLS 1.3 suites are AEAD by definition), server cipher
preference, no compression, no renegotiation, no stateless TLS 1.2 session tickets, the
listener's ALPN protocols, and the client-certificate mode.

The listening socket is bound to one extra *front* context (a copy of the first pair's
settings).  Its ``sni_callback`` runs for every ClientHello, with or without SNI, and
switches the connection to the context of the first pair whose certificate names
(SAN DNS names, else the subject CN) match the requested server name; exact match, or
``*.example.com`` matching exactly one extra label.  No SNI or no match gives the first
pair, the default.

Because the callback always switches, :meth:`TLSContextSet.reload` can build a complete
new set of per-pair contexts and swap them in with one assignment: new handshakes use
the new certificates, established connections keep theirs, and a failed reload (a
missing file, a key that does not match) raises :class:`TLSConfigError` and leaves the
old contexts serving.  OpenSSL takes a connection's verify mode and protocol options
from the context it was created with, so the front context's verify mode is updated on
reload as well; the CA store used to check client certificates comes from the switched
context.

Loading errors are reported as :class:`TLSConfigError` naming the file and the problem
(unreadable, not PEM, encrypted key, key does not match certificate).

Files or bytes.  Every loader takes an optional ``PemFiles`` mapping (file name -> its
bytes, from :func:`read_pem_files`).  The main process reads the files of a generation
once and hands the bytes to its workers, so a worker started later (a replacement) builds
exactly the contexts the running generation checked, whatever is on disk by then; only a
reload reads the files again.  OpenSSL loads a chain only from a file, so the bytes are
given to it through an anonymous in-memory file (``memfd``); nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..config.model import CertificatePair, TLSSettings

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


PemFiles = Mapping[str, bytes]  # file name as in the settings -> the file's bytes


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file."""


def tls_files(tls: TLSSettings) -> list[tuple[str, str]]:
    """Every (file, what it is) ``tls`` names: certificates, keys, the client CA."""
    paths = [entry for pair in tls.certificates
             for entry in ((pair.cert, "certificate"), (pair.key, "private key"))]
    if tls.client_ca:
        paths.append((tls.client_ca, "client CA"))
    return paths


def read_pem_files(settings: Iterable[TLSSettings]) -> dict[str, bytes]:
    """The bytes of every file the ``settings`` name, read once (TLSConfigError when one
    cannot be read). Hand them to :class:`TLSContextSet` to build from these bytes."""
    files: dict[str, bytes] = {}
    for tls in settings:
        for path, what in tls_files(tls):
            if path not in files:
                files[path] = _read(path, what, None)
    return files


@dataclass(frozen=True)
class _Entry:
    """One certificate pair, its names and its ready context."""

    pair: CertificatePair
    names: tuple[str, ...]
    context: ssl.SSLContext


def match_server_name(pattern: str, name: str) -> bool:
    """Whether certificate name ``pattern`` covers the requested server ``name``.

    Case-insensitive, a trailing dot ignored.  ``*.example.com`` matches
    ``a.example.com`` but neither ``example.com`` nor ``a.b.example.com``; a ``*``
    anywhere else is not a wildcard.
    """
    pattern = pattern.strip().rstrip(".").lower()
    name = name.strip().rstrip(".").lower()
    if not pattern or not name:
        return False
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        if len(suffix) < 2 or not name.endswith(suffix):
            return False
        label = name[: -len(suffix)]
        return bool(label) and "." not in label and "*" not in label
    return pattern == name


def certificate_names(pem_path: str | Path) -> list[str]:
    """The DNS names the first certificate in ``pem_path`` is for, lower-case.

    The subjectAltName DNS entries, or the subject common name when there are none.
    Raises :class:`TLSConfigError` when the file cannot be read or parsed.
    """
    return _names_of(_load_certificates(str(pem_path))[0])


def build_server_context(tls: TLSSettings, alpn: list[str],
                         files: PemFiles | None = None) -> ssl.SSLContext:
    """A server :class:`ssl.SSLContext` for a listener, SNI across all its certificates.

    ``alpn`` is the list of protocols to offer, most preferred first, e.g.
    ``["h2", "http/1.1"]``.  Raises :class:`TLSConfigError` when a file cannot be used.
    Use :class:`TLSContextSet` directly to be able to reload. ``files``: build from
    these bytes instead of reading the files.
    """
    return TLSContextSet(tls, alpn, files).context


class TLSContextSet:
    """The contexts of one TLS listener, with SNI selection and atomic reload.

    Bind the listening socket with :attr:`context`; call :meth:`reload` (e.g. on
    SIGHUP) to re-read the files.
    """

    def __init__(self, tls: TLSSettings, alpn: Sequence[str],
                 files: PemFiles | None = None) -> None:
        """Load every pair of ``tls`` (from ``files`` when given, else from disk);
        raises :class:`TLSConfigError` on a bad file."""
        self._alpn = list(alpn)
        self._lock = threading.Lock()
        entries = _build_entries(tls, self._alpn, files)
        self._settings = tls
        self._entries = entries
        self._front = _base_context(tls, self._alpn)
        _load_pair(self._front, entries[0].pair, files)
        _apply_client_auth(self._front, tls, files)
        self._front.sni_callback = self._on_server_name

    @property
    def context(self) -> ssl.SSLContext:
        """The context to bind the listening socket with; the same object after reloads."""
        return self._front

    @property
    def settings(self) -> TLSSettings:
        """The settings currently in use."""
        return self._settings

    @property
    def names(self) -> list[tuple[str, ...]]:
        """The certificate names of each pair, in order (the first is the default)."""
        return [entry.names for entry in self._entries]

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a requested server name: the first pair that matches, else
        the first pair."""
        entries = self._entries
        if server_name:
            for entry in entries:
                if any(match_server_name(pattern, server_name) for pattern in entry.names):
                    return entry.context
        return entries[0].context

    def reload(self, tls: TLSSettings | None = None, files: PemFiles | None = None) -> None:
        """Re-read the files (of ``tls``, or of the current settings) and swap them in;
        with ``files``, use those bytes instead of reading.

        On failure raises :class:`TLSConfigError` and keeps serving the old contexts.
        ALPN protocols stay as they were.
        """
        new = self._settings if tls is None else tls
        entries = _build_entries(new, self._alpn, files)
        with self._lock:
            _apply_client_auth(self._front, new, files)
            self._entries = entries
            self._settings = new

    def _on_server_name(
        self, connection: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        connection.context = self.select(server_name)
        return None


# -- building ------------------------------------------------------------------------


def _build_entries(tls: TLSSettings, alpn: list[str], files: PemFiles | None) -> list[_Entry]:
    if not tls.certificates:
        raise TLSConfigError("tls: at least one certificate is required")
    if tls.client_certificates != "none" and not tls.client_ca:
        raise TLSConfigError(
            f"tls: client_certificates: {tls.client_certificates} needs client_ca: FILE"
        )
    entries = []
    for pair in tls.certificates:
        names = _check_pair(pair, files)
        context = _base_context(tls, alpn)
        _load_pair(context, pair, files)
        _apply_client_auth(context, tls, files)
        entries.append(_Entry(pair, tuple(names), context))
    return entries


def _base_context(tls: TLSSettings, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_NO_TICKET
        | ssl.OP_SINGLE_ECDH_USE
    )
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def _apply_client_auth(context: ssl.SSLContext, tls: TLSSettings,
                       files: PemFiles | None) -> None:
    if tls.client_certificates == "none":
        context.verify_mode = ssl.CERT_NONE
        return
    assert tls.client_ca is not None  # checked in _build_entries
    try:
        if files is not None and tls.client_ca in files:
            context.load_verify_locations(cadata=files[tls.client_ca].decode("latin-1"))
        else:
            context.load_verify_locations(cafile=tls.client_ca)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{tls.client_ca}: not a PEM CA certificate file ({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise TLSConfigError(
            f"{tls.client_ca}: cannot read client CA file: {_reason(exc)}"
        ) from exc
    context.verify_mode = (
        ssl.CERT_REQUIRED if tls.client_certificates == "required" else ssl.CERT_OPTIONAL
    )


@contextlib.contextmanager
def _in_memory(path: str, files: PemFiles | None) -> Iterator[str]:
    """A name OpenSSL can open for ``path``: an anonymous in-memory copy of its bytes
    from ``files`` (``/proc/self/fd/N`` of a memfd), else ``path`` itself."""
    data = None if files is None else files.get(path)
    memfd_create = getattr(os, "memfd_create", None)
    if data is None or memfd_create is None or not os.path.isdir("/proc/self/fd"):
        yield path
        return
    fd = memfd_create("bastion-pem", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _load_pair(context: ssl.SSLContext, pair: CertificatePair, files: PemFiles | None) -> None:
    try:
        with _in_memory(pair.cert, files) as cert, _in_memory(pair.key, files) as key:
            context.load_cert_chain(certfile=cert, keyfile=key)
    except OSError as exc:  # includes ssl.SSLError
        raise TLSConfigError(
            f"{pair.cert} / {pair.key}: cannot load certificate and key: {_reason(exc)}"
        ) from exc


def _check_pair(pair: CertificatePair, files: PemFiles | None) -> list[str]:
    """Parse the pair with ``cryptography`` to give a precise error; return its names."""
    certs = _load_certificates(pair.cert, files)
    key_data = _read(pair.key, "private key", files)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError as exc:
        raise TLSConfigError(
            f"{pair.key}: the private key is encrypted; Bastion needs it unencrypted"
        ) from exc
    except ValueError as exc:
        raise TLSConfigError(f"{pair.key}: not a PEM private key ({exc})") from exc
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        key_public = key.public_key().public_bytes(der, spki)
        cert_public = certs[0].public_key().public_bytes(der, spki)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"{pair.cert}: unsupported key type ({exc})") from exc
    if key_public != cert_public:
        raise TLSConfigError(
            f"{pair.key}: private key does not match the certificate in {pair.cert}"
        )
    return _names_of(certs[0])


def _load_certificates(path: str, files: PemFiles | None = None) -> list[x509.Certificate]:
    data = _read(path, "certificate", files)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSConfigError(f"{path}: not a PEM certificate file ({exc})") from exc
    if not certs:
        raise TLSConfigError(f"{path}: no certificate in the file")
    return certs


def _read(path: str, what: str, files: PemFiles | None) -> bytes:
    if files is not None and path in files:
        return files[path]
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{path}: cannot read {what} file: {_reason(exc)}") from exc


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return [name.lower() for name in names]


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return exc.strerror or str(exc)
