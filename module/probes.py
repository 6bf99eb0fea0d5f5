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
  checks the same). The listening socket's inode (from sock_diag) must be among the
  tree's open descriptors (/proc/PID/fd), which needs no privilege for our own children.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

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


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_TCP_LISTEN = 10


def _tcp_listeners_netlink(port: int) -> set[str]:
    """Inodes of listening TCP sockets on ``port`` from the kernel's sock_diag (what
    ``ss -lt`` uses): the kernel sends only listening sockets, a few hundred at most,
    however many connections the machine holds. Raises ``OSError`` when unavailable."""
    inodes: set[str] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            # struct inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid
            request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0,
                                  1 << _TCP_LISTEN) + bytes(48)
            header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                                 _NLM_F_REQUEST_DUMP, seq, 0)
            sock.send(header + request)
            done = False
            while not done:
                data = sock.recv(65536)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                    if length < 16:
                        break
                    if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                        done = True
                        break
                    body = offset + 16
                    # struct inet_diag_msg: 4 bytes, sockid (sport first, big endian),
                    # expires, rqueue, wqueue, uid, inode
                    (sport,) = struct.unpack_from("!H", data, body + 4)
                    (inode,) = struct.unpack_from("=I", data, body + 68)
                    if sport == port:
                        inodes.add(str(inode))
                    offset += (length + 3) & ~3
    return inodes


def _tcp_listeners_proc(port: int) -> set[str]:
    """The same from /proc/net/tcp{,6}: slow when the machine holds many connections."""
    inodes: set[str] = set()
    needle = f":{port:04X} "
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as table:
            next(table, None)
            for line in table:
                if needle not in line:
                    continue
                fields = line.split()
                # sl local_address rem_address st ... inode; st 0A is LISTEN
                if len(fields) >= 10 and fields[3] == "0A" and fields[1].endswith(needle[:-1]):
                    inodes.add(fields[9])
    return inodes


def _listening_inodes(port: int, socket_path: str | None) -> set[str]:
    """Inodes of the listening sockets on ``port`` (TCP, IPv4 and IPv6), or bound to
    ``socket_path`` (unix)."""
    if socket_path is None:
        try:
            return _tcp_listeners_netlink(port)
        except (OSError, struct.error):
            return _tcp_listeners_proc(port)
    inodes: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == socket_path:
                inodes.add(fields[6])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets among ``pid``'s open descriptors."""
    inodes: set[str] = set()
    directory = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(directory):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{directory}/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def tree_listens(pid: int, port: int, socket_path: str | None = None) -> bool:
    """True when ``pid`` or a descendant holds the listening socket on ``port`` (TCP), or
    on ``socket_path`` (a unix socket) when that is given.

    The listening sockets' inodes come from the kernel (sock_diag, else /proc/net), the
    tree's descriptors from /proc/PID/fd (our own children: no privilege needed)."""
    wanted = _listening_inodes(port, socket_path)
    if not wanted:
        return False
    return any(wanted & _socket_inodes(proc.pid) for proc in _tree(pid))
