"""Shared fixtures: a test certificate authority (trustme) and TLS listener settings.

``tls_ca`` is one session-wide ``trustme.CA``; ``tls_config(ca, directory)`` issues a
server certificate for the loopback names (and ``example.com`` / ``*.example.com``),
writes it to ``directory`` and returns the ``tls:`` mapping of a listener. A client
trusts it with ``ca.configure_trust(ssl_context)`` or the file ``ca_pem_path(ca, dir)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

SERVER_NAMES = ("127.0.0.1", "::1", "localhost", "example.com", "*.example.com")


def tls_config(ca: trustme.CA, directory: Path, *names: str) -> dict[str, Any]:
    """The ``tls:`` mapping of a listener, with a fresh certificate written to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(*(names or SERVER_NAMES))
    cert = directory / "server.pem"
    key = directory / "server.key"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for extra in leaf.cert_chain_pems[1:]:
        with open(cert, "ab") as f:
            f.write(extra.bytes())
    return {"certificates": [{"cert": str(cert), "key": str(key)}]}


def ca_pem_path(ca: trustme.CA, directory: Path) -> Path:
    """The CA certificate written to ``directory/ca.pem`` (for clients such as curl)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """One certificate authority for the whole test session."""
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_settings(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A ready ``tls:`` mapping (server certificate files shared by the session)."""
    return tls_config(tls_ca, tmp_path_factory.mktemp("tls"))
