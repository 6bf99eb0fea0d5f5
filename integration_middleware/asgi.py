"""ASGI 3 flavour of the Bastion integration middleware.

Theory of operation
-------------------
:class:`IntegrationMiddleware` wraps an ASGI application.  At construction it reads
``BASTION_TOKEN`` and ``BASTION_PATH_BASE``; without a token every call goes straight to the
wrapped app.  With a token, each ``http`` and ``websocket`` scope is checked by
:func:`integration_middleware._core.decide`:

* unpaired ``http``: a 400 text/plain response is sent and the app is not called;
* unpaired ``websocket``: the ``websocket.connect`` event is consumed and ``websocket.close`` with
  code 1008 is sent before any accept; the app is not called;
* paired: the app gets a *copy* of the scope with ``scheme``, ``client`` (``(ip, 0)``), ``server``,
  ``root_path`` (the path base; ``path`` keeps the full path as the ASGI spec wants) and
  ``extensions["bastion"]["client_cert"]`` set, the ``X-Bastion-Token`` header removed, and
  ``X-Original-For`` / ``X-Original-Proto`` headers carrying the peer address and scheme the
  server saw.

``lifespan`` (and any other scope type) is passed through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

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

__all__ = ["ASGIApp", "IntegrationMiddleware", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DROP = {TOKEN_HEADER.encode(), ORIGINAL_FOR_HEADER.encode(), ORIGINAL_PROTO_HEADER.encode()}


class IntegrationMiddleware:
    """ASGI 3 middleware that pairs an app with Bastion.

    ``IntegrationMiddleware(app)`` reads ``BASTION_TOKEN`` and ``BASTION_PATH_BASE`` from the
    environment; ``token=`` and ``path_base=`` override them (mainly for tests).  Without a token
    it is a pure pass-through.
    """

    def __init__(
        self, app: ASGIApp, *, token: str | None = None, path_base: str | None = None
    ) -> None:
        self.app = app
        self.settings = Settings.load(token=token, path_base=path_base)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        kind = scope.get("type")
        if not self.settings.enabled or kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw_headers: list[tuple[bytes, bytes]] = [
            (bytes(k), bytes(v)) for k, v in scope.get("headers", ())
        ]
        headers = collect_headers(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers
        )
        path: str = scope.get("path", "")
        websocket = kind == "websocket"
        decision = decide(self.settings, headers, path, websocket=websocket)
        if not decision.paired:
            log_rejection(_format_client(scope.get("client")), path, decision.reason)
            if websocket:
                await _refuse_websocket(receive, send)
            else:
                await _refuse_http(send)
            return

        new_scope: Scope = dict(scope)
        original_scheme: str = scope.get("scheme") or ("ws" if websocket else "http")
        new_headers = [(k, v) for k, v in raw_headers if k.lower() not in _DROP]
        peer = scope.get("client")
        if peer:
            new_headers.append((ORIGINAL_FOR_HEADER.encode(), str(peer[0]).encode("latin-1")))
        new_headers.append((ORIGINAL_PROTO_HEADER.encode(), original_scheme.encode("latin-1")))
        new_scope["headers"] = new_headers
        if decision.scheme is not None:
            new_scope["scheme"] = decision.scheme
        if decision.client_ip is not None:
            new_scope["client"] = (decision.client_ip, 0)
        if decision.server is not None:
            new_scope["server"] = decision.server
        if decision.path_split is not None:
            new_scope["root_path"] = decision.path_split[0]
        if decision.client_cert is not None:
            extensions = dict(scope.get("extensions") or {})
            extensions["bastion"] = {"client_cert": decision.client_cert}
            new_scope["extensions"] = extensions
        await self.app(new_scope, receive, send)


def _format_client(client: Any) -> str | None:
    if not client:
        return None
    try:
        host, port = client
    except (TypeError, ValueError):
        return str(client)
    return f"{host}:{port}"


async def _refuse_http(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(BAD_REQUEST_BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BAD_REQUEST_BODY, "more_body": False})


async def _refuse_websocket(receive: Receive, send: Send) -> None:
    message = await receive()
    if message.get("type") != "websocket.connect":
        return  # the client went away (websocket.disconnect): nothing to refuse
    await send({"type": "websocket.close", "code": 1008, "reason": "not paired with Bastion"})
