"""``static.FileSender`` on a real uvloop loop and real loopback sockets: sendfile on the
socket beside the transport, pread with the protocol's backpressure, and the cut-off of
a client that takes nothing for ``SEND_TIMEOUT`` seconds.

The server side here is a minimal protocol standing where the flow and the HTTP/1.1
connection stand in Bastion (it is the sender's ``Owner`` and ``Sink``); everything below
it (loop, transport, sockets, file) is the real thing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from bastion.proxy.edge import static

SIZE = 24 * 1024 * 1024 + 7


class Server(asyncio.Protocol):
    """Sends ``path`` with a FileSender as soon as a client connects."""

    def __init__(self, path: Path, use_sendfile: bool, done: asyncio.Future[Any]) -> None:
        self.path = path
        self.use_sendfile = use_sendfile
        self.done = done
        self.sender: static.FileSender | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"HEAD\n")
        fd = os.open(self.path, os.O_RDONLY)
        self.sender = static.FileSender(self, self, fd, 0, os.fstat(fd).st_size,
                                        self.transport if self.use_sendfile else None)
        self.sender.start()
        self.used_sendfile = self.sender.sock >= 0  # (set while the file is sent)

    def respond_body(self, body: list[bytes], end: bool) -> None:
        assert self.transport is not None
        for piece in body:
            self.transport.write(piece)
        if end:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused += 1
        if self.sender is not None:
            self.sender.pause()

    def resume_writing(self) -> None:
        if self.sender is not None:
            self.sender.resume()

    def static_end(self, sent: int) -> None:
        assert self.transport is not None
        self.transport.close()
        if not self.done.done():
            self.done.set_result(("end", sent, self.paused, self.used_sendfile))

    def static_abort(self, sent: int) -> None:
        assert self.transport is not None
        self.transport.abort()
        if not self.done.done():
            self.done.set_result(("abort", sent, self.paused, self.used_sendfile))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sender is not None:
            self.sender.close()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sender") / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def run(coro_factory: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())


async def _download(path: Path, use_sendfile: bool,
                    slow: bool) -> tuple[tuple[str, int, int, bool], bytes]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    server = await loop.create_server(lambda: Server(path, use_sendfile, done), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    client.setblocking(False)
    received = bytearray()
    while True:
        try:
            chunk = await loop.sock_recv(client, 1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
        if slow and len(received) < 4 * 1024 * 1024:
            await asyncio.sleep(0.001)
    client.close()
    result = await asyncio.wait_for(done, 10)
    server.close()
    return result, bytes(received)


@pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "pread"])
def test_whole_file_arrives(big_file: Path, use_sendfile: bool) -> None:
    (how, sent, paused, used), data = run(lambda: _download(big_file, use_sendfile, slow=True))
    assert how == "end" and sent == SIZE
    assert used is use_sendfile
    assert data[:5] == b"HEAD\n"
    assert hashlib.sha256(data[5:]).digest() == hashlib.sha256(big_file.read_bytes()).digest()
    if not use_sendfile:
        assert paused > 0  # a slow reader made the protocol push back, and it was heeded


def test_stalled_client_is_cut_off(big_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(static, "SEND_TIMEOUT", 0.3)

    async def stalled() -> tuple[str, int, float]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        server = await loop.create_server(lambda: Server(big_file, True, done),
                                          "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))  # never reads
        started = time.monotonic()
        how, sent, _, used = await asyncio.wait_for(done, 10)
        assert used
        elapsed = time.monotonic() - started
        client.close()
        server.close()
        return how, sent, elapsed

    how, sent, elapsed = run(stalled)
    assert how == "abort"
    assert 0 < sent < SIZE  # the socket buffers took some, then nothing moved
    assert 0.3 <= elapsed < 5
