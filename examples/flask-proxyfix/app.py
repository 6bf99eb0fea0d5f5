"""Flask behind Bastion WITHOUT the integration middleware: werkzeug's ProxyFix.

Bastion sets X-Forwarded-For/-Proto/-Host/-Port/-Prefix on every request it forwards
(it replaces whatever the client sent), so one trusted hop of each is right:
``ProxyFix(x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)``.

One difference to know: Bastion forwards the full original path (``/prefix/info``), while
ProxyFix's ``x_prefix`` only sets ``SCRIPT_NAME`` from ``X-Forwarded-Prefix`` (it assumes
the proxy stripped the prefix, as nginx ``proxy_pass http://app/;`` does). ``strip_prefix``
below takes the prefix off ``PATH_INFO`` so Flask's routes and ``url_for`` line up.

What you give up compared to the integration middleware: nothing checks that a request
came through Bastion, so any local process that can reach the app's loopback port can
claim any client address or scheme.
"""

from __future__ import annotations

from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from flask import Flask, jsonify, redirect, request, url_for
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return "hello from Flask (ProxyFix)\n"


@app.get("/info")
def info() -> Response:
    return jsonify(
        framework="flask-proxyfix",
        scheme=request.scheme,
        secure=request.is_secure,
        client=request.remote_addr,
        url=url_for("info", _external=True),
        path=request.path,
    )


@app.get("/go")
def go() -> Response:
    return redirect(url_for("info"))


def strip_prefix(wsgi_app: WSGIApplication) -> WSGIApplication:
    """Remove ``SCRIPT_NAME`` (set by ProxyFix from X-Forwarded-Prefix) from ``PATH_INFO``."""

    def wrapper(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        script = environ.get("SCRIPT_NAME", "")
        path = environ.get("PATH_INFO", "")
        if script and (path == script or path.startswith(script + "/")):
            environ["PATH_INFO"] = path[len(script):]
        return wsgi_app(environ, start_response)

    return wrapper


app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
    strip_prefix(app.wsgi_app), x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)
