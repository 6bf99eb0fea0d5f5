"""A Starlette WebSocket test app (run under uvicorn) behind the integration middleware.

/ws echoes text and binary frames; a text frame "close:CODE" makes the app close with
CODE; /ws-info sends the handshake headers it saw as JSON, then echoes; /reject refuses
the handshake (403); /plain is an ordinary HTTP route.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from integration_middleware import IntegrationMiddleware


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                text = message["text"]
                if text.startswith("close:"):
                    await websocket.close(code=int(text.split(":", 1)[1]), reason="bye")
                    return
                await websocket.send_text(text)
            elif message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


async def info(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol="chat" if "chat" in websocket.scope.get(
        "subprotocols", []) else None)
    await websocket.send_json({
        "headers": {k.decode(): v.decode() for k, v in websocket.scope["headers"]},
        "scheme": websocket.scope["scheme"],
        "path": websocket.scope["path"],
    })
    await echo_loop(websocket)


async def echo_loop(websocket: WebSocket) -> None:
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        return


async def reject(websocket: WebSocket) -> None:
    await websocket.close(code=1008)


async def plain(request: object) -> PlainTextResponse:
    return PlainTextResponse("plain")


app = IntegrationMiddleware(Starlette(routes=[
    WebSocketRoute("/ws", echo),
    WebSocketRoute("/ws-info", info),
    WebSocketRoute("/reject", reject),
    Route("/plain", plain),
]))
