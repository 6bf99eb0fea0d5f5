"""Starlette under hypercorn behind Bastion (examples/starlette-hypercorn).

Bastion runs ``hypercorn app:app --bind 127.0.0.1:{port}`` in this directory, mounted at
``/prefix``. Here the integration middleware is added the Starlette way
(``middleware=[Middleware(IntegrationMiddleware)]``); wrapping the app
(``app = IntegrationMiddleware(app)``) works as well. FastAPI is the same
(``api.add_middleware(IntegrationMiddleware)``).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from integration_middleware import IntegrationMiddleware


async def index(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello from Starlette\n")


async def info(request: Request) -> JSONResponse:
    return JSONResponse({
        "framework": "starlette",
        "scheme": request.url.scheme,
        "secure": request.url.scheme == "https",
        "client": request.client.host if request.client else None,
        "url": str(request.url_for("info")),
        "path": request.url.path,
    })


async def go(request: Request) -> RedirectResponse:
    return RedirectResponse(request.url_for("info"), status_code=302)


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({
        "scheme": websocket.url.scheme,
        "client": websocket.client.host if websocket.client else None,
        "url": str(websocket.url_for("ws")),
    })
    try:
        while True:
            await websocket.send_text("echo: " + await websocket.receive_text())
    except WebSocketDisconnect:
        pass


app = Starlette(
    routes=[
        Route("/", index, name="index"),
        Route("/info", info, name="info"),
        Route("/go", go),
        WebSocketRoute("/ws", ws, name="ws"),
    ],
    middleware=[Middleware(IntegrationMiddleware)],
)
