"""What the app controller reads from the system: process trees, files, sockets.

Theory of operation
-------------------
The lifecycle (``module.states``) and the rules (``module.policy``) are pure; the
controller feeds them facts gathered here, so nothing in the state machine needs a real
process to be tested. Each function is one small, bounded look at the system:

* ``tree_usage``: RSS and CPU of a process and all its descendants (psutil);
* ``read_offline_file``: the body of ``app_offline.htm`` in an app's ``cwd``, if any;
* ``tree_listens``: whether the listening socket on the app's port (or unix socket)
  belongs to the launched process tree. A port that accepts connections is not proof
  that *our* app listens: another process may hold the port chosen for it (IIS's ANCM
  checks the same). The look goes through the tree's own descriptors
  (``psutil.Process.net_connections``), which needs no privilege for our own children.
"""

from __future__ import annotations

import contextlib
import os

import psutil

OFFLINE_FILE = "app_offline.htm"
OFFLINE_MAX_BYTES = 1024 * 1024


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants; empty when it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_usage(pid: int) -> tuple[int, float]:
    """RSS in bytes and CPU percent of ``pid`` and all its descendants."""
    rss, cpu = 0, 0.0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            rss += proc.memory_info().rss
            cpu += proc.cpu_percent(interval=None)
    return rss, cpu


def read_offline_file(cwd: str | None) -> str | None:
    """The body of ``cwd/app_offline.htm`` (at most 1 MiB, UTF-8), or None when absent.

    Raises ``OSError`` when the file exists but cannot be read (the caller keeps what it
    knew)."""
    if cwd is None:
        return None
    path = os.path.join(cwd, OFFLINE_FILE)
    try:
        with open(path, "rb") as f:
            return f.read(OFFLINE_MAX_BYTES).decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def tree_listens(pid: int, port: int, socket_path: str | None = None) -> bool:
    """True when ``pid`` or a descendant holds the listening socket on loopback ``port``
    (TCP), or on ``socket_path`` (a unix socket) when that is given."""
    kind = "unix" if socket_path is not None else "tcp"
    for proc in _tree(pid):
        try:
            conns = proc.net_connections(kind=kind)
        except psutil.Error:
            continue
        for conn in conns:
            if socket_path is not None:
                address: object = conn.laddr  # a path for unix sockets
                if address == socket_path:
                    return True
            elif (conn.status == psutil.CONN_LISTEN and conn.laddr
                  and conn.laddr.port == port):
                return True
    return False
