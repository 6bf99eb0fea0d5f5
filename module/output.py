"""Where an app's output goes: its log file or Bastion's own log, and an in-memory tail.

Every process of an app writes into the same ``AppOutput``. The pipe from the process is
always drained, whatever the log does, so an app that floods stdout never blocks.

* With ``stdout_log``, the output is appended to that file as it comes, with header lines
  that mark each start and exit (timestamp, pid, port), so one file tells the story of
  many processes.
* Without it, each line goes to Bastion's own log (logger ``bastion.app``) as
  ``NAME[PID]: line``, so under systemd the journal has it.

The tail (the last 64 KiB) feeds the 502 page with ``detailed_errors``, the log line of a
failed start and ``bastion logs``; followers (``bastion logs -f``) get every chunk live.

A crash loop does not flood the log: once a start has failed, the output of the next
start is held back until it is ready (then it is logged) or fails too. A failure that is
the same as the one before (same reason, same lines once digits are ignored) is counted
and summarised instead of logged again. ``FailureLogFilter`` applies the same rule to the
controller's "failed to start" record, and adds the start time to its "ready" record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import weakref
from typing import BinaryIO

TAIL_BYTES = 64 * 1024
MAX_LINE = 16 * 1024  # a longer line without a newline is logged in pieces
FOLLOW_QUEUE = 1024  # chunks a slow ``logs -f`` client may fall behind before it is cut
SUMMARY_EVERY = 60.0  # a crash loop's summary line at most this often
MARK_PREFIX = "=== bastion "
TRACEBACK_HEAD = "Traceback (most recent call last):"

log = logging.getLogger("bastion.module")
app_log = logging.getLogger("bastion.app")

_DIGITS = re.compile(r"\d+")

# Every AppOutput by app name, for the log filter (the newest one of a name wins).
_outputs: weakref.WeakValueDictionary[str, AppOutput] = weakref.WeakValueDictionary()


def last_lines(text: str, max_lines: int) -> list[str]:
    """The last ``max_lines`` lines of ``text``; when that cuts a Python traceback, its
    first line is kept on top (with ``...`` for the lines left out)."""
    lines = text.splitlines()
    if len(lines) <= max_lines:
        return lines
    kept = lines[-max_lines:]
    if TRACEBACK_HEAD not in kept:
        for index in range(len(lines) - max_lines - 1, -1, -1):
            if lines[index].strip() == TRACEBACK_HEAD:
                return [lines[index], "  ...", *kept[2:]]
    return kept


class AppOutput:
    """The log and output tail shared by the processes of one app."""

    def __init__(self, app: str, path: str | None) -> None:
        self.app = app
        self.path = path
        self._file: BinaryIO | None = None
        self._tail = bytearray()
        self._warned = False
        self._partial: dict[int, bytearray] = {}  # pid -> line not yet ended
        self._starting: dict[int, list[str]] = {}  # pid -> its lines until it listens
        self._held: set[int] = set()  # starting pids whose lines wait (a crash loop)
        self._muted: set[int] = set()  # pids whose failure was a repeat: drop the rest
        self._failure: tuple[str, ...] | None = None  # the last failed start, normalised
        self._repeats = 0
        self._repeats_since = 0.0
        self._summarised_at = 0.0
        self._quiet_failure = False  # the controller's record of this failure is dropped
        self.ready_after: dict[int, float] = {}  # pid -> seconds from launch to listening
        self._followers: set[asyncio.Queue[bytes | None]] = set()
        _outputs[app] = self
        self.reopen()

    # -- the log file ---------------------------------------------------------------
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

    def write(self, data: bytes, pid: int = 0) -> None:
        """Append output of process ``pid`` (0: Bastion's own marks) everywhere it goes."""
        self._tail += data
        if len(self._tail) > TAIL_BYTES:
            del self._tail[: len(self._tail) - TAIL_BYTES]
        for queue in list(self._followers):
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:  # a follower that does not read is cut off
                self._followers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)
        if self.path is not None:
            if self._file is not None:
                try:
                    self._file.write(data)
                except OSError as exc:
                    if not self._warned:
                        log.error("app %s: writing %s failed: %s", self.app, self.path, exc)
                        self._warned = True
        elif pid:
            self._lines(pid, data)

    # -- Bastion's log, line by line ------------------------------------------------
    def _lines(self, pid: int, data: bytes) -> None:
        buffer = self._partial.setdefault(pid, bytearray())
        buffer += data
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) < MAX_LINE:
                    return
                end = MAX_LINE
                line, rest = bytes(buffer[:end]), buffer[end:]
            else:
                line, rest = bytes(buffer[:end]), buffer[end + 1:]
            buffer[:] = rest
            self._emit(pid, line.decode("utf-8", "replace").rstrip("\r"))

    def _emit(self, pid: int, line: str) -> None:
        if pid in self._muted:
            return
        lines = self._starting.get(pid)
        if lines is not None:
            lines.append(line)
            if len(lines) > 200:
                del lines[:-200]
            if pid in self._held:
                return
        app_log.info("%s[%d]: %s", self.app, pid, line)

    def _release(self, pid: int, lines: list[str] | None) -> None:
        if pid in self._held:
            self._held.discard(pid)
            for line in lines or ():
                app_log.info("%s[%d]: %s", self.app, pid, line)

    def flush(self, pid: int) -> None:
        """Process ``pid``'s pipe is closed: log its unfinished last line."""
        rest = self._partial.pop(pid, None)
        if rest:
            self._emit(pid, rest.decode("utf-8", "replace").rstrip("\r"))
        self._muted.discard(pid)

    # -- the story of a start -------------------------------------------------------
    def started(self, pid: int) -> None:
        """Process ``pid`` was launched: in a crash loop, hold its lines back."""
        self._muted.discard(pid)
        self._starting[pid] = []
        while len(self._starting) > 16:  # processes stopped while starting: forget them
            oldest = next(iter(self._starting))
            self._starting.pop(oldest)
            self._held.discard(oldest)
        if self._failure is not None and self.path is None:
            self._held.add(pid)

    def ready(self, pid: int, after: float) -> None:
        """Process ``pid`` listens, ``after`` seconds after its launch."""
        self.ready_after[pid] = after
        if len(self.ready_after) > 64:
            self.ready_after.pop(next(iter(self.ready_after)))
        self._release(pid, self._starting.pop(pid, None))
        if self._repeats:
            log.info("app %s: started after %d more failed start(s) like the one logged "
                     "before", self.app, self._repeats)
        self._failure = None
        self._repeats = 0
        self._quiet_failure = False

    def failed(self, pid: int, reason: str) -> None:
        """Process ``pid`` failed to start: log its held lines, or count a repeat."""
        partial = self._partial.pop(pid, None)
        if partial:
            self._emit(pid, partial.decode("utf-8", "replace").rstrip("\r"))
        lines = self._starting.pop(pid, None) or []
        if self.path is not None:
            lines = self.tail(30).splitlines()
        signature = (_DIGITS.sub("#", reason),
                     *(_DIGITS.sub("#", line) for line in lines[-50:]))
        now = time.monotonic()
        if self._failure is not None and signature == self._failure:
            self._repeats += 1
            self._held.discard(pid)
            if pid:
                self._muted.add(pid)
            self._quiet_failure = True
            if self._repeats == 1 or now - self._summarised_at >= SUMMARY_EVERY:
                self._summarised_at = now
                log.error("app %s failed to start again the same way (%d time(s) since %s): "
                          "%s; its output is not repeated", self.app, self._repeats,
                          time.strftime("%H:%M:%S", time.localtime(self._repeats_since)),
                          reason)
            return
        if self._repeats:
            log.error("app %s: the failure above repeated %d more time(s)", self.app,
                      self._repeats)
        self._release(pid, lines)
        self._failure = signature
        self._repeats = 0
        self._repeats_since = time.time()
        self._summarised_at = now
        self._quiet_failure = False

    # -- markers, tail and followers ------------------------------------------------
    def mark(self, text: str) -> None:
        """Write a timestamped header line such as ``started pid 12 port 3000``."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write(f"\n{MARK_PREFIX}{stamp} app {self.app}: {text} ===\n".encode())

    def tail(self, max_lines: int = 20) -> str:
        """The last ``max_lines`` lines of output, without markers, decoded leniently;
        the first line of a Python traceback that the window cuts is kept on top."""
        text = self._tail.decode("utf-8", "replace")
        lines: list[str] = []
        for line in text.splitlines():
            if line.startswith(MARK_PREFIX):
                # ``mark`` starts with a newline of its own: drop the empty line it left.
                if lines and lines[-1] == "":
                    lines.pop()
                continue
            lines.append(line)
        return "\n".join(last_lines("\n".join(lines), max_lines))

    def raw_tail(self, max_lines: int) -> bytes:
        """The last ``max_lines`` lines of the tail as they are, markers included."""
        data = bytes(self._tail)
        if max_lines <= 0:
            return b""
        lines = data.splitlines(keepends=True)
        return b"".join(lines[-max_lines:])

    def follow(self) -> asyncio.Queue[bytes | None]:
        """A queue that gets every chunk of output from now on (None: cut off)."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(FOLLOW_QUEUE)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[bytes | None]) -> None:
        """Stop sending output to ``queue``."""
        self._followers.discard(queue)

    def close(self) -> None:
        """Close the log file; followers are told the output ended."""
        for queue in list(self._followers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._followers.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


async def drain(stream: asyncio.StreamReader, output: AppOutput, pid: int = 0) -> None:
    """Copy everything from ``stream`` into ``output`` until end-of-file."""
    try:
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                return
            output.write(chunk, pid)
    finally:
        output.flush(pid)


class FailureLogFilter(logging.Filter):
    """Shapes the app controller's records about starts (``bastion.module``).

    * "failed to start": dropped when it repeats the failure before (``AppOutput.failed``
      logged a summary instead); when the output already went to Bastion's log, the
      output lines are not repeated in it.
    * "ready": gets how long the start took.
    """

    FAILED = "app %s failed to start: %s\n%s"
    READY = "app %s ready: pid %d port %d"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in (self.FAILED, self.READY) or not isinstance(record.args, tuple):
            return True
        output = _outputs.get(str(record.args[0]))
        if output is None:
            return True
        if record.msg == self.READY:
            pid = record.args[1]
            after = output.ready_after.get(pid) if isinstance(pid, int) else None
            if after is not None:
                record.msg = self.READY + " after %.2fs"
                record.args = (*record.args, after)
            return True
        if output._quiet_failure:
            return False
        app, reason, detail = record.args
        if output.path is None:
            record.msg = "app %s failed to start: %s (its output is logged above as %s[PID])"
            record.args = (app, reason, app)
        elif detail:
            record.msg = "app %s failed to start: %s; last output lines (%s):\n%s"
            record.args = (app, reason, output.path, detail)
        else:
            record.msg = "app %s failed to start: %s"
            record.args = (app, reason)
        return True


_FILTER = FailureLogFilter()
if _FILTER not in log.filters:
    log.addFilter(_FILTER)
