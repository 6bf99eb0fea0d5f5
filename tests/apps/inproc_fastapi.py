"""A FastAPI app for in-process hosting tests (tests/test_inprocess.py)."""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse

app = FastAPI()


@app.get("/info", name="info")
async def info(request: Request) -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "scheme": request.url.scheme,
        "client": list(request.client or ()),
        "root_path": request.scope["root_path"],
        "path": request.url.path,
        "url_for": str(request.url_for("info")),
    }


@app.get("/redirect")
async def redirect(request: Request) -> RedirectResponse:
    return RedirectResponse(str(request.url_for("info")), status_code=302)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "fastapi"}
