"""Daemons that escape their app: double fork, ``setsid()``, an empty environment.

Such a daemon keeps neither the app's process group, nor its session, nor the
``BASTION_TOKEN`` in its environment. Two ways catch it (module/cgroups.py,
module/leftovers.py, module/supervisor.py):

* a cgroup (v2) per app process, where it can be used (root, a writable hierarchy):
  the daemon dies with its app's crash, with Bastion's stop, and with Bastion's SIGKILL
  (the keeper); the tests skip where no cgroup can be made;
* the fallback (``BASTION_CGROUPS=off``), the child subreaper: a child of Bastion that
  Bastion did not start came from an app. One still in its app process's session dies
  with that process; one that names no app dies at Bastion's stop at the latest, or
  with the keeper when Bastion is killed.

Real processes; each test's daemon is killed by the test at the end whatever happens.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import APPS, PY, BastionProcess, pid_alive, simple_config, wait_until
from test_workers import ready_pids

from bastion.module.cgroups import CgroupRoot, cgroup2_mount, own_cgroup

ROOT = os.geteuid() == 0


def _cgroups_usable() -> bool:
    root = CgroupRoot.create()
    if root is None:
        return False
    os.rmdir(root.path)
    return True


CGROUP_ONLY = pytest.mark.skipif(not (ROOT and _cgroups_usable()),
                                 reason="needs root and a writable cgroup v2 hierarchy")


class Daemon:
    """One Bastion with one app that leaves a daemon behind."""

    def __init__(self, tmp_path: Path, *, cgroups: bool, leaves: str = "session") -> None:
        self.pidfile = tmp_path / "daemon.pid"
        environment = {"PIDFILE": str(self.pidfile), "DAEMON_ENV": "empty",
                       "DAEMON_LEAVES": leaves}
        config = simple_config({"gc": {
            "command": [PY, str(APPS / "setsid_grandchild.py"), "{port}"],
            "environment": environment, "start_mode": "always",
            "shutdown_time_limit": 2}}, workers=1)
        env = {} if cgroups else {"BASTION_CGROUPS": "off"}
        self.bastion = BastionProcess(tmp_path, config, env=env).start()
        self.pid = 0
        self.app_pid = 0

    def wait(self) -> None:
        assert wait_until(lambda: ready_pids(self.bastion, "gc"), 20), self.bastion.log()
        (self.app_pid,) = self.bastion.app_pids("gc")
        assert wait_until(self.pidfile.exists, 10)
        self.pid = int(self.pidfile.read_text())
        proc = psutil.Process(self.pid)
        assert wait_until(lambda: proc.environ() == {}, 5)  # exec'd with nothing
        # It escaped the old ways: another process group, not the app's child, and
        # re-parented to Bastion, the subreaper.
        assert os.getpgid(self.pid) != os.getpgid(self.app_pid)
        assert proc.ppid() == self.bastion.pid

    def close(self) -> None:
        self.bastion.stop(signal.SIGKILL)
        if self.pid and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for daemon in made:
        daemon.close()


def _cgroup_of(pid: int) -> str:
    return own_cgroup(Path(f"/proc/{pid}/cgroup").read_text()) or ""


# -- pure helpers ---------------------------------------------------------------------------

def test_cgroup_paths_from_proc_text() -> None:
    hybrid = ("30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
              "31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    unified = ("40 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n" + hybrid)
    assert cgroup2_mount(hybrid) == "/sys/fs/cgroup/unified"
    assert cgroup2_mount(unified) == "/sys/fs/cgroup"
    assert cgroup2_mount("31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n") is None
    assert own_cgroup("4:memory:/x\n0::/system.slice/bastion.service\n") == \
        "/system.slice/bastion.service"
    assert own_cgroup("0::/\n") == "/"
    assert own_cgroup("4:memory:/x\n") is None


# -- cgroups ----------------------------------------------------------------------------------

@CGROUP_ONLY
def test_cgroup_daemon_dies_with_its_apps_crash(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, cgroups=True)
    daemons.append(daemon)
    daemon.wait()
    group = _cgroup_of(daemon.pid)
    assert f"/bastion-{daemon.bastion.pid}/gc-" in group, group
    assert _cgroup_of(daemon.app_pid) == group
    os.kill(daemon.app_pid, signal.SIGKILL)
    crashed = time.monotonic()
    assert wait_until(lambda: not pid_alive(daemon.pid), 5), daemon.bastion.log()
    print(f"\ndaemon killed {time.monotonic() - crashed:.3f}s after its app's crash")
    # The app comes back in a new cgroup of its own; the old one is removed.
    assert wait_until(lambda: ready_pids(daemon.bastion, "gc") not in ([], [daemon.app_pid]),
                      20)
    (new_pid,) = daemon.bastion.app_pids("gc")
    assert _cgroup_of(new_pid) != group
    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount is not None
    assert not os.path.exists(mount + group)
    assert daemon.bastion.stop() == 0, daemon.bastion.log()
    assert not os.path.exists(os.path.dirname(mount + group))  # bastion-PID/ removed


@CGROUP_ONLY
def test_cgroup_daemon_dies_at_bastions_stop(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, cgroups=True)
    daemons.append(daemon)
    daemon.wait()
    assert daemon.bastion.stop() == 0, daemon.bastion.log()
    assert not pid_alive(daemon.pid)
    assert not pid_alive(daemon.app_pid)


@CGROUP_ONLY
def test_cgroup_daemon_dies_when_bastion_is_killed(tmp_path: Path,
                                                    daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, cgroups=True)
    daemons.append(daemon)
    daemon.wait()
    group = _cgroup_of(daemon.pid)
    os.kill(daemon.bastion.pid, signal.SIGKILL)  # at once: no tick needed
    assert wait_until(lambda: not pid_alive(daemon.pid), 5)
    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    assert wait_until(lambda: not os.path.exists(f"{mount}{os.path.dirname(group)}"), 5)


# -- the subreaper fallback ------------------------------------------------------------------

def test_fallback_daemon_of_no_app_dies_at_bastions_stop(tmp_path: Path,
                                                         daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, cgroups=False)
    daemons.append(daemon)
    daemon.wait()
    assert "no usable cgroup" in daemon.bastion.log()
    assert _cgroup_of(daemon.pid) == _cgroup_of(daemon.bastion.pid)
    assert daemon.bastion.stop() == 0, daemon.bastion.log()
    assert not pid_alive(daemon.pid), daemon.bastion.log()


def test_fallback_daemon_in_its_apps_session_dies_with_its_crash(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, cgroups=False, leaves="pgid")
    daemons.append(daemon)
    daemon.wait()
    assert os.getsid(daemon.pid) == daemon.app_pid
    os.kill(daemon.app_pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(daemon.pid), 5), daemon.bastion.log()


def test_fallback_daemon_of_no_app_dies_when_bastion_is_killed(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, cgroups=False)
    daemons.append(daemon)
    daemon.wait()
    # Two ticks have seen it: the keeper guards it now.
    assert wait_until(lambda: "cannot be told" in daemon.bastion.log(), 5), \
        daemon.bastion.log()
    os.kill(daemon.bastion.pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(daemon.pid), 5)
