"""The demo's WSGI app, wrapped in the integration middleware, on a threaded wsgiref server.

``python -m bastion.proxy.demo.wsgi_app --port N`` serves it on 127.0.0.1:N (the standard library
only, so the demo needs nothing beyond Bastion's own dependencies).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from integration_middleware import WSGIIntegrationMiddleware

from .page import render


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = render(
        "WSGI",
        {
            "scheme": str(environ.get("wsgi.url_scheme")),
            "client": str(environ.get("REMOTE_ADDR")),
            "root_path (SCRIPT_NAME)": str(environ.get("SCRIPT_NAME", "")),
            "path (PATH_INFO)": str(environ.get("PATH_INFO", "")),
            "query": str(environ.get("QUERY_STRING", "")),
        },
    )
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]


app = WSGIIntegrationMiddleware(_app)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass


def main() -> None:
    """Serve the demo WSGI app on 127.0.0.1:PORT."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    with make_server("127.0.0.1", port, app, server_class=_ThreadingServer,
                     handler_class=_QuietHandler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
