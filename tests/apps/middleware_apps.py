"""Tiny apps used by tests/test_middleware.py, each wrapped in one flavour of the middleware.

Every app appends the path it was called with to the file named by ``MW_HITS_FILE`` (so a test
can prove a refused request never reached it) and answers with a JSON description of what it saw.

* ASGI:   ``uvicorn middleware_apps:asgi_app``
* WSGI:   ``gunicorn middleware_apps:wsgi_app``
* aiohttp: ``python middleware_apps.py aiohttp PORT`` (runs ``aiohttp.web.run_app``)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

from integration_middleware import IntegrationMiddleware, WSGIIntegrationMiddleware


def _record(path: str) -> None:
    hits = os.environ.get("MW_HITS_FILE")
    if hits:
        with open(hits, "a", encoding="utf-8") as f:
            f.write(path + "\n")


async def _asgi_inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    _record(scope["path"])
    seen = {
        "scheme": scope.get("scheme"),
        "client": list(scope["client"]) if scope.get("client") else None,
        "server": list(scope["server"]) if scope.get("server") else None,
        "root_path": scope.get("root_path"),
        "path": scope.get("path"),
        "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        "client_cert": (scope.get("extensions") or {}).get("bastion", {}).get("client_cert"),
    }
    body = json.dumps(seen).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


asgi_app = IntegrationMiddleware(_asgi_inner)


def _wsgi_inner(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    _record(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
    seen = {
        "scheme": environ["wsgi.url_scheme"],
        "client": [environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT")],
        "server": [environ.get("SERVER_NAME"), environ.get("SERVER_PORT")],
        "root_path": environ.get("SCRIPT_NAME"),
        "path": environ.get("PATH_INFO"),
        "headers": {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
        },
        "client_cert": environ.get("bastion.client_cert"),
    }
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


wsgi_app = WSGIIntegrationMiddleware(_wsgi_inner)


def run_aiohttp(port: int) -> None:
    """Serve the aiohttp test app on 127.0.0.1:port until killed."""
    from aiohttp import web

    from integration_middleware.aiohttp import middleware

    async def handler(request: web.Request) -> web.Response:
        _record(request.path)
        return web.json_response(
            {
                "scheme": request.scheme,
                "client": [request.remote, None],
                "server": [request.host, None],
                "root_path": request.get("bastion.path_base"),
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "client_cert": request.get("bastion.client_cert"),
            }
        )

    app = web.Application(middlewares=[middleware])
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "aiohttp":
        run_aiohttp(int(sys.argv[2]))
    else:
        sys.exit("usage: middleware_apps.py aiohttp PORT")
