"""Finding and killing what an app process leaves behind.

Theory of operation
-------------------
Killing an app's process group catches its ordinary children (gunicorn's workers), but
not a grandchild that called ``setsid()`` or double-forked to leave the group. Bastion
makes itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``), so such orphans are
re-parented to Bastion instead of init, and it recognises them in two ways:

* ``DescendantTracker`` remembers every descendant seen under an app process (pid and
  creation time, so a reused pid is never mistaken for one) each time it is refreshed;
* an orphan re-parented to Bastion still carries the ``BASTION_TOKEN`` of the process
  that started it in its environment, which names its app process exactly.

* an orphan that did not leave its session (a double fork without ``setsid()``) still
  has the app process's session id: the app process is its session's leader.

``kill_leftovers`` SIGKILLs these kinds and reaps the ones that are Bastion's children.
The keeper is told about tracked descendants too, so they die even if Bastion is killed.

Anything else that is Bastion's child and that Bastion did not start itself came from an
app as well: only descendants of Bastion re-parent to it. Bastion's own children (app
processes, the keeper, proxy workers) are registered with ``note_own_child``;
``scan_children`` lists the others (*strays*). A stray that none of the rules above
names (a daemon that double-forked with ``setsid()`` and an empty environment before a
tick saw it) cannot be attributed to an app: the supervisor has the keeper guard it and
kills it at Bastion's stop at the latest. Where cgroups can be used
(``module.cgroups``) they name every such process exactly, and this is the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal

import psutil

log = logging.getLogger("bastion.module")

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of this process re-parent to it (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _same_process(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class DescendantTracker:
    """Every process ever seen below one app process (while it was alive)."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.seen: dict[int, float] = {}  # pid -> create_time

    def refresh(self) -> tuple[list[int], list[int]]:
        """Look at the tree again; return (pids seen for the first time, pids now gone)."""
        gone = [pid for pid in self.seen if not _same_process(pid, self.seen[pid])]
        for pid in gone:
            del self.seen[pid]
        try:
            children = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return [], gone
        new = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.pid not in self.seen:
                    self.seen[child.pid] = child.create_time()
                    new.append(child.pid)
        note_descendants(new)
        return new, gone

    def adopt(self, proc: psutil.Process) -> bool:
        """Track ``proc`` too (an orphan of this tree); True when it is new."""
        if proc.pid in self.seen:
            return False
        try:
            self.seen[proc.pid] = proc.create_time()
        except psutil.Error:
            return False
        note_descendants([proc.pid])
        return True

    def alive(self) -> list[psutil.Process]:
        """Tracked descendants that still exist (same pid and creation time)."""
        found = []
        for pid, created in self.seen.items():
            if _same_process(pid, created):
                with contextlib.suppress(psutil.Error):
                    found.append(psutil.Process(pid))
        return found


Orphans = dict[str, list[psutil.Process]]  # BASTION_TOKEN -> children carrying it


def orphans_by_token() -> Orphans:
    """This (subreaper) process's children, by the ``BASTION_TOKEN`` they carry: one
    scan of /proc serves every app process of a tick."""
    found: Orphans = {}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            token = child.environ().get("BASTION_TOKEN")
            if token:
                found.setdefault(token, []).append(child)
    return found


def orphans_with_token(token: str, root_pid: int) -> list[psutil.Process]:
    """Children carrying ``token`` or in the session ``root_pid`` leads, other than the
    app process ``root_pid`` itself."""
    found = {p.pid: p for p in orphans_by_token().get(token, []) if p.pid != root_pid}
    for child in psutil.Process().children():
        with contextlib.suppress(OSError, psutil.Error):
            if child.pid != root_pid and os.getsid(child.pid) == root_pid:
                found.setdefault(child.pid, child)
    return list(found.values())


# Children Bastion started itself (app processes, the keeper, proxy workers): pid ->
# creation time, so a reused pid is never taken for one of them.
_OWN: dict[int, float] = {}


def note_own_child(pid: int) -> None:
    """``pid`` is a child Bastion started itself (never a stray)."""
    with contextlib.suppress(psutil.Error):
        _OWN[pid] = psutil.Process(pid).create_time()


def forget_own_child(pid: int) -> None:
    """Bastion's own child ``pid`` is gone."""
    _OWN.pop(pid, None)


def is_own_child(proc: psutil.Process) -> bool:
    """True when ``proc`` is a child Bastion started itself."""
    created = _OWN.get(proc.pid)
    try:
        return created is not None and proc.create_time() == created
    except psutil.Error:
        return False


def session_of(pid: int) -> int | None:
    """The session id of ``pid`` (None when it is gone)."""
    try:
        return os.getsid(pid)
    except OSError:
        return None


def scan_strays() -> list[psutil.Process]:
    """This process's live children that it did not start itself: every one of them
    came from an app (only descendants re-parent to a subreaper)."""
    strays = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if not is_own_child(child) and child.status() != psutil.STATUS_ZOMBIE:
                strays.append(child)
    return strays


async def kill_leftovers(tracker: DescendantTracker, token: str) -> list[int]:
    """SIGKILL tracked descendants and token-carrying orphans; reap ours. Return pids."""
    victims = {p.pid: p for p in tracker.alive()}
    for proc in orphans_with_token(token, tracker.root_pid):
        victims.setdefault(proc.pid, proc)
    note_descendants(list(victims))
    for pid, proc in victims.items():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
        log.info("killed leftover process %d of app process %d", pid, tracker.root_pid)
    await reap_children(list(victims))
    return list(victims)


async def reap_children(pids: list[int], timeout: float = 2.0) -> None:
    """Collect the exit status of those ``pids`` that are our children (no zombies)."""
    pending = set(pids)
    deadline = asyncio.get_running_loop().time() + timeout
    while pending:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # not our child (the subreaper's init takes it), or reaped
            if done:
                pending.discard(pid)
        if not pending or asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.01)


# Descendants of app processes ever seen. Only these may be reaped by the sweep: every
# other child of this process (app processes, the keeper, proxy workers) was started
# through asyncio or subprocess, which must collect its exit status itself.
_DESCENDANTS: set[int] = set()


def note_descendants(pids: list[int]) -> None:
    """Remember ``pids`` as app descendants (reaped by the sweep if they come to us)."""
    _DESCENDANTS.update(pids)


def reap_orphan_zombies() -> list[int]:
    """Reap zombie children that are orphaned app descendants, and only those."""
    reaped = []
    children = {child.pid: child for child in psutil.Process().children()}
    for pid in list(_DESCENDANTS):
        child = children.get(pid)
        if child is None:
            if not psutil.pid_exists(pid):
                _DESCENDANTS.discard(pid)
            continue
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(pid, os.WNOHANG)
                _DESCENDANTS.discard(pid)
                reaped.append(pid)
    return reaped


def listener_pids(port: int) -> list[int]:
    """Pids holding a listening TCP socket on 127.0.0.1:``port`` (best effort)."""
    pids = []
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid:
                    pids.append(conn.pid)
    return pids
