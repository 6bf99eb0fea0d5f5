"""Framing for the channel between the main process and a worker process.

One socketpair per worker carries frames: a kind byte, a 4-byte big-endian length and
the payload. Module messages travel as JSON (``module.messages`` ``to_wire`` /
``from_wire``), so the interface between the module and the proxy is the same whether a
worker shares the main process's event loop or not. Only the worker's set-up (its
frozen ``Config`` and its generation's certificate bytes) and new certificate bytes
travel pickled, from the main process to its own child.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

HEADER = struct.Struct(">cI")
MAX_FRAME = 64 * 1024 * 1024

SETUP = b"C"  # main -> worker: pickled WorkerSetup
MESSAGE = b"M"  # both ways: a module message as JSON
STOP = b"S"  # main -> worker: drain and exit (payload: grace seconds as JSON)
REOPEN = b"L"  # main -> worker: reopen log files
METRICS = b"X"  # worker -> main: metrics snapshot as JSON
READY = b"R"  # worker -> main: listening
CERTIFICATES = b"T"  # main -> worker: new certificates in place (payload: pickled PEM bytes)
HEARTBEAT = b"H"  # worker -> main: the worker's event loop runs (proxy/liveness.py)
DRAIN = b"D"  # main -> worker: the node drains or not (payload: true/false as JSON)
LISTEN = b"G"  # main -> a worker started with load_first: take connections now


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame of ``kind`` carrying ``payload``."""
    return HEADER.pack(kind, len(payload)) + payload


def json_frame(kind: bytes, data: Any) -> bytes:
    """A frame whose payload is ``data`` as compact JSON."""
    return frame(kind, json.dumps(data, separators=(",", ":")).encode())


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next (kind, payload); raises ``asyncio.IncompleteReadError`` at end of stream."""
    head = await reader.readexactly(HEADER.size)
    kind, size = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    return kind, await reader.readexactly(size)
