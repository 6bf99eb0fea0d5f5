"""The keeper (module/keeper.py) with real processes: no app group outlives Bastion."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

from bastion.module.keeper import Keeper, run


def sleeper() -> subprocess.Popen[bytes]:
    """A ``sleep 60`` that leads its own process group, like an app process."""
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_stop_kills_watched_group() -> None:
    keeper = Keeper()
    keeper.start()
    child = sleeper()
    try:
        keeper.watch(child.pid)
        keeper.stop()
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_stop_kills_the_whole_group_not_only_its_leader() -> None:
    keeper = Keeper()
    keeper.start()
    # a leader that forks a grandchild in its own group, then waits
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; wait"], start_new_session=True, stdout=subprocess.PIPE
    )
    assert leader.stdout is not None
    grandchild = int(leader.stdout.readline())
    try:
        keeper.watch(leader.pid)
        keeper.stop()
        leader.wait(timeout=5)
        assert wait_until(lambda: gone(grandchild), 5)
    finally:
        for pid in (leader.pid, grandchild):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        leader.wait()
        leader.stdout.close()


def test_forget_before_stop_leaves_group_alive() -> None:
    keeper = Keeper()
    keeper.start()
    child = sleeper()
    try:
        keeper.watch(child.pid)
        keeper.forget(child.pid)
        keeper.stop()
        time.sleep(0.2)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_keeper_ignores_sigterm() -> None:
    keeper = Keeper()
    keeper.start()
    proc = keeper._proc
    assert proc is not None
    child = sleeper()
    try:
        keeper.watch(child.pid)
        time.sleep(0.5)  # let it install its signal handlers
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert proc.poll() is None
        assert child.poll() is None
        keeper.stop()
        assert proc.returncode == 0
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, time
    from bastion.module.keeper import Keeper
    keeper = Keeper()
    keeper.start()
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    keeper.watch(child.pid)
    print(keeper._proc.pid, child.pid, flush=True)
    time.sleep(60)
    """
)


def test_sigkill_of_owner_kills_watched_group_and_keeper_exits() -> None:
    owner = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE)
    assert owner.stdout is not None
    keeper_pid, child_pid = (int(x) for x in owner.stdout.readline().split())
    try:
        assert not gone(child_pid) and not gone(keeper_pid)
        time.sleep(0.3)  # the +PGID line reaches the keeper
        owner.kill()
        owner.wait()
        assert wait_until(lambda: gone(child_pid), 5), "the app group outlived its owner"
        assert wait_until(lambda: gone(keeper_pid), 5), "the keeper lingered"
    finally:
        for pid in (child_pid, keeper_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        owner.stdout.close()


def test_run_parses_lines_and_kills_what_is_left(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    killed: list[int] = []
    monkeypatch.setattr("bastion.module.keeper._kill_group", killed.append)
    run(io.BytesIO(b"+10\n+11\n-10\ngarbage\n+\n+x\n\n+12\n-99\n"))
    assert sorted(killed) == [11, 12]
