"""Liveness of ready app processes: health checks and request timeouts.

Theory of operation
-------------------
A process that accepts connections but no longer answers (deadlocked, stopped) is never
caught by the crash path: it does not exit. Two signs say it should be replaced:

* ``health_check`` (``module.spec.HealthCheck``, off by default): every ``interval`` the
  module GETs ``path`` (under the app's path base) on each ready process, with the
  process's pairing token in ``X-Bastion-Token`` as the proxy sends it. A check fails on
  a timeout (no status line within ``timeout``), a connection error, a malformed answer
  or a status >= 500. ``failures`` failed checks in a row replace the process.
* ``TIMEOUTS_IN_A_ROW`` request timeouts (the proxy's 504, ``RequestTimedOut``) in a row
  on one process replace it too.

The replacement is the controller's overlapped recycle of that one process: a new one is
ready before the old one is withdrawn, drained and stopped.

``Liveness`` is the pure per-process record (counts and the next check time, all
``time.monotonic()``); ``probe`` is the only I/O: a minimal HTTP/1.1 GET over asyncio
streams (the module does not use the proxy's HTTP code). A successful check resets both
counts. A normal answer resets the timeout count too; the module learns of answers from
the workers' ``UsageReport``s: when more requests to the process have completed than
timed out since the last reset, one of them was answered (or at least ended otherwise
than by a timeout), which breaks the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass

TIMEOUTS_IN_A_ROW = 3
MAX_STATUS_LINE = 8192
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: [^\r\n]*)?\r?\n")


def parse_status_line(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None when it is malformed."""
    match = _STATUS_LINE.fullmatch(line)
    return int(match.group(1)) if match else None


def check_request(path: str, token: str, host: str) -> bytes:
    """The bytes of one health check request."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Bastion-Token: {token}\r\n"
            "User-Agent: bastion-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")


def verdict(status: int | None) -> str | None:
    """None when the answer is healthy, else why not."""
    if status is None:
        return "malformed answer"
    if status >= 500:
        return f"status {status}"
    return None


async def probe(port: int, socket_path: str | None, path: str, token: str,
                timeout: float) -> str | None:
    """GET ``path`` on the process; None when healthy, else a short reason."""
    host = "localhost" if socket_path is not None else f"127.0.0.1:{port}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            if socket_path is not None:
                reader, writer = await asyncio.open_unix_connection(socket_path)
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(check_request(path, token, host))
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except (OSError, ValueError) as exc:  # ValueError: a line beyond the stream limit
        return f"connection failed: {exc.strerror if isinstance(exc, OSError) else exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.5)
    return verdict(parse_status_line(line[:MAX_STATUS_LINE]))


@dataclass
class Liveness:
    """What the module knows about one ready process's liveness (pure, no clock)."""

    next_check: float = 0.0  # monotonic time of the next health check
    checking: bool = False  # a check is under way
    failed_checks: int = 0  # in a row
    timeouts: int = 0  # request timeouts in a row
    completed_mark: int = 0  # requests completed when the timeout row last started

    def check_due(self, now: float) -> bool:
        """A health check should start now."""
        return not self.checking and now >= self.next_check

    def check_passed(self) -> None:
        """The process answered its health check: both rows are broken."""
        self.failed_checks = 0
        self.timeouts = 0

    def check_failed(self, failures: int) -> bool:
        """Count one failed check; True when ``failures`` in a row are reached."""
        self.failed_checks += 1
        return self.failed_checks >= failures

    def timed_out(self) -> bool:
        """Count one request timeout; True when ``TIMEOUTS_IN_A_ROW`` are reached."""
        self.timeouts += 1
        return self.timeouts >= TIMEOUTS_IN_A_ROW

    def completed(self, count: int) -> None:
        """The workers report ``count`` requests to this process completed in all. More
        completions than timeouts since the row began: one was answered, the row ends."""
        if count < self.completed_mark:  # a worker restarted: its counts began anew
            self.completed_mark = count
        elif count - self.completed_mark > self.timeouts:
            self.timeouts = 0
            self.completed_mark = count

    def replaced(self) -> None:
        """The process is being replaced: start counting afresh."""
        self.failed_checks = 0
        self.timeouts = 0
