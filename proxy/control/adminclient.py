"""A small client for the admin socket (HTTP/1.1 over a Unix socket), standard library only.

The ``bastion`` commands that talk to a running Bastion use it, and so does ``bastion
check`` to tell its own listening ports from someone else's. Where the socket is comes
from, in this order: ``--socket PATH``, ``BASTION_ADMIN_SOCKET``, ``admin_socket`` read
leniently from the configuration file (the rest of the file may be broken), and
``/run/bastion/admin.sock``. ``Found.origin`` says which one was used, for messages.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

DEFAULT_SOCKET = "/run/bastion/admin.sock"
_LINE = re.compile(r"""^admin_socket[ \t]*:[ \t]*(?P<value>"[^"]*"|'[^']*'|[^#\s][^#]*?)[ \t]*(?:#.*)?$""",
                   re.M)


@dataclass(frozen=True)
class Found:
    """Where the admin socket is taken to be, and why."""

    path: str
    origin: str  # e.g. "from --socket", "admin_socket in /etc/bastion/bastion.yaml"


def admin_socket_in(config_file: str) -> str | None:
    """``admin_socket`` of ``config_file``, read leniently: the YAML may be broken
    anywhere else; None when the file cannot be read or does not set it."""
    try:
        with open(config_file, encoding="utf-8", errors="replace") as stream:
            text = stream.read()
    except OSError:
        return None
    value: object = None
    try:
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, dict):
            value = data.get("admin_socket")
    except Exception:  # noqa: BLE001 - broken YAML: fall back to the line itself
        match = _LINE.search(text)
        if match is not None:
            value = match["value"].strip()
            if value[:1] in "\"'" and value[-1:] == value[:1]:
                value = value[1:-1]
    if not isinstance(value, str) or not value.strip():
        return None
    base = os.path.dirname(os.path.abspath(config_file))
    return os.path.normpath(os.path.join(base, os.path.expanduser(value.strip())))


def find_socket(option: str | None, config_file: str | None) -> Found:
    """The admin socket by ``--socket``, the environment, the config file, the default."""
    if option:
        return Found(option, "from --socket")
    env = os.environ.get("BASTION_ADMIN_SOCKET")
    if env:
        return Found(env, "from BASTION_ADMIN_SOCKET")
    if config_file:
        path = admin_socket_in(config_file)
        if path is not None:
            return Found(path, f"admin_socket in {config_file}")
        if not os.path.exists(config_file):
            return Found(DEFAULT_SOCKET, f"the default; {config_file} does not exist")
        return Found(DEFAULT_SOCKET, f"the default; {config_file} sets no admin_socket")
    return Found(DEFAULT_SOCKET, "the default; give --socket PATH or -c FILE for another")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("bastion", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Unreachable(Exception):
    """The admin socket could not be used; the message says why, in plain words."""


def _why(exc: OSError, found: Found) -> str:
    where = f"{found.path} ({found.origin})"
    if isinstance(exc, FileNotFoundError):
        return f"no admin socket at {where}: is Bastion running?"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {where}: Bastion is not running (a stale socket file)"
    if isinstance(exc, PermissionError):
        return (f"permission denied on {where}: run as root or as a member of the "
                "socket's group")
    if isinstance(exc, TimeoutError):
        return f"no answer on {where} in time"
    return f"cannot use {where}: {exc.strerror or exc}"


def open_request(found: Found, method: str, path: str, timeout: float | None = 60.0
                 ) -> http.client.HTTPResponse:
    """Send one request; the response is left open for streaming (``Unreachable``)."""
    conn = _UnixConnection(found.path, timeout)
    try:
        conn.request(method, path, headers={"Connection": "close"})
        return conn.getresponse()
    except OSError as exc:
        conn.close()
        raise Unreachable(_why(exc, found)) from None
    except http.client.HTTPException as exc:
        conn.close()
        raise Unreachable(f"{found.path} ({found.origin}) gave no valid answer: "
                          f"{type(exc).__name__}") from None


def call(found: Found, method: str, path: str, timeout: float = 60.0) -> tuple[int, Any]:
    """One request answered with JSON: (status, data)."""
    response = open_request(found, method, path, timeout)
    try:
        body = response.read()
    except OSError as exc:
        raise Unreachable(_why(exc, found)) from None
    finally:
        response.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        raise Unreachable(f"{found.path} ({found.origin}) answered {response.status} "
                          "without JSON: is it Bastion's admin socket?") from None


def running_addresses(admin_socket: str) -> set[str]:
    """The listening addresses (and ``metrics_listen``) of the Bastion answering on
    ``admin_socket``; empty when none does."""
    try:
        status, data = call(Found(admin_socket, "admin_socket"), "GET", "/status", timeout=5)
    except Exception:  # noqa: BLE001 - no running Bastion there
        return set()
    if status != 200 or not isinstance(data, dict):
        return set()
    ours = {lis["address"] for lis in data.get("listeners", [])}
    if data.get("metrics_listen"):
        ours.add(data["metrics_listen"])
    return ours
