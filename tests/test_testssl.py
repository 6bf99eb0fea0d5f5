"""testssl.sh against a real Bastion HTTPS listener (with ``hsts``): one focused run.

Protocols, cipher categories (``--std``), RC4, forward secrecy and the HTTP headers of
``/``; the verdicts come from testssl's flat JSON file (``--jsonfile``). Ids differ a
little between testssl versions (3.0: ``PFS`` and ``HSTS_time``; 3.2: ``FS`` and
``HSTS_time``), so each check accepts the known spellings. Skipped when ``testssl``
(Debian package ``testssl.sh``) is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trustme
from conftest import tls_config
from harness import BastionProcess, app_command, free_port

HSTS = 31536000
TESTSSL_TIMEOUT = 180

NOT_OFFERED = {
    "SSLv2": "SSLv2",
    "SSLv3": "SSLv3",
    "TLS1": "TLS 1.0",
    "TLS1_1": "TLS 1.1",
    "cipherlist_NULL": "NULL ciphers",
    "cipherlist_aNULL": "anonymous (aNULL) ciphers",
    "cipherlist_EXPORT": "export ciphers",
    "cipherlist_LOW": "LOW ciphers (64 bit, DES, RC2, RC4)",
    "cipherlist_3DES_IDEA": "3DES / IDEA ciphers",
    "cipherlist_AVERAGE": "obsolete CBC ciphers",
}


def _testssl() -> str:
    path = shutil.which("testssl") or shutil.which("testssl.sh")
    if path is None:
        pytest.skip("testssl is not installed (apt-get install testssl.sh)")
    return path


@pytest.fixture(scope="module")
def findings(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, dict[str, Any]]]:
    """testssl's findings by id, from one run against a fresh Bastion."""
    testssl = _testssl()
    tmp = tmp_path_factory.mktemp("testssl")
    port = free_port()
    config = {
        "listen": [{"address": f"127.0.0.1:{port}",
                    "tls": {**tls_config(tls_ca, tmp / "tls"), "hsts": HSTS}}],
        "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app")}},
    }
    bastion = BastionProcess(tmp, config, tls_ca=tls_ca).start()
    try:
        assert bastion.get("/info").status == 200  # "/" answers: testssl reads its headers
        report = tmp / "testssl.json"
        run = subprocess.run(
            [testssl, "--protocols", "--std", "--rc4", "--fs", "--headers",
             "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
             "--connect-timeout", "10", "--openssl-timeout", "10",
             "--jsonfile", str(report), f"https://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=TESTSSL_TIMEOUT,
        )
        if not report.exists():
            pytest.fail(f"testssl wrote no JSON (exit {run.returncode}):\n"
                        f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}")
        entries = json.loads(report.read_text())
        by_id = {entry["id"]: entry for entry in entries if "id" in entry}
        by_id["_stdout"] = {"finding": run.stdout}
        yield by_id
    finally:
        bastion.stop()


def _finding(findings: dict[str, dict[str, Any]], *ids: str) -> dict[str, Any]:
    for name in ids:
        if name in findings:
            return findings[name]
    known = sorted(k for k in findings if not k.startswith("_"))
    pytest.fail(f"testssl reported none of {ids}; ids: {known}")


@pytest.mark.parametrize("check", sorted(NOT_OFFERED))
def test_not_offered(findings: dict[str, dict[str, Any]], check: str) -> None:
    entry = _finding(findings, check)
    assert entry["finding"].lower().startswith("not offered"), (NOT_OFFERED[check], entry)


def test_rc4_not_offered(findings: dict[str, dict[str, Any]]) -> None:
    entry = _finding(findings, "RC4")
    finding = entry["finding"].lower()  # 3.0: "not vulnerable"; some versions: "no RC4 ..."
    assert any(word in finding for word in ("not vulnerable", "not offered", "no rc4")), entry
    assert entry["severity"] in ("OK", "INFO"), entry


def test_modern_protocols_offered(findings: dict[str, dict[str, Any]]) -> None:
    assert _finding(findings, "TLS1_2")["finding"].startswith("offered")
    assert _finding(findings, "TLS1_3")["finding"].startswith("offered")
    assert _finding(findings, "ALPN_HTTP2")["finding"] == "h2"


def test_forward_secrecy_offered(findings: dict[str, dict[str, Any]]) -> None:
    entry = _finding(findings, "FS", "PFS")
    assert entry["finding"].startswith("offered") and entry["severity"] == "OK", entry
    ciphers = _finding(findings, "FS_ciphers", "PFS_ciphers")["finding"].split()
    assert ciphers
    for cipher in ciphers:
        assert cipher.startswith(("TLS_", "ECDHE-")), cipher
        assert "GCM" in cipher or "CHACHA20" in cipher, cipher


def test_hsts_present(findings: dict[str, dict[str, Any]]) -> None:
    entry = _finding(findings, "HSTS_time", "HSTS")
    assert str(HSTS) in entry["finding"], entry
    assert entry["severity"] == "OK", entry


def test_nothing_high_or_critical(findings: dict[str, dict[str, Any]]) -> None:
    bad = {k: v for k, v in findings.items()
           if not k.startswith("_") and v.get("severity") in ("HIGH", "CRITICAL")}
    assert not bad, bad
