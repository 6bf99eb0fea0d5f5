"""systemd's notify protocol, seen from a fake systemd: a datagram socket in NOTIFY_SOCKET.

READY=1 (with MAINPID) once serving, RELOADING=1 then READY=1 around a SIGHUP reload,
STOPPING=1 on SIGTERM, in that order; WATCHDOG=1 every WATCHDOG_USEC/2 when it is set.
The unit file (deploy/bastion.service) relies on all of them (``Type=notify``).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from harness import BastionProcess, app_command, simple_config, wait_until
from test_workers import ready_pids, worker_pids

ECHO = app_command("uvicorn", "echo_asgi:app")


class FakeSystemd:
    """A SOCK_DGRAM unix socket collecting notify messages (each a dict, with its pid)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        """One message, or None after ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        for level, kind, cred in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                fields["_PID"] = str(int.from_bytes(cred[:4], "little"))
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """The next message carrying ``key`` (messages on the way are kept)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def keys(self) -> list[str]:
        """The state keys received so far, in order (watchdog pings left out)."""
        return [k for m in self.messages for k in m
                if k in ("READY", "RELOADING", "STOPPING")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_stopping(tmp_path: Path, systemd: FakeSystemd, workers: int) -> None:
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}},
                           workers=workers)
    bastion = BastionProcess(tmp_path, config, env={"NOTIFY_SOCKET": str(systemd.path)})
    bastion.start()
    try:
        ready = systemd.wait_for("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(bastion.pid)
        assert ready["_PID"] == str(bastion.pid)  # sent by the main process
        # READY means serving: the workers are up and the app answers.
        assert len(worker_pids(bastion)) == workers
        assert bastion.get("/info").status == 200
        assert systemd.keys() == ["READY"]

        config["apps"]["two"] = {"command": ECHO, "path": "/two"}
        bastion.path.write_text(yaml.safe_dump(bastion.config | {"apps": config["apps"]}))
        os.kill(bastion.pid, signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING")
        assert reloading["RELOADING"] == "1"
        usec = int(reloading["MONOTONIC_USEC"])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30_000_000
        again = systemd.wait_for("READY")
        assert again["READY"] == "1"
        assert bastion.status()["generation"] == 1
        assert bastion.get("/two/info").json()["app"] == "two"

        bastion.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        stopping = systemd.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert bastion.proc.wait(30) == 0  # type: ignore[union-attr]
        while systemd.receive(0.2) is not None:
            pass
        assert systemd.keys() == ["READY", "RELOADING", "READY", "STOPPING"]
    finally:
        bastion.stop(signal.SIGKILL)


def test_refused_reload_says_ready_again(tmp_path: Path, systemd: FakeSystemd) -> None:
    """systemd waits for READY=1 after RELOADING=1 even when the new config is refused."""
    config = simple_config({"echo": {"command": ECHO}})
    with BastionProcess(tmp_path, config, env={"NOTIFY_SOCKET": str(systemd.path)}) as bastion:
        systemd.wait_for("READY")
        bastion.path.write_text("listen: [}\n")
        os.kill(bastion.pid, signal.SIGHUP)
        systemd.wait_for("RELOADING")
        systemd.wait_for("READY", 10)
        assert bastion.get("/info").status == 200


def test_watchdog_pings(tmp_path: Path, systemd: FakeSystemd) -> None:
    config = simple_config({"echo": {"command": ECHO}})
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1000000"}
    with BastionProcess(tmp_path, config, env=env):
        systemd.wait_for("READY")
        started = time.monotonic()
        systemd.wait_for("WATCHDOG", 2)
        systemd.wait_for("WATCHDOG", 2)
        assert time.monotonic() - started < 2.2
        pings = [m for m in systemd.messages if "WATCHDOG" in m]
        assert all(m["WATCHDOG"] == "1" for m in pings)


def test_no_watchdog_without_watchdog_usec(tmp_path: Path, systemd: FakeSystemd) -> None:
    config = simple_config({"echo": {"command": ECHO}})
    with BastionProcess(tmp_path, config, env={"NOTIFY_SOCKET": str(systemd.path)}):
        systemd.wait_for("READY")
        while systemd.receive(1.5) is not None:
            pass
        assert not [m for m in systemd.messages if "WATCHDOG" in m]


def test_without_notify_socket_nothing_changes(tmp_path: Path) -> None:
    config = simple_config({"echo": {"command": ECHO}})
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    bastion = BastionProcess(tmp_path, config)
    bastion.env = env
    with bastion:
        assert bastion.get("/info").status == 200


def test_apps_do_not_inherit_notify_socket(tmp_path: Path, systemd: FakeSystemd) -> None:
    config = simple_config({"echo": {"command": ECHO, "start_mode": "always"}})
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "30000000"}
    with BastionProcess(tmp_path, config, env=env) as bastion:
        systemd.wait_for("READY")
        assert wait_until(lambda: ready_pids(bastion, "echo"), 20)
        (pid,) = bastion.app_pids("echo")
        environ = psutil.Process(pid).environ()
        assert "NOTIFY_SOCKET" not in environ
        assert "WATCHDOG_USEC" not in environ
