"""module/probes.py against real sockets and processes: who holds a listening socket."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.module.probes import _tcp_listeners_netlink, _tcp_listeners_proc, tree_listens

LISTEN = ("import socket, sys, time\n"
          "s = socket.socket(socket.AF_UNIX if sys.argv[1] == 'unix' else socket.AF_INET)\n"
          "s.bind(sys.argv[2] if sys.argv[1] == 'unix' else ('127.0.0.1', 0))\n"
          "s.listen()\n"
          "print(s.getsockname()[1] if sys.argv[1] != 'unix' else 0, flush=True)\n"
          "time.sleep(60)\n")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def listener(children: list[subprocess.Popen[str]], kind: str, path: str = "") -> tuple[int, int]:
    proc = subprocess.Popen([sys.executable, "-c", LISTEN, kind, path], text=True,
                            stdout=subprocess.PIPE)
    children.append(proc)
    assert proc.stdout is not None
    return proc.pid, int(proc.stdout.readline())


def test_a_tcp_listener_belongs_to_its_process_only(
        children: list[subprocess.Popen[str]]) -> None:
    pid, port = listener(children, "tcp")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], text=True)
    children.append(other)
    assert tree_listens(pid, port)
    assert not tree_listens(other.pid, port)  # someone else's port
    assert not tree_listens(pid, port + 1 if port < 65535 else port - 1)


def test_sock_diag_and_proc_net_agree(children: list[subprocess.Popen[str]]) -> None:
    _, port = listener(children, "tcp")
    found = _tcp_listeners_netlink(port)
    assert len(found) == 1 and found == _tcp_listeners_proc(port)
    with socket.socket(socket.AF_INET6) as v6:
        v6.bind(("::1", 0))
        v6.listen()
        port6 = v6.getsockname()[1]
        assert len(_tcp_listeners_netlink(port6)) == 1
        assert _tcp_listeners_netlink(port6) == _tcp_listeners_proc(port6)


def test_a_unix_listener_belongs_to_its_process_only(
        children: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    pid, _ = listener(children, "unix", path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], text=True)
    children.append(other)
    deadline = time.monotonic() + 5
    while not tree_listens(pid, 0, path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tree_listens(pid, 0, path)
    assert not tree_listens(other.pid, 0, path)
