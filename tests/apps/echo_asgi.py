"""A real ASGI test app (run under uvicorn) behind the integration middleware.

Routes: /info (what it saw, JSON), /upload (POST: streams the body, answers its size and
sha256), /download?size=N (streams N bytes), /slow?s=N, /hang, /exit (exits at once),
/count (requests that reached app code).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any
from urllib.parse import parse_qs

from integration_middleware import IntegrationMiddleware

COUNT = {"n": 0}


async def _send_json(send: Any, data: Any, status: int = 200) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    COUNT["n"] += 1
    path = scope["path"]
    query = parse_qs(scope["query_string"].decode())
    if path.endswith("/upload"):
        digest = hashlib.sha256()
        size = 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        await _send_json(send, {"size": size, "sha256": digest.hexdigest()})
        return
    if path.endswith("/download"):
        size = int(query.get("size", ["0"])[0])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(size).encode())]})
        block = b"x" * 65536
        sent = 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            sent += len(part)
            await send({"type": "http.response.body", "body": part, "more_body": sent < size})
        return
    if path.endswith("/slow"):
        await asyncio.sleep(float(query.get("s", ["1"])[0]))
    if path.endswith("/hang"):
        await asyncio.sleep(3600)
    if path.endswith("/exit"):
        os._exit(7)
    if path.endswith("/count"):
        await _send_json(send, {"count": COUNT["n"]})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await _send_json(send, {
        "flavour": "asgi",
        "scheme": scope["scheme"],
        "client": scope["client"][0] if scope.get("client") else None,
        "root_path": scope.get("root_path", ""),
        "path": path,
        "query": scope["query_string"].decode(),
        "method": scope["method"],
        "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
        "body": body.decode("latin-1"),
        "pid": os.getpid(),
        "port": os.environ.get("BASTION_PORT"),
        "env_port": os.environ.get("PORT"),
        "token_set": bool(os.environ.get("BASTION_TOKEN")),
        "path_base": os.environ.get("BASTION_PATH_BASE"),
        "app": os.environ.get("BASTION_APP"),
    })


app = IntegrationMiddleware(raw_app)
