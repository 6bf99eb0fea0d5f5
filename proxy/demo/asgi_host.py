"""A minimal ASGI host on aiohttp for the demo's ASGI app (HTTP only, no websockets).

Real deployments run ASGI apps under uvicorn or hypercorn; the demo uses this small
adapter so that it needs nothing beyond Bastion's own dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import MutableMapping
from typing import Any

from aiohttp import web

from .asgi_app import app as asgi_app


async def _handle(request: web.BaseRequest) -> web.StreamResponse:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1"),
        "query_string": request.query_string.encode("latin-1"),
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": (peer[0], peer[1]) if isinstance(peer, tuple) else None,
        "server": ("127.0.0.1", 0),
    }
    body = await request.read()
    sent_body = False
    response = web.StreamResponse()

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response.set_status(message["status"])
            for name, value in message.get("headers", []):
                response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
            await response.prepare(request)
        elif message["type"] == "http.response.body":
            await response.write(message.get("body", b""))

    await asgi_app(scope, receive, send)
    await response.write_eof()
    return response


def main() -> None:
    """Serve the demo ASGI app on 127.0.0.1:PORT."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    asyncio.run(_serve(port))


async def _serve(port: int) -> None:
    server = web.Server(_handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
