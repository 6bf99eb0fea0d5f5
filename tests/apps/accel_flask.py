"""A Flask app that hands its downloads to the edge with ``X-Accel-Redirect``.

    gunicorn accel_flask:app

``/fl/file/NAME`` answers ``X-Accel-Redirect: /protected/NAME`` with its own
``Content-Type`` and ``Cache-Control``, and a body that must never reach the client.
"""

from __future__ import annotations

from urllib.parse import quote

from flask import Flask, Response

app = Flask(__name__)


@app.route("/fl/file/<path:name>", methods=["GET", "HEAD", "POST"])
def download(name: str) -> Response:
    response = Response("the app's own body, never sent", mimetype="application/x-report")
    response.headers["X-Accel-Redirect"] = "/protected/" + quote(name)
    response.headers["Cache-Control"] = "private, max-age=5"
    return response
