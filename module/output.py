"""Where an app's output goes: its log file (optional) and a bounded in-memory tail.

Every process of an app writes into the same ``AppOutput``. The pipe from the process is
always drained, whatever the log file does, so an app that floods stdout never blocks.
The tail (the last 64 KiB) feeds the 502 page with ``detailed_errors`` and the log line
of a failed start. Header lines mark each start and exit, with a timestamp, the pid and
the port, so one log file tells the story of many processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import BinaryIO

TAIL_BYTES = 64 * 1024
log = logging.getLogger("bastion.module")


class AppOutput:
    """The log file and output tail shared by the processes of one app."""

    def __init__(self, app: str, path: str | None) -> None:
        self.app = app
        self.path = path
        self._file: BinaryIO | None = None
        self._tail = bytearray()
        self._warned = False
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the log file in append mode, e.g. after logrotate moved it."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self._warned = False  # a new file: report its first write failure again
        if self.path is None:
            return
        try:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives with the app
        except OSError as exc:
            log.error("app %s: cannot open stdout_log %s: %s", self.app, self.path, exc)

    def write(self, data: bytes) -> None:
        """Append process output to the tail and to the log file."""
        self._tail += data
        if len(self._tail) > TAIL_BYTES:
            del self._tail[: len(self._tail) - TAIL_BYTES]
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError as exc:
                if not self._warned:
                    log.error("app %s: writing %s failed: %s", self.app, self.path, exc)
                    self._warned = True

    def mark(self, text: str) -> None:
        """Write a timestamped header line such as ``started pid 12 port 3000``."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write(f"\n=== bastion {stamp} app {self.app}: {text} ===\n".encode())

    def tail(self, max_lines: int = 20) -> str:
        """The last ``max_lines`` lines of output, decoded leniently."""
        text = self._tail.decode("utf-8", "replace")
        lines: list[str] = []
        for line in text.splitlines():
            if line.startswith("=== bastion "):
                # ``mark`` starts with a newline of its own: drop the empty line it left.
                if lines and lines[-1] == "":
                    lines.pop()
                continue
            lines.append(line)
        return "\n".join(lines[-max_lines:])

    def close(self) -> None:
        """Close the log file."""
        if self._file is not None:
            self._file.close()
            self._file = None


async def drain(stream: asyncio.StreamReader, output: AppOutput) -> None:
    """Copy everything from ``stream`` into ``output`` until end-of-file."""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        output.write(chunk)
