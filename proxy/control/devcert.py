"""The development certificate used by the built-in demo and ``bastion dev-cert``.

Theory of operation
-------------------
A small local certificate authority (ECDSA P-256, ``CA:true``, ten years) signs one
leaf certificate (ECDSA P-256, 825 days) for ``localhost``, ``*.localhost``,
``127.0.0.1`` and ``::1``.  A user trusts the CA file once (``curl --cacert ca.pem``,
or a browser's certificate store) and every leaf it ever signs is then trusted too.

Four files live in :func:`dev_cert_dir`::

    ca.pem       the CA certificate (the file to trust)
    ca-key.pem   the CA private key (0600)
    cert.pem     the leaf certificate the HTTPS listener serves
    key.pem      the leaf private key (0600)

:func:`ensure_dev_cert` reuses the files when they load, belong together and the leaf is
valid for at least 30 more days.  Otherwise it signs a new leaf with the existing CA when
the CA is still sound (so the user's trust survives), or makes a new CA and leaf.

Concurrency: the check-and-create runs under an exclusive ``flock`` on ``.lock`` in the
directory, and every file is written to a temporary file, fsynced, chmod-ed and moved
into place with ``os.replace``.  Two processes starting at once therefore see either the
complete old set or the complete new set, never a mix, and the second one reuses what the
first created.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
BACKDATE = datetime.timedelta(hours=1)  # tolerate small clock differences

DNS_NAMES = ("localhost", "*.localhost")
IP_ADDRESSES = ("127.0.0.1", "::1")

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class DevCert:
    """Where the development certificate lives and what it is."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    fingerprint_sha256: str  # of the leaf certificate, "AB:CD:..." upper-case hex
    created: bool  # True when this call made (some of) the files


def dev_cert_dir() -> Path:
    """The directory for the development certificate.

    ``$BASTION_DATA_DIR`` if set, else ``$XDG_DATA_HOME/bastion``, else
    ``~/.local/share/bastion``.
    """
    explicit = os.environ.get("BASTION_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg).expanduser() / "bastion"
    return Path.home() / ".local" / "share" / "bastion"


def ensure_dev_cert(directory: Path | None = None) -> DevCert:
    """Return the development certificate in ``directory``, making it if needed.

    ``directory`` defaults to :func:`dev_cert_dir`.  Existing files are reused when they
    are readable, consistent and the leaf is valid for at least 30 more days; otherwise
    new ones are written (``created=True``).  Raises ``OSError`` when the directory
    cannot be created or written.
    """
    directory = dev_cert_dir() if directory is None else Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = _Paths(directory)
    with _locked(directory / LOCK_FILE):
        now = _now()
        leaf = _load_valid_leaf(paths, now)
        if leaf is not None:
            return paths.result(leaf, created=False)
        ca = _load_valid_ca(paths, now)
        if ca is None:
            ca = _make_ca(now)
            _write(paths.ca_key, _key_pem(ca.key), 0o600)
            _write(paths.ca, ca.cert.public_bytes(serialization.Encoding.PEM), 0o644)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf_cert = _make_leaf(ca, leaf_key, now)
        # Key first: a crash between the two writes leaves a key that does not match the
        # certificate, which the next call notices and repairs.
        _write(paths.key, _key_pem(leaf_key), 0o600)
        _write(paths.cert, leaf_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return paths.result(leaf_cert, created=True)


def describe(cert: DevCert) -> str:
    """A few lines for ``bastion dev-cert``: paths, fingerprint, expiry, how to trust it."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.cert_path.read_bytes())
        expiry = leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    except (OSError, ValueError) as exc:
        expiry = f"unknown ({exc})"
    state = "created" if cert.created else "existing"
    return "\n".join(
        [
            f"Development certificate ({state})",
            f"  certificate:  {cert.cert_path}",
            f"  private key:  {cert.key_path}",
            f"  CA to trust:  {cert.ca_path}",
            f"  SHA-256:      {cert.fingerprint_sha256}",
            f"  valid until:  {expiry}",
            f"  names:        {', '.join(DNS_NAMES + IP_ADDRESSES)}",
            "Trust it with curl:",
            f"  curl --cacert {cert.ca_path} https://localhost:8443/",
        ]
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of ``cert`` as upper-case hex pairs joined by colons."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# -- internals -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_FILE

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY_FILE

    @property
    def cert(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key(self) -> Path:
        return self.directory / KEY_FILE

    def result(self, leaf: x509.Certificate, *, created: bool) -> DevCert:
        return DevCert(
            cert_path=self.cert,
            key_path=self.key,
            ca_path=self.ca,
            fingerprint_sha256=fingerprint(leaf),
            created=created,
        )


@dataclass(frozen=True)
class _CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (no-op where flock does not exist)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path`` with ``data``; the file never exists with looser mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _valid_for(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


def _load_valid_ca(paths: _Paths, now: datetime.datetime) -> _CA | None:
    """The existing CA when its certificate and key load, match and stay valid a while."""
    cert = _load_cert(paths.ca)
    key = _load_key(paths.ca_key)
    if cert is None or key is None or not _same_public_key(cert, key):
        return None
    # A fresh leaf must not outlive the CA that signs it.
    if not _valid_for(cert, now) or cert.not_valid_after_utc < now + LEAF_VALIDITY:
        return None
    return _CA(cert, key)


def _load_valid_leaf(paths: _Paths, now: datetime.datetime) -> x509.Certificate | None:
    """The existing leaf when all its files are sound and it is valid for 30 more days."""
    leaf = _load_cert(paths.cert)
    key = _load_key(paths.key)
    ca = _load_cert(paths.ca)
    if leaf is None or key is None or ca is None:
        return None
    if not _same_public_key(leaf, key) or not _valid_for(leaf, now):
        return None
    if ca.not_valid_after_utc <= now:
        return None
    try:
        leaf.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return None
    return leaf


def _make_ca(now: datetime.datetime) -> _CA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bastion development CA"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"Bastion development CA ({socket.gethostname()[:32]})"
            ),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _CA(cert, key)


def _make_leaf(
    ca: _CA, key: ec.EllipticCurvePrivateKey, now: datetime.datetime
) -> x509.Certificate:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in DNS_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in IP_ADDRESSES]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bastion development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def _serial() -> int:
    # Positive, at most 20 octets, with 64+ bits of randomness (CA/B Forum style).
    return secrets.randbits(159) | 1
