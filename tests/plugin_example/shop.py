"""A user's app, as a user of the ``bastion`` pytest fixture would have it: Starlette + the
Bastion integration middleware, served by uvicorn (``uvicorn shop:app --port {port}``).

``/shop/`` says hello, ``/shop/whoami`` reports the pid and what the app saw of the request,
``/shop/slow?s=N`` answers after N seconds.
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from integration_middleware import IntegrationMiddleware


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("welcome to the shop\n")


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({
        "pid": os.getpid(),
        "scheme": request.url.scheme,
        "client": request.client.host if request.client else None,
        "home": str(request.url_for("home")),
    })


async def slow(request: Request) -> PlainTextResponse:
    await asyncio.sleep(float(request.query_params.get("s", "5")))
    return PlainTextResponse("done\n")


app = IntegrationMiddleware(Starlette(routes=[
    Route("/", home, name="home"),
    Route("/whoami", whoami),
    Route("/slow", slow),
]))
