"""WSGI flavour of the Bastion integration middleware.

Theory of operation
-------------------
:class:`WSGIIntegrationMiddleware` wraps a WSGI application.  At construction it reads
``BASTION_TOKEN`` and ``BASTION_PATH_BASE``; without a token every call goes straight to the
wrapped app.  With a token, each request is checked by
:func:`integration_middleware._core.decide`:

* unpaired: ``400 Bad Request`` with a short text/plain body; the app is not called;
* paired: the app gets a *copy* of the environ with ``wsgi.url_scheme``, ``REMOTE_ADDR`` (and
  ``REMOTE_PORT`` removed), ``SERVER_NAME`` / ``SERVER_PORT`` (``HTTP_HOST`` is left as it is),
  ``SCRIPT_NAME`` (the path base) / ``PATH_INFO`` (the rest) and ``bastion.client_cert`` set,
  ``HTTP_X_BASTION_TOKEN`` removed, and ``HTTP_X_ORIGINAL_FOR`` / ``HTTP_X_ORIGINAL_PROTO``
  carrying the peer address and scheme the server saw.

Path matching uses ``SCRIPT_NAME + PATH_INFO`` as the full path, so a server that already split off
the path base (e.g. gunicorn with ``SCRIPT_NAME`` set) gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from ._core import BAD_REQUEST_BODY, Settings, collect_headers, decide, log_rejection

__all__ = ["WSGIIntegrationMiddleware"]


class WSGIIntegrationMiddleware:
    """WSGI middleware that pairs an app with Bastion.

    ``WSGIIntegrationMiddleware(app)`` reads ``BASTION_TOKEN`` and ``BASTION_PATH_BASE`` from the
    environment; ``token=`` and ``path_base=`` override them (mainly for tests).  Without a token
    it is a pure pass-through.
    """

    def __init__(
        self, app: WSGIApplication, *, token: str | None = None, path_base: str | None = None
    ) -> None:
        self.app = app
        self.settings = Settings.load(token=token, path_base=path_base)
        # WSGI paths are bytes decoded as latin-1, so compare in that form.
        self._wsgi_path_base = self.settings.path_base.encode("utf-8").decode("latin-1")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one WSGI request."""
        if not self.settings.enabled:
            return self.app(environ, start_response)
        headers = collect_headers(
            (key[5:].replace("_", "-"), str(value))
            for key, value in environ.items()
            if key.startswith("HTTP_")
        )
        script_name: str = environ.get("SCRIPT_NAME", "") or ""
        path_info: str = environ.get("PATH_INFO", "") or ""
        full_path = script_name + path_info
        settings = Settings(token=self.settings.token, path_base=self._wsgi_path_base)
        decision = decide(settings, headers, full_path)
        if not decision.paired:
            peer = environ.get("REMOTE_ADDR")
            port = environ.get("REMOTE_PORT")
            client = f"{peer}:{port}" if peer and port else peer
            log_rejection(client, full_path, decision.reason)
            start_response(
                "400 Bad Request",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(BAD_REQUEST_BODY))),
                ],
            )
            return [BAD_REQUEST_BODY]

        env: WSGIEnvironment = dict(environ)
        env.pop("HTTP_X_BASTION_TOKEN", None)
        env.pop("HTTP_X_ORIGINAL_FOR", None)
        if environ.get("REMOTE_ADDR"):
            env["HTTP_X_ORIGINAL_FOR"] = environ["REMOTE_ADDR"]
        env["HTTP_X_ORIGINAL_PROTO"] = environ.get("wsgi.url_scheme", "http")
        if decision.scheme is not None:
            env["wsgi.url_scheme"] = decision.scheme
        if decision.client_ip is not None:
            env["REMOTE_ADDR"] = decision.client_ip
            env.pop("REMOTE_PORT", None)
        if decision.server is not None:
            env["SERVER_NAME"] = decision.server[0]
            env["SERVER_PORT"] = str(decision.server[1])
        if decision.path_split is not None:
            env["SCRIPT_NAME"], env["PATH_INFO"] = decision.path_split
        if decision.client_cert is not None:
            env["bastion.client_cert"] = decision.client_cert
        return self.app(env, start_response)
