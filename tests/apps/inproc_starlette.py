"""A Starlette app for in-process hosting tests (tests/test_inprocess.py).

It reports what it sees (scope facts, absolute URLs, the pid of the worker it runs
in), streams bodies both ways, raises, exits its process on request, and records its
lifespan startup and shutdown in the file ``LIFESPAN_LOG`` names (one line each).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket


def _note(what: str) -> None:
    path = os.environ.get("LIFESPAN_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{what} {os.getpid()}\n")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    _note("startup")
    yield {"started_in": os.getpid()}
    _note("shutdown")


async def info(request: Request) -> Response:
    return JSONResponse({
        "pid": os.getpid(),
        "scheme": request.url.scheme,
        "client": list(request.client or ()),
        "root_path": request.scope["root_path"],
        "path": request.url.path,
        "url": str(request.url),
        "url_for": str(request.url_for("info")),
        "http_version": request.scope["http_version"],
        "headers": {k: v for k, v in request.headers.items()},
        "state": request.state.started_in,
    })


async def redirect(request: Request) -> Response:
    return RedirectResponse(request.url_for("info"), status_code=302)


async def upload(request: Request) -> Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse({"size": size, "sha256": digest.hexdigest()})


async def download(request: Request) -> Response:
    size = int(request.query_params.get("size", "1048576"))
    block = b"x" * 65536

    async def body() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            piece = block[:min(left, len(block))]
            left -= len(piece)
            yield piece

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"Content-Length": str(size)})


async def boom(request: Request) -> Response:
    raise RuntimeError("boom from the app")


async def die(request: Request) -> Response:
    os._exit(3)


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await websocket.send_text(message["text"])
        else:
            await websocket.send_bytes(message["bytes"])


app = Starlette(lifespan=lifespan, routes=[
    Route("/info", info, name="info"),
    Route("/redirect", redirect),
    Route("/upload", upload, methods=["POST", "PUT"]),
    Route("/download", download),
    Route("/boom", boom),
    Route("/die", die),
    Route("/hello", hello),
    WebSocketRoute("/ws", echo),
])
