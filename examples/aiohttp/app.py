"""An aiohttp app that runs its own server, behind Bastion (examples/aiohttp).

Bastion runs ``python app.py`` in this directory; the app listens on
``127.0.0.1:$PORT``. aiohttp has no "root path", so the app mounts its routes under
``$BASTION_PATH_BASE`` itself (a sub-application) and the integration middleware goes on
the root application. ``request.scheme``, ``request.secure``, ``request.remote`` and
``request.url`` are then the client's; absolute URLs are
``request.url.join(router["name"].url_for())``. Run alone it serves on port 8000 at ``/``.
"""

from __future__ import annotations

import os

from aiohttp import web

from integration_middleware.aiohttp import middleware

routes = web.RouteTableDef()


@routes.get("/", name="index")
async def index(request: web.Request) -> web.Response:
    return web.Response(text="hello from aiohttp\n")


@routes.get("/info", name="info")
async def info(request: web.Request) -> web.Response:
    url = request.url.join(request.app.router["info"].url_for())
    return web.json_response({
        "framework": "aiohttp",
        "scheme": request.scheme,
        "secure": request.secure,
        "client": request.remote,
        "url": str(url),
        "path": request.path,
    })


@routes.get("/go", name="go")
async def go(request: web.Request) -> web.Response:
    raise web.HTTPFound(request.app.router["info"].url_for())


def make_app() -> web.Application:
    root = web.Application(middlewares=[middleware])
    prefix = os.environ.get("BASTION_PATH_BASE", "")
    if prefix:
        site = web.Application()
        site.add_routes(routes)
        root.add_subapp(prefix, site)
    else:
        root.add_routes(routes)
    return root


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")),
                access_log=None, print=None)
