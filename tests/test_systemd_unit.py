"""deploy/bastion.service: ``systemd-analyze verify`` accepts it, and it says what Bastion does.

The verified copy points ExecStart/ExecStartPre at this venv's real ``bastion`` script
(systemd checks that the program exists and is executable). Skipped cleanly where
``systemd-analyze`` is missing. The keys checked here are the ones Bastion's behaviour
depends on: ``Type=notify`` (tests/test_sdnotify.py), SIGHUP reload
(tests/test_reload.py), ``KillMode=mixed`` with a drain (tests/test_workers.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "bastion.service"


def service() -> dict[str, list[str]]:
    """The [Service] section: key -> values in order."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header.group(1)
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def real_bastion() -> Path:
    """The ``bastion`` console script of the Python running the tests."""
    candidate = Path(sys.executable).parent / "bastion"
    if candidate.exists():
        return candidate
    found = shutil.which("bastion")
    if found is None:
        pytest.skip("no bastion console script installed")
    return Path(found)


def test_unit_is_notify_with_reload_and_drain() -> None:
    unit = service()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["KillSignal"] == ["SIGTERM"]
    watchdog = int(unit["WatchdogSec"][0])
    assert watchdog >= 2  # Bastion pings every WatchdogSec/2 (at least every 0.5 s)
    # TimeoutStopSec covers the request grace (30 s) plus an app's shutdown_time_limit.
    assert int(unit["TimeoutStopSec"][0]) >= 45
    assert "User" not in unit and "DynamicUser" not in unit  # root, then drop


def test_unit_capabilities_and_hardening() -> None:
    unit = service()
    bounding = unit["CapabilityBoundingSet"][0].split()
    for cap in ("CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN",
                "CAP_DAC_OVERRIDE"):
        assert cap in bounding
    assert not any(cap in bounding for cap in ("CAP_SYS_ADMIN", "CAP_NET_ADMIN",
                                               "CAP_SYS_PTRACE", "CAP_NET_RAW"))
    assert unit["AmbientCapabilities"] == [""]  # root needs none; dropped users get none
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectHome"] == ["read-only"]
    assert unit["PrivateTmp"][0] in ("yes", "true")
    assert unit["NoNewPrivileges"][0] in ("yes", "true")
    writable = unit["ReadWritePaths"][0].split()
    assert set(writable) == {"/var/log/bastion", "/run/bastion"}
    assert unit["RuntimeDirectory"] == ["bastion"] and unit["LogsDirectory"] == ["bastion"]
    # The admin socket's directory and deploy/bastion.yaml agree.
    assert "/run/bastion/admin.sock" in (DEPLOY / "bastion.yaml").read_text() or \
        "admin_socket" not in (DEPLOY / "bastion.yaml").read_text()


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    bastion = real_bastion()
    text = UNIT.read_text().replace("/usr/local/bin/bastion", str(bastion))
    assert str(bastion) in text
    copy = tmp_path / "bastion.service"
    copy.write_text(text)
    done = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    # Only lines about this unit count: the host's other units may have their own warnings.
    ours = [line for line in output.splitlines() if "bastion.service" in line]
    assert done.returncode == 0 and not ours, output


def test_systemd_analyze_catches_a_broken_copy(tmp_path: Path) -> None:
    """The verify test above can fail: a misspelt key and a missing program are reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = UNIT.read_text().replace("NotifyAccess=main", "NotifyAcess=main")
    copy = tmp_path / "bastion.service"
    copy.write_text(text.replace("/usr/local/bin/bastion", str(tmp_path / "missing")))
    done = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert "NotifyAcess" in output
    assert done.returncode != 0 and "missing" in output, output
