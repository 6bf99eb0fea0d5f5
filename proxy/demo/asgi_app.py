"""The demo's ASGI app, wrapped in the integration middleware."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from integration_middleware import IntegrationMiddleware

from .page import render


async def _app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    client = scope.get("client") or ("?", 0)
    body = render(
        "ASGI",
        {
            "scheme": str(scope.get("scheme")),
            "client": str(client[0]),
            "root_path": str(scope.get("root_path", "")),
            "path": str(scope.get("path")),
            "query": scope.get("query_string", b"").decode("latin-1"),
        },
    )
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


app = IntegrationMiddleware(_app)
