"""One app process: launch it, wait until it listens, stop it.

Theory of operation
-------------------
``AppProcess.launch`` starts the app's argv (``{port}`` / ``{socket}`` substituted) as the
leader of a new session and process group, stdin from /dev/null, stdout and stderr into
one pipe drained into the app's ``AppOutput``. The environment carries the port, a fresh
token of 256 random bits, the path base and the app's name. The child asks the kernel
for SIGKILL when Bastion dies (``PR_SET_PDEATHSIG``), and the keeper kills its whole
group in that case too, so neither the app nor its children outlive Bastion. Where
cgroups can be used (``module.cgroups``, handed over with the keeper) the child first
joins a cgroup of its own: then every process it ever starts is signalled and killed
with it, even one that left its group and session, and the cgroup goes with it.

``wait_ready`` polls the port (or socket) until it accepts a connection, the process
exits, or ``startup_time_limit`` passes. A port that accepts is taken for the app only
when the listening socket belongs to the launched process tree (``probes.tree_listens``):
another process may hold the port chosen for the app, and it must never get the app's
requests or its pairing token; that start fails with ``port_taken`` and the controller
tries another port. ``stop`` sends SIGTERM to the group, waits up to
``shutdown_time_limit``, then sends SIGKILL to the group. Nothing here decides what an
exit means: the app controller does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import secrets
import shlex
import signal
import time
from collections.abc import Callable

from .cgroups import AppCgroup
from .errors import LaunchError, StartFailed
from .keeper import Keeper
from .leftovers import (
    DescendantTracker,
    Orphans,
    forget_own_child,
    kill_leftovers,
    listener_pids,
    note_own_child,
    orphans_by_token,
)
from .output import AppOutput, drain
from .probes import tree_listens
from .spec import AppSpec

_PR_SET_PDEATHSIG = 1
log = logging.getLogger("bastion.module")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _child_setup(uid: int | None, gid: int | None, groups: list[int],
                 cgroup: AppCgroup | None = None) -> Callable[[], None]:
    """What the child does between fork and exec: join its cgroup, die with Bastion,
    become the user.

    The identity is switched here rather than with ``subprocess``'s ``user=`` arguments,
    which uvloop's subprocess support does not accept.
    """

    def setup() -> None:
        if cgroup is not None:
            cgroup.join_in_child()  # while still root
        if gid is not None:
            os.setgroups(groups)
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
        _die_with_parent()  # after setuid: a credential change clears the death signal

    return setup


def describe_exit(returncode: int | None) -> str:
    """``exited with status 3`` or ``killed by signal SIGKILL``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exited with status {returncode}"


