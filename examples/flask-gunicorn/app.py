"""Flask under gunicorn behind Bastion (examples/flask-gunicorn).

Bastion runs ``gunicorn app:app --bind 127.0.0.1:{port}`` in this directory, mounted at
``/prefix``. The integration middleware wraps ``app.wsgi_app`` (the Flask idiom for WSGI
middleware, so ``app`` stays a Flask object and ``flask run`` still works):
``request.is_secure``, ``request.remote_addr`` and ``url_for(..., _external=True)`` are
right, and routes are written without the prefix.
"""

from __future__ import annotations

from flask import Flask, jsonify, redirect, request, url_for
from werkzeug.wrappers import Response

from integration_middleware import WSGIIntegrationMiddleware

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return "hello from Flask\n"


@app.get("/info")
def info() -> Response:
    return jsonify(
        framework="flask",
        scheme=request.scheme,
        secure=request.is_secure,
        client=request.remote_addr,
        url=url_for("info", _external=True),
        path=request.path,
    )


@app.get("/go")
def go() -> Response:
    return redirect(url_for("info"))


app.wsgi_app = WSGIIntegrationMiddleware(app.wsgi_app)  # type: ignore[method-assign]
