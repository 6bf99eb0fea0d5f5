"""FastAPI under uvicorn behind Bastion (examples/fastapi-uvicorn).

Bastion runs ``uvicorn app:app --host 127.0.0.1 --port {port}`` in this directory and
mounts it at ``/prefix``. The integration middleware wraps the whole FastAPI app, so
FastAPI sees the client's scheme (``https``), address and the path base (``root_path``):
``request.url_for()`` builds ``https://host/prefix/...`` with no FastAPI setting at all.
Run alone (``uvicorn app:app``) the middleware does nothing.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, RedirectResponse

from integration_middleware import IntegrationMiddleware

api = FastAPI()


@api.get("/", name="index", response_class=PlainTextResponse)
async def index() -> str:
    return "hello from FastAPI\n"


@api.get("/info", name="info")
async def info(request: Request) -> dict[str, object]:
    return {
        "framework": "fastapi",
        "scheme": request.url.scheme,
        "secure": request.url.scheme == "https",
        "client": request.client.host if request.client else None,
        "url": str(request.url_for("info")),
        "path": request.url.path,
    }


@api.get("/go")
async def go(request: Request) -> RedirectResponse:
    return RedirectResponse(request.url_for("info"), status_code=302)


@api.websocket("/ws", name="ws")
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


# Outermost, so everything inside (routing included) sees the rewritten request.
app = IntegrationMiddleware(api)
