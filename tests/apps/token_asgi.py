"""echo_asgi plus ``/token``: a hash of the process's pairing token, never the token.

``/token`` answers ``{"token_sha256": ..., "pid": ..., "port": ...}`` so a test can tell
two processes' tokens apart without the token leaving the app. Every other path is
echo_asgi's (``/info``, ``/slow?s=N``, ``/hang``, ...). Run it under uvicorn as
``token_asgi:app``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from echo_asgi import raw_app as echo_raw_app

from integration_middleware import IntegrationMiddleware


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"].endswith("/token"):
        token = os.environ.get("BASTION_TOKEN", "")
        body = json.dumps({
            "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
            "pid": os.getpid(),
            "port": os.environ.get("BASTION_PORT"),
        }).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    await echo_raw_app(scope, receive, send)


app = IntegrationMiddleware(raw_app)
