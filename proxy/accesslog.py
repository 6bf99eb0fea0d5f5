"""The access log: one line per request, combined format (default) or JSON lines.

Combined is Apache/nginx's format with two fields added at the end, the app's name
and the upstream pid; duration in seconds is the last field. The file is opened in
append mode and reopened on SIGUSR1 (``reopen``), so logrotate can move it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from aiohttp import web


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
        self._file: TextIO | None = None
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the log file."""
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None
        if self.path == "-":
            self._file = sys.stderr
        elif self.path:
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, request: web.BaseRequest, status: int, sent: int, app: str, pid: int,
              duration: float) -> None:
        """Log one finished HTTP/1.x request."""
        if self._file is None:
            return
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.write_entry(
            LogEntry(
                client=str(peer[0]) if isinstance(peer, tuple) and peer else "-",
                method=request.method,
                target=request.raw_path,
                version=f"HTTP/{request.version.major}.{request.version.minor}",
                referer=request.headers.get("Referer", "-"),
                agent=request.headers.get("User-Agent", "-"),
            ),
            status, sent, app, pid, duration,
        )

    def write_entry(self, entry: LogEntry, status: int, sent: int, app: str, pid: int,
                    duration: float) -> None:
        """Log one finished request of any protocol (HTTP/2 streams come here directly)."""
        if self._file is None:
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
        try:
            self._file.write(line + "\n")
        except OSError:
            pass

    def close(self) -> None:
        """Close the file (not stderr)."""
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "backslashreplace").decode()
