"""A real WSGI test app (run under gunicorn) behind the integration middleware."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from integration_middleware import WSGIIntegrationMiddleware


def _json(start_response: Callable[..., Any], data: Any) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def raw_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    stream = environ["wsgi.input"]
    if path.endswith("/upload"):
        digest = hashlib.sha256()
        size = 0
        while chunk := stream.read(65536):
            digest.update(chunk)
            size += len(chunk)
        return _json(start_response, {"size": size, "sha256": digest.hexdigest()})
    if path.endswith("/download"):
        size = int(query.get("size", ["0"])[0])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])

        def blocks() -> Iterable[bytes]:
            sent = 0
            while sent < size:
                part = min(65536, size - sent)
                sent += part
                yield b"y" * part
        return blocks()
    if path.endswith("/slow"):
        time.sleep(float(query.get("s", ["1"])[0]))
    if path.endswith("/exit"):
        os._exit(7)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = stream.read(length) if length else b""
    headers = [[k[5:].replace("_", "-").title(), v] for k, v in environ.items()
               if k.startswith("HTTP_")]
    return _json(start_response, {
        "flavour": "wsgi",
        "scheme": environ["wsgi.url_scheme"],
        "client": environ.get("REMOTE_ADDR"),
        "script_name": environ.get("SCRIPT_NAME", ""),
        "path_info": path,
        "query": environ.get("QUERY_STRING", ""),
        "method": environ["REQUEST_METHOD"],
        "headers": headers,
        "body": body.decode("latin-1"),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "port": os.environ.get("BASTION_PORT"),
    })


app = WSGIIntegrationMiddleware(raw_app)
