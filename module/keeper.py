"""The keeper: makes sure no app process outlives Bastion, even after ``kill -9``.

Theory of operation
-------------------
Bastion starts one small keeper process (``python -m bastion.module.keeper``) with a pipe on its
stdin. For every app process it launches, Bastion writes ``+PGID`` (the app is its own
process-group leader, so PGID is its pid); when the process is gone it writes ``-PGID``.
The keeper only reads. When its stdin reaches end-of-file, Bastion has exited, cleanly
or not (the kernel closes the pipe even on SIGKILL), and the keeper sends SIGKILL to every
process group still on its list, then exits. A clean stop has already stopped every
app, so the list is empty by then.

Where app processes run in cgroups (``module.cgroups``), Bastion also writes ``+CPATH``
for its cgroup directory: at end-of-file the keeper SIGKILLs every process in every app
cgroup below it (a daemon that left group and session included) and removes them.

The keeper ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C in Bastion's terminal reaches the
whole foreground group, and the keeper must outlive Bastion's own shutdown. It never
lingers itself: end-of-file is the only way out of its loop, and it always comes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from .cgroups import CgroupRoot


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_cgroup_tree(path: str) -> None:
    from .cgroups import AppCgroup, CgroupRoot

    root = CgroupRoot(path)
    root.kill_all()
    deadline = time.monotonic() + 2.0
    for leaf in root.leaves():
        cgroup = AppCgroup(leaf)
        while time.monotonic() < deadline:
            try:
                os.rmdir(leaf)
                break
            except FileNotFoundError:
                break
            except OSError:
                cgroup.kill_now()
                time.sleep(0.01)
    try:
        os.rmdir(path)
    except OSError:
        pass


def run(stream: IO[bytes]) -> None:
    """Read ``+PGID`` / ``-PGID`` lines until EOF, then kill the groups left."""
    groups: set[int] = set()
    pids: set[int] = set()
    cgroups: set[str] = set()
    for raw in stream:
        line = raw.strip()
        if len(line) < 2:
            continue
        if line[1:2] == b"C":  # a cgroup directory (module.cgroups)
            path = line[2:].decode(errors="surrogateescape")
            if line[:1] == b"+":
                cgroups.add(path)
            elif line[:1] == b"-":
                cgroups.discard(path)
            continue
        target = groups
        number = line[1:]
        if number[:1] == b"p":  # a single process (a descendant that left the group)
            target, number = pids, number[1:]
        try:
            value = int(number)
        except ValueError:
            continue
        if line[:1] == b"+":
            target.add(value)
        elif line[:1] == b"-":
            target.discard(value)
    for pgid in groups:
        _kill_group(pgid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for path in cgroups:
        _kill_cgroup_tree(path)


class Keeper:
    """Bastion's side of the keeper: start it, tell it about process groups."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        # Bastion's cgroup directory when app processes run in cgroups (set by the
        # supervisor; AppProcess.launch makes each process's leaf in it).
        self.cgroups: CgroupRoot | None = None

    def start(self) -> None:
        """Start the keeper process (idempotent)."""
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bastion.module.keeper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # out of the terminal's group: Ctrl-C does not reach it
        )

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def watch(self, pgid: int) -> None:
        """Kill group ``pgid`` if Bastion dies before calling ``forget``."""
        self._send(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        """Group ``pgid`` is gone; stop guarding it."""
        self._send(f"-{pgid}")

    def watch_pid(self, pid: int) -> None:
        """Kill the single process ``pid`` if Bastion dies (a descendant outside the group)."""
        self._send(f"+p{pid}")

    def forget_pid(self, pid: int) -> None:
        """Process ``pid`` is gone; stop guarding it."""
        self._send(f"-p{pid}")

    def watch_cgroup(self, path: str) -> None:
        """Kill every process in the cgroups below ``path`` if Bastion dies."""
        self._send(f"+C{path}")

    def forget_cgroup(self, path: str) -> None:
        """Bastion removed ``path`` itself."""
        self._send(f"-C{path}")

    @property
    def pid(self) -> int | None:
        """The keeper's pid while it runs."""
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        """Close the pipe (the keeper kills what is left, then exits) and reap it."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    run(sys.stdin.buffer)
