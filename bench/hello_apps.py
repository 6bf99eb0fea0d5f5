"""The in-process benchmark's apps (bench/inprocess.py), one module for every target.

``app``: a minimal raw ASGI app answering every request with 200 and a 13-byte body (what
uvicorn serves directly, Bastion calls in process, and Bastion forwards to out of
process); ``fastapi_app`` and ``flask_app``: the same answer from FastAPI (ASGI) and Flask
(WSGI), for the framework ratios. It does not support the lifespan protocol (fine for
every server).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

BODY = b"Hello, world\n"
HEAD = {"type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]}
MESSAGE = {"type": "http.response.body", "body": BODY}


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        raise RuntimeError("no lifespan")  # servers take that as "unsupported"
    await send(HEAD)
    await send(MESSAGE)


def _fastapi() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    made = FastAPI()

    @made.get("/{path:path}", response_class=PlainTextResponse)
    async def hello(path: str) -> str:
        return BODY.decode()

    return made


def _flask() -> Any:
    from flask import Flask

    made = Flask(__name__)

    @made.route("/", defaults={"path": ""})
    @made.route("/<path:path>")
    def hello(path: str) -> tuple[bytes, int, dict[str, str]]:
        return BODY, 200, {"Content-Type": "text/plain"}

    return made


def __getattr__(name: str) -> Any:
    # Built on first use: the raw app's servers never import the frameworks.
    if name == "fastapi_app":
        return _fastapi()
    if name == "flask_app":
        return _flask()
    raise AttributeError(name)
