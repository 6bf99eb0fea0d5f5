"""systemd's notify protocol (``Type=notify``), written against ``NOTIFY_SOCKET``.

One datagram per message to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path, or an
abstract name starting with ``@``). Without the variable every call does nothing, so
Bastion behaves the same outside systemd. ``watchdog_interval`` reads ``WATCHDOG_USEC``
(only when ``WATCHDOG_PID`` is unset or ours) and returns half of it, the interval at
which ``WATCHDOG=1`` should be sent.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1 and STATUS= to systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address = address or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]

    @property
    def enabled(self) -> bool:
        """True when running under a notify-type service."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value``) in one datagram; False when it failed."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell systemd that start-up is complete."""
        return self.send("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """A reload begins (systemd >= 253 wants MONOTONIC_USEC with it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """A stop begins."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec``."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.send(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is configured."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2_000_000)
    except ValueError:
        return None
