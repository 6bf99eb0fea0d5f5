"""Bare ASGI and WSGI callables that misbehave, for in-process hosting tests."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from typing import Any


async def asgi(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] != "http":
        raise RuntimeError("no lifespan here")  # an app without lifespan support
    path = scope["path"]
    if path.endswith("/raise"):
        raise ValueError("raised before the response")
    if path.endswith("/nothing"):
        return
    if path.endswith("/die"):
        os._exit(7)
    if path.endswith("/slow"):
        await asyncio.sleep(1.0)
    if path.endswith("/block"):
        time.sleep(30)  # a synchronous call: the worker's event loop is stuck
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"raw %d" % os.getpid()})


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/raise":
        raise ValueError("raised before the response")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"raw wsgi ", environ["SCRIPT_NAME"].encode(), b" ", environ["PATH_INFO"].encode()]