class AppProcess:
    """A single process of an app, from launch to reaping."""

    def __init__(self, spec: AppSpec, port: int, socket_path: str | None = None) -> None:
        self.spec = spec
        self.port = port
        self.socket_path = socket_path
        self.token = secrets.token_urlsafe(32)
        self.pid = 0
        self.started_at = 0.0  # monotonic
        self.ready_at = 0.0
        self.requests = 0
        self.stopping = False
        self.draining_since = 0.0  # monotonic; 0 while it takes requests
        self.tracker: DescendantTracker | None = None
        self.cgroup: AppCgroup | None = None
        self._keeper: Keeper | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    # -- launch ---------------------------------------------------------------------
    def _argv(self) -> list[str]:
        subs = {"{port}": str(self.port), "{socket}": self.socket_path or ""}
        argv = []
        for arg in self.spec.command:
            for key, value in subs.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        return argv

    def environment(self) -> dict[str, str]:
        """The full environment the process gets."""
        env = dict(os.environ)
        # Bastion's own settings and systemd's notify channel are not the app's: an app
        # server that speaks sd_notify (gunicorn does) must not talk for Bastion.
        for name in ("BASTION_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        env.update(self.spec.environment)
        env.update(
            PORT=str(self.port),
            BASTION_PORT=str(self.port),
            BASTION_TOKEN=self.token,
            BASTION_PATH_BASE=self.spec.path_base,
            BASTION_APP=self.spec.name,
        )
        if self.spec.https_port is not None:
            env["BASTION_HTTPS_PORT"] = str(self.spec.https_port)
        if self.socket_path is not None:
            env["BASTION_SOCKET"] = self.socket_path
        return env

    async def launch(self, output: AppOutput, keeper: Keeper) -> None:
        """Start the process; raise ``LaunchError`` when it cannot even be started."""
        uid: int | None = None
        gid: int | None = None
        groups: list[int] = []
        env_home: dict[str, str] = {}
        user = self.spec.settings.user
        if user is not None and os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(user)
            except KeyError as exc:
                raise LaunchError(f"user {user!r} does not exist") from exc
            uid, gid = entry.pw_uid, entry.pw_gid
            groups = os.getgrouplist(user, entry.pw_gid)
            env_home = {"HOME": entry.pw_dir, "USER": user, "LOGNAME": user}
        if keeper.cgroups is not None:
            self.cgroup = keeper.cgroups.new_group(self.spec.name)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.spec.cwd,
                env={**self.environment(), **env_home},
                start_new_session=True,
                preexec_fn=_child_setup(uid, gid, groups, self.cgroup),
            )
        except OSError as exc:
            if self.cgroup is not None:
                await self.cgroup.kill_and_remove()
                self.cgroup = None
            reason = f"cannot run {self.spec.command[0]!r}: {exc.strerror or exc}"
            output.failed(0, reason)
            raise LaunchError(reason) from exc
        self.pid = self._proc.pid
        note_own_child(self.pid)
        self.started_at = time.monotonic()
        self.tracker = DescendantTracker(self.pid)
        self._keeper = keeper
        keeper.watch(self.pid)
        where = f"port {self.port}" if self.socket_path is None else f"socket {self.socket_path}"
        output.mark(f"started pid {self.pid} {where}")
        output.started(self.pid)
        log.info("app %s: started pid %d%s: %s, %s, startup_time_limit %gs", self.spec.name,
                 self.pid, f" as {user}" if uid is not None else "", shlex.join(self._argv()),
                 where, self.spec.settings.startup_time_limit)
        assert self._proc.stdout is not None
        self._drain = asyncio.create_task(drain(self._proc.stdout, output, self.pid))

    # -- readiness ------------------------------------------------------------------
    async def _accepts(self) -> bool:
        try:
            if self.socket_path is not None:
                conn = asyncio.open_unix_connection(self.socket_path)
            else:
                conn = asyncio.open_connection("127.0.0.1", self.port)
            _, writer = await asyncio.wait_for(conn, timeout=1.0)
        except (TimeoutError, OSError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def wait_ready(self, output: AppOutput) -> None:
        """Return once the app accepts connections; raise ``StartFailed`` otherwise."""
        limit = self.spec.settings.startup_time_limit
        deadline = time.monotonic() + limit
        delay = 0.002
        while True:
            if self.returncode is not None:
                await self.wait()
                reason = f"{describe_exit(self.returncode)} before listening"
                output.failed(self.pid, reason)
                raise StartFailed(reason, output.tail())
            if await self._accepts():
                if self.returncode is not None:
                    continue
                ours = await asyncio.to_thread(tree_listens, self.pid, self.port,
                                               self.socket_path)
                if not ours:
                    raise StartFailed(self._foreign_listener(), output.tail(), port_taken=True)
                self.ready_at = time.monotonic()
                output.ready(self.pid, self.ready_at - self.started_at)
                return
            if time.monotonic() >= deadline:
                reason = f"did not listen on its port within {limit:g}s"
                output.failed(self.pid, reason)
                raise StartFailed(reason, output.tail())
            await asyncio.sleep(delay)
            # A refused connect on loopback costs microseconds: poll often, so a request
            # waiting for a start is served within ~5 ms of the app's listen().
            delay = min(delay * 2, 0.005)

    def _foreign_listener(self) -> str:
        """Why a port that accepts is not the app's, naming its holder when visible."""
        where = self.socket_path or f"port {self.port}"
        holders = [p for p in listener_pids(self.port) if p != self.pid] if self.port else []
        held = f" (pid {', '.join(map(str, holders))})" if holders else ""
        return f"{where} accepts, but another process{held} listens there, not the app"

    # -- exit and stop --------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.returncode

    @property
    def alive(self) -> bool:
        """True while the process has not been reaped."""
        return self._proc is not None and self._proc.returncode is None

    async def wait(self) -> int:
        """Wait for the process to exit and its output to be drained."""
        assert self._proc is not None
        code = await self._proc.wait()
        if self._drain is not None:
            # Grandchildren may keep the pipe open; never wait for them forever.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain), timeout=0.5)
        return code

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process's whole group (and its whole cgroup)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        if self.cgroup is not None:
            self.cgroup.signal(sig)

    async def stop(self, timeout: float | None = None) -> int:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL it; return the status."""
        self.stopping = True
        if self._proc is None:
            return 0
        self.refresh_descendants()
        if timeout is None:
            timeout = self.spec.settings.shutdown_time_limit
        if self.alive:
            self.signal_group(signal.SIGTERM)
            # A stopped (SIGSTOP) process cannot act on SIGTERM until it runs again.
            self.signal_group(signal.SIGCONT)
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), timeout)
            except TimeoutError:
                pass
        # The leader may be gone while children of its group remain: kill the group.
        self.signal_group(signal.SIGKILL)
        code = await self.wait()
        await self.clean_up()
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
        if self.draining_since:
            log.info("app %s: recycle done: old pid %d drained for %.1fs and stopped (%s)",
                     self.spec.name, self.pid, time.monotonic() - self.draining_since,
                     describe_exit(code))
        return code

    def kill_group_now(self) -> None:
        """SIGKILL the group without waiting (last resort at shutdown)."""
        self.signal_group(signal.SIGKILL)

    def refresh_descendants(self, orphans: Orphans | None = None) -> None:
        """Note new descendants (and tell the keeper), forget vanished ones.

        ``orphans`` is this tick's ``orphans_by_token()``, shared by every process."""
        if self.tracker is None or not self.alive:
            return
        new, gone = self.tracker.refresh()
        if orphans is None:
            orphans = orphans_by_token()
        for orphan in orphans.get(self.token, []):
            # A grandchild that left the tree (setsid, double fork) re-parents to
            # Bastion, the subreaper: remember it, so the keeper guards it too. The
            # process itself carries the token as well and is no orphan.
            if orphan.pid != self.pid and self.tracker.adopt(orphan):
                new.append(orphan.pid)
        if self._keeper is not None:
            for pid in new:
                self._keeper.watch_pid(pid)
            for pid in gone:
                self._keeper.forget_pid(pid)

    async def clean_up(self) -> list[int]:
        """After the process is gone: kill and reap whatever it left behind."""
        if self.tracker is None:
            return []
        if self.returncode is not None:
            forget_own_child(self.pid)
        killed = []
        if self.cgroup is not None:
            killed = await self.cgroup.kill_and_remove()
        killed += await kill_leftovers(self.tracker, self.token)
        if self._keeper is not None:
            self._keeper.forget(self.pid)
            for pid in self.tracker.seen:
                self._keeper.forget_pid(pid)
        return killed
