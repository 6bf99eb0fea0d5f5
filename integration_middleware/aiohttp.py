"""aiohttp flavour of the Bastion integration middleware.

Theory of operation
-------------------
:data:`middleware` is an ``@web.middleware`` function: add it to
``web.Application(middlewares=[middleware])``.  It reads ``BASTION_TOKEN`` and
``BASTION_PATH_BASE`` from the environment on the first request (and keeps them); use
:func:`make_middleware` to give explicit values instead.  Without a token every request goes
straight to the handler.  With a token, each request is checked by
:func:`integration_middleware._core.decide`:

* unpaired: a 400 text/plain response; the handler is not called;
* paired: the handler gets a clone of the request (``request.clone(headers=..., scheme=...,
  remote=..., host=...)``) with the scheme from ``X-Forwarded-Proto``, ``remote`` from
  ``X-Forwarded-For``, ``host`` from ``X-Forwarded-Host``, the ``X-Bastion-Token`` header removed
  and ``X-Original-For`` / ``X-Original-Proto`` added.  aiohttp has no root path, so the path base
  is stored as ``request["bastion.path_base"]`` (only when the path lies under it); a client
  certificate is stored as ``request["bastion.client_cert"]``.

This is the only module of the package that imports aiohttp.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from ._core import (
    BAD_REQUEST_BODY,
    ORIGINAL_FOR_HEADER,
    ORIGINAL_PROTO_HEADER,
    TOKEN_HEADER,
    Settings,
    collect_headers,
    decide,
    log_rejection,
)

__all__ = ["AiohttpMiddleware", "make_middleware", "middleware"]

#: The type of an aiohttp (new-style) middleware function.
AiohttpMiddleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def make_middleware(*, token: str | None = None, path_base: str | None = None) -> AiohttpMiddleware:
    """Return an aiohttp middleware with its settings read now.

    ``token`` and ``path_base`` default to ``BASTION_TOKEN`` and ``BASTION_PATH_BASE``.
    """
    settings = Settings.load(token=token, path_base=path_base)

    @web.middleware
    async def bastion_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _handle(settings, request, handler)

    return bastion_middleware


_env_settings: Settings | None = None


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp middleware pairing the app with Bastion (settings from the environment).

    The environment is read on the first request and kept for the life of the process.
    """
    global _env_settings
    if _env_settings is None:
        _env_settings = Settings.load()
    return await _handle(_env_settings, request, handler)


async def _handle(settings: Settings, request: web.Request, handler: Handler) -> web.StreamResponse:
    if not settings.enabled:
        return await handler(request)
    headers = collect_headers(request.headers.items())
    path = request.path
    decision = decide(settings, headers, path)
    if not decision.paired:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
        log_rejection(client or request.remote, path, decision.reason)
        return web.Response(
            status=400,
            body=BAD_REQUEST_BODY,
            content_type="text/plain",
            charset="utf-8",
        )

    new_headers: CIMultiDict[str] = CIMultiDict(request.headers)
    for name in (TOKEN_HEADER, ORIGINAL_FOR_HEADER, ORIGINAL_PROTO_HEADER):
        new_headers.popall(name, None)
    if request.remote:
        new_headers[ORIGINAL_FOR_HEADER] = request.remote
    new_headers[ORIGINAL_PROTO_HEADER] = request.scheme

    host = request.host
    forwarded_host = request.headers.get("X-Forwarded-Host")
    if decision.server is not None and forwarded_host:
        host = forwarded_host.split(",")[-1].strip()
    scheme = decision.scheme or request.scheme
    remote = decision.client_ip or request.remote
    if remote is None:
        new = request.clone(headers=new_headers, scheme=scheme, host=host)
    else:
        new = request.clone(headers=new_headers, scheme=scheme, host=host, remote=remote)
    if decision.path_split is not None:
        new["bastion.path_base"] = decision.path_split[0]
    if decision.client_cert is not None:
        new["bastion.client_cert"] = decision.client_cert
    return await handler(new)
