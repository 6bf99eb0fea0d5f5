"""One WSGI request of an in-process app: the app runs in a thread, never in the loop.

Theory of operation
-------------------
``WsgiCall`` submits the app to the app's bounded thread pool (``threads``; requests
beyond it wait for a free thread). Both directions stream:

* ``wsgi.input`` (``Input``) reads the request body as it arrives: the loop side
  appends pieces under a lock, the app's thread blocks on a condition until bytes or the
  end are there. More than ``BODY_HIGH`` bytes waiting pauses the client; the thread
  taking them below ``BODY_LOW`` resumes it (through the loop).
* The response (``start_response``, the iterable, the legacy ``write``) goes to the loop
  piece by piece with ``call_soon_threadsafe``; the thread waits until each piece was
  handed to the flow, and while the client's buffer is full it waits for ``resume``:
  the app produces no faster than the client reads, and the memory per request stays
  bounded whatever the body's size.

Headers go out with the first non-empty piece of the body (or at its end), as PEP 3333
asks. An exception before that is a 500 (``AppFailed``), after it the connection is
cut. A thread cannot be cancelled: when the exchange ends early (``request_timeout``,
the client went away) the thread's next read of ``wsgi.input`` or next piece of the
answer raises ``ClientGone`` so the app unwinds at its next step; a thread stuck in
the app's own code keeps its pool slot until it returns (docs/hosting-models.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import AppFailed, ProxyError
from ..upstream import ResponseHead
from .asgi import BODY_HIGH, BODY_LOW, FlowSide, content_length, failure

log = logging.getLogger("bastion.hosted")

WsgiApp = Callable[[dict[str, Any], Callable[..., Callable[[bytes], None]]], Iterable[bytes]]


class ClientGone(OSError):
    """The exchange ended while the app's thread was still working on it."""


