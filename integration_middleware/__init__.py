"""Bastion integration middleware: pair a Python web app with the Bastion edge server.

Theory of operation
-------------------
Bastion runs each app process with a random ``BASTION_TOKEN`` in its environment and sends it in
the ``X-Bastion-Token`` header of every request it forwards, together with ``X-Forwarded-*``
headers.  The middleware, running inside the app, refuses (400) any request without the right
token, and for the others applies the forwarded scheme, client address, server host/port and path
base (root path) so the app sees the request as the client made it.  Without ``BASTION_TOKEN`` it
changes nothing.

Three flavours share the logic in :mod:`integration_middleware._core`:

* :class:`IntegrationMiddleware` (ASGI 3) - ``app = IntegrationMiddleware(app)``
* :class:`WSGIIntegrationMiddleware` (WSGI) - ``app = WSGIIntegrationMiddleware(app)``
* :data:`integration_middleware.aiohttp.middleware` - imported lazily, so importing this package
  never imports aiohttp.

Only the standard library is imported here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .asgi import IntegrationMiddleware
from .wsgi import WSGIIntegrationMiddleware

__all__ = ["IntegrationMiddleware", "WSGIIntegrationMiddleware"]


def __getattr__(name: str) -> ModuleType:
    """Import the ``aiohttp`` submodule on first attribute access."""
    if name == "aiohttp":
        return importlib.import_module(".aiohttp", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
