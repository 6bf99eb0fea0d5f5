"""One cgroup (v2) per app process: the exact set of processes that came from it.

Theory of operation
-------------------
A process group, a session and even the child subreaper can be left: a daemon that
double-forks, calls ``setsid()`` and empties its environment has nothing left that names
its app. A cgroup cannot be left by an unprivileged process, and every descendant is
born into its parent's cgroup. So, where the cgroup v2 hierarchy is mounted and
Bastion may write to its own cgroup (root, or a delegated cgroup under systemd with
``Delegate=yes``), Bastion makes ``bastion-PID/`` under its own cgroup and, for each app
process, a leaf ``APP-N/`` in it; the child joins its leaf between fork and exec
(``join_in_child``, before it drops privileges), so the app and everything it ever
starts are listed in that leaf's ``cgroup.procs``. When the app process is gone (crash,
stop, recycle) ``kill`` empties the leaf (``cgroup.kill`` where the kernel has it, else
SIGKILL to every listed pid until none is left) and the leaf is removed. The keeper is
told the ``bastion-PID`` directory, so a Bastion killed with SIGKILL still takes every
leaf with it. No controller is enabled: membership is all Bastion needs, which also
works in the "hybrid" layout (v2 mounted at ``/sys/fs/cgroup/unified``).

Where there is no usable cgroup v2 (not mounted, read-only, not root), or with
``BASTION_CGROUPS=off`` in the environment, ``CgroupRoot.create`` returns None and the
module falls back to the subreaper and the descendant tracker (``module.leftovers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import time

log = logging.getLogger("bastion.module")

DISABLE = "BASTION_CGROUPS"  # "off" / "0" / "no": use the subreaper fallback only
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def cgroup2_mount(mountinfo: str) -> str | None:
    """Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo text
    (pure); the pure v2 layout (``/sys/fs/cgroup``) before any other."""
    found = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("cgroup2 "):
            continue
        fields = left.split()
        if len(fields) >= 5:
            found.append(fields[4].replace("\\040", " "))
    found.sort(key=lambda mount: (mount != "/sys/fs/cgroup", mount))
    return found[0] if found else None


def own_cgroup(proc_cgroup: str) -> str | None:
    """This process's cgroup v2 path (``0::/a/b`` -> ``/a/b``), from /proc/self/cgroup
    text (pure)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def group_pids(path: str) -> list[int]:
    """The pids in cgroup ``path`` ([] when it is gone)."""
    try:
        return [int(x) for x in _read(os.path.join(path, "cgroup.procs")).split()]
    except (OSError, ValueError):
        return []


def kill_group(path: str) -> list[int]:
    """SIGKILL every process in cgroup ``path``; return the pids that were there."""
    pids = group_pids(path)
    if not pids:
        return []
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
        return pids
    except OSError:
        pass  # before Linux 5.14: one by one (none can leave; new ones are caught below)
    for _ in range(20):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        pids = group_pids(path)
        if not pids:
            break
    return pids


class AppCgroup:
    """The leaf cgroup of one app process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._procs = os.path.join(path, "cgroup.procs").encode()

    def join_in_child(self) -> None:
        """Move the calling process into this cgroup (between fork and exec: only
        plain system calls; a failure leaves the child where it is, tracked the old way)."""
        try:
            fd = os.open(self._procs, os.O_WRONLY)
        except OSError:
            return
        try:
            os.write(fd, b"0")
        except OSError:
            pass
        finally:
            os.close(fd)

    def pids(self) -> list[int]:
        """Every process in the cgroup now."""
        return group_pids(self.path)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process in the cgroup."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill_now(self) -> list[int]:
        """SIGKILL every process in the cgroup; return their pids."""
        return kill_group(self.path)

    async def kill_and_remove(self, timeout: float = 2.0) -> list[int]:
        """Kill everything in the cgroup, wait until it is empty, remove it."""
        killed = self.kill_now()
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return killed
            except FileNotFoundError:
                return killed
            except OSError:  # EBUSY: a process is still exiting
                if time.monotonic() >= deadline:
                    log.warning("cgroup %s not empty after %gs: left behind", self.path,
                                timeout)
                    return killed
            self.kill_now()
            await asyncio.sleep(0.01)


class CgroupRoot:
    """``bastion-PID/`` under Bastion's own cgroup: the parent of every app leaf."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._numbers = itertools.count(1)

    @classmethod
    def create(cls) -> CgroupRoot | None:
        """Make Bastion's cgroup directory; None when cgroups cannot be used here."""
        if os.environ.get(DISABLE, "").strip().lower() in ("off", "0", "no", "false"):
            return None
        try:
            mount = cgroup2_mount(_read("/proc/self/mountinfo"))
            own = own_cgroup(_read("/proc/self/cgroup"))
        except OSError:
            return None
        if mount is None or own is None:
            return None
        parent = os.path.join(mount, own.lstrip("/"))
        path = os.path.join(parent, f"bastion-{os.getpid()}")
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError:
            return None
        if not os.access(os.path.join(path, "cgroup.procs"), os.W_OK):
            with contextlib.suppress(OSError):
                os.rmdir(path)
            return None
        return cls(path)

    def new_group(self, app: str) -> AppCgroup | None:
        """A new leaf for one process of ``app`` (None when it cannot be made)."""
        path = os.path.join(self.path, f"{_UNSAFE.sub('_', app)}-{next(self._numbers)}")
        try:
            os.mkdir(path)
        except OSError as exc:
            log.warning("cannot make cgroup %s: %s", path, exc.strerror or exc)
            return None
        return AppCgroup(path)

    def leaves(self) -> list[str]:
        """The app leaves that exist now."""
        try:
            return [entry.path for entry in os.scandir(self.path) if entry.is_dir()]
        except OSError:
            return []

    def kill_all(self) -> list[int]:
        """SIGKILL every process in every leaf (and in the root itself)."""
        killed = kill_group(self.path)
        for leaf in self.leaves():
            killed += kill_group(leaf)
        return killed

    async def remove(self, timeout: float = 2.0) -> list[int]:
        """Kill whatever is left, remove every leaf and the root directory."""
        killed = kill_group(self.path)
        for leaf in self.leaves():
            killed += await AppCgroup(leaf).kill_and_remove(timeout)
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
        return killed