class Input(io.RawIOBase):
    """``wsgi.input``: the request body as it arrives (read from the app's thread)."""

    def __init__(self, call: WsgiCall, pending: list[bytes], end: bool) -> None:
        super().__init__()
        self._call = call
        self._lock = threading.Condition()
        self._pieces: deque[bytes] = deque(p for p in pending if p)
        self._size = sum(len(p) for p in self._pieces)
        self._end = end
        self._gone = False
        self._paused = False
        self._partial = b""

    # -- loop side ------------------------------------------------------------------------
    def feed(self, data: bytes) -> bool:
        """Append; True when the client should pause."""
        with self._lock:
            self._pieces.append(data)
            self._size += len(data)
            self._lock.notify_all()
            if self._size > BODY_HIGH and not self._paused:
                self._paused = True
                return True
        return False

    def feed_end(self) -> None:
        """The body is complete."""
        with self._lock:
            self._end = True
            self._lock.notify_all()

    def gone(self) -> None:
        """The exchange is over: readers stop waiting."""
        with self._lock:
            self._gone = True
            self._lock.notify_all()

    # -- thread side ----------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def _next(self) -> bytes:
        """The next piece (b"" at the end); blocks until there is one."""
        with self._lock:
            while not self._pieces and not self._end and not self._gone:
                self._lock.wait()
            if self._gone and not self._pieces:
                raise ClientGone("the client went away")
            if not self._pieces:
                return b""
            data = self._pieces.popleft()
            self._size -= len(data)
            if self._paused and self._size <= BODY_LOW:
                self._paused = False
                self._call.resume_body()
            return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._partial or self._next()
        count = min(len(view), len(data))
        view[:count] = data[:count]
        self._partial = data[count:]
        return count

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = [self._partial]
            self._partial = b""
            while True:
                data = self._next()
                if not data:
                    return b"".join(chunks)
                chunks.append(data)
        if size == 0:
            return b""
        data = self._partial or self._next()
        self._partial = data[size:]
        return data[:size]

    def readline(self, size: int | None = -1) -> bytes:
        line = bytearray()
        while size is None or size < 0 or len(line) < size:
            data = self._partial or self._next()
            if not data:
                break
            cut = data.find(b"\n") + 1 or len(data)
            if size is not None and size >= 0:
                cut = min(cut, size - len(line))
            line += data[:cut]
            self._partial = data[cut:]
            if line.endswith(b"\n"):
                break
        return bytes(line)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class WsgiCall:
    """One request of an in-process WSGI app."""

    def __init__(self, name: str, app: WsgiApp, environ: dict[str, Any], flow: FlowSide,
                 pending: list[bytes], body_end: bool,
                 pool: concurrent.futures.ThreadPoolExecutor,
                 done: Callable[[], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.name = name
        self.flow = flow
        self._app = app
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self.input = Input(self, pending, body_end)
        environ["wsgi.input"] = self.input
        environ["wsgi.errors"] = sys.stderr
        self._environ = environ
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._started = False
        self._head_sent = False
        self.complete = False
        self.gone = False
        self._paused_out = False
        self._blocked: concurrent.futures.Future[None] | None = None  # a piece held back
        self._done = done
        self._pool = pool
        self.future: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        """Hand the request to a thread of the pool."""
        self.future = self._pool.submit(self._thread)

    # -- from the flow (loop) -------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """More of the request body."""
        if self.input.feed(data):
            self.flow.upstream_writable(False)

    def feed_end(self) -> None:
        """The request body is complete."""
        self.input.feed_end()

    def pause(self) -> None:
        """The client's buffer is full: the thread waits before its next piece."""
        self._paused_out = True

    def resume(self) -> None:
        """The client takes more again."""
        self._paused_out = False
        blocked = self._blocked
        self._blocked = None
        if blocked is not None and not blocked.done():
            blocked.set_result(None)

    def close(self, abort: bool) -> None:
        """The exchange is over. A thread cannot be cancelled: its next read or piece
        of the answer raises ``ClientGone`` instead."""
        del abort
        self.gone = True
        self.input.gone()
        self.resume()

    def resume_body(self) -> None:
        """From the thread: the app took the body below the low mark."""
        self._loop.call_soon_threadsafe(self._resume_body)

    def _resume_body(self) -> None:
        if not self.gone:
            self.flow.upstream_writable(True)

    # -- the app's thread -----------------------------------------------------------------
    def _start_response(self, status: str, headers: list[tuple[str, str]],
                        exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self._head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._started:
            raise AssertionError("start_response called twice without exc_info")
        self._started = True
        self._status = int(status.split(" ", 1)[0])
        self._headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        return self._write

    def _write(self, data: bytes) -> None:
        if not self._started:
            raise AssertionError("write() before start_response")
        self._hand_over(bytes(data), False)

    def _hand_over(self, data: bytes, end: bool) -> None:
        """Give one piece to the loop and wait until the flow has it (and the client
        can take more)."""
        if self.gone:
            raise ClientGone("the client went away")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._deliver, data, end, done)
        done.result()
        if self.gone and not end:
            raise ClientGone("the client went away")

    def _thread(self) -> None:
        result: Iterable[bytes] | None = None
        try:
            result = self._app(self._environ, self._start_response)
            for piece in result:
                if piece:
                    if not self._started:
                        raise AssertionError("the app returned a body before start_response")
                    self._hand_over(bytes(piece), False)
            if not self._started:
                raise AssertionError("the app returned without calling start_response")
            self._hand_over(b"", True)
        except ClientGone:
            pass
        except Exception as exc:  # noqa: BLE001 - the app's own failure
            self._loop.call_soon_threadsafe(self._failed, exc)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # noqa: BLE001
                    log.error("app %s: close() of its answer raised %r", self.name, exc)
            if self._done is not None:
                self._loop.call_soon_threadsafe(self._done)

    # -- back on the loop -----------------------------------------------------------------
    def _deliver(self, data: bytes, end: bool, done: concurrent.futures.Future[None]) -> None:
        if self.gone:
            done.set_result(None)
            return
        flow = self.flow
        if not self._head_sent:
            self._head_sent = True
            flow.upstream_head(ResponseHead(self._status, b"", self._headers,
                                            content_length(self._headers), False, 1))
        if data:
            flow.upstream_body(data)
        if end:
            self.complete = True
            flow.upstream_end()
        if self._paused_out and not self.gone and not end:
            self._blocked = done  # resolved by resume() (or close())
        else:
            done.set_result(None)

    def _failed(self, exc: BaseException) -> None:
        if self.gone or self.complete:
            log.error("app %s raised after its response: %r", self.name, exc)
            return
        error: ProxyError
        if self._head_sent:
            error = AppFailed(f"the app {self.name!r} broke off its response", app=self.name)
        else:
            error = failure(self.name, exc)
        log.error("app %s: %s", self.name, (error.detail or error.message).rstrip())
        self.flow.hosted_failed(error)
