"""A Flask app for in-process hosting tests (tests/test_inprocess.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from flask import Flask, Response, jsonify, redirect, request, stream_with_context, url_for

app = Flask(__name__)


@app.get("/info")
def info() -> Response:
    return jsonify(
        pid=os.getpid(),
        scheme=request.scheme,
        client=[request.remote_addr, int(request.environ["REMOTE_PORT"])],
        root_path=request.script_root,
        path=request.path,
        url_for=url_for("info", _external=True),
    )


@app.get("/redirect")
def to_info() -> Response:
    return redirect(url_for("info", _external=True))


@app.post("/upload")
def upload() -> Response:
    digest = hashlib.sha256()
    size = 0
    while chunk := request.stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return jsonify(size=size, sha256=digest.hexdigest())


@app.get("/download")
def download() -> Response:
    size = int(request.args.get("size", "1048576"))
    block = b"y" * 65536

    def body() -> Iterator[bytes]:
        left = size
        while left > 0:
            piece = block[:min(left, len(block))]
            left -= len(piece)
            yield piece

    return Response(stream_with_context(body()), mimetype="application/octet-stream",
                    headers={"Content-Length": str(size)})


@app.get("/boom")
def boom() -> Response:
    raise RuntimeError("boom from flask")


@app.get("/hello")
def hello() -> str:
    return "hello flask"
