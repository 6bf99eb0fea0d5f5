"""The access log: one line per request, combined format (default) or JSON lines.

Combined is Apache/nginx's format with two fields added at the end, the app's name
and the upstream pid; duration in seconds is the last field. Lines are buffered and
written once per event-loop iteration (or at ``FLUSH_SIZE``), so a busy worker makes
one write system call for many requests; ``close`` writes what is left, so nothing is
lost at a stop. The file is opened in append mode and reopened on SIGUSR1 (``reopen``),
so logrotate can move it. A failed write (a full disk) loses those lines: it is
reported at most once a minute, as nginx does, and counted (``lost_lines``, exported
by ``/metrics``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("bastion.proxy")

FLUSH_SIZE = 64 * 1024
REPORT_EVERY = 60.0


@dataclass(frozen=True)
class LogEntry:
    """What the access log says about a request, whatever its protocol."""

    client: str
    method: str
    target: str
    version: str  # "HTTP/1.1", "HTTP/2.0"
    referer: str = "-"
    agent: str = "-"


class AccessLog:
    """Writes one line per request to a file, stderr (``"-"``) or nowhere (None)."""

    def __init__(self, path: str | None, fmt: str = "combined") -> None:
        self.path = path
        self.fmt = fmt
        self.enabled = bool(path)
        self.lost_lines = 0
        self._fd: int | None = None
        self._buffer: list[str] = []
        self._size = 0
        self._scheduled = False
        self._reported = -REPORT_EVERY
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the log file (what is buffered goes to the old one first)."""
        self.flush()
        if self._fd is not None and self.path != "-":
            os.close(self._fd)
        self._fd = None
        if self.path == "-":
            self._fd = sys.stderr.fileno()
        elif self.path:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)

    def write_entry(self, entry: LogEntry, status: int, sent: int, app: str, pid: int,
                    duration: float) -> None:
        """Log one finished request of any protocol."""
        if self._fd is None:
            return
        client, target, version = entry.client, entry.target, entry.version
        referer, agent = entry.referer, entry.agent
        if self.fmt == "json":
            line = json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "client": client, "method": entry.method, "target": target,
                "version": version, "status": status, "bytes": sent,
                "referer": referer, "user_agent": agent, "app": app, "pid": pid,
                "duration": round(duration, 6),
            })
        else:
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
            esc = _escape
            line = (f'{client} - - [{stamp}] "{esc(entry.method)} {esc(target)} {version}" '
                    f'{status} {sent} "{esc(referer)}" "{esc(agent)}" {app} {pid or "-"} '
                    f"{duration:.6f}")
        self._buffer.append(line)
        self._size += len(line) + 1
        if self._size >= FLUSH_SIZE:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        """Write the buffered lines now."""
        self._scheduled = False
        if not self._buffer:
            return
        lines, self._buffer, self._size = self._buffer, [], 0
        if self._fd is None:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError as exc:
            lost = data.count(b"\n")
            self.lost_lines += lost
            now = time.monotonic()
            if now - self._reported >= REPORT_EVERY:
                self._reported = now
                log.error("access log %s: %s; %d line(s) lost (%d in all)", self.path,
                          exc.strerror or exc, lost, self.lost_lines)

    def close(self) -> None:
        """Write what is buffered and close the file (not stderr)."""
        self.flush()
        if self._fd is not None and self.path != "-":
            os.close(self._fd)
        self._fd = None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "backslashreplace").decode()
