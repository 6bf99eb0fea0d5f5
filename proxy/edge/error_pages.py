"""Small HTML error pages. Internals (exit status, output) only with detailed_errors."""

from __future__ import annotations

import html

from .errors import ProxyError

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{status} {title}</title></head>
<body><h1>{status} {title}</h1>
<p>{message}</p>{detail}
<hr><address>bastion</address></body></html>
"""


def render(error: ProxyError, detailed: bool) -> str:
    """The HTML body for ``error``."""
    if error.body is not None:
        return error.body
    message = error.message if error.app or error.status < 500 else error.title
    detail = ""
    if detailed and error.detail:
        detail = f"\n<pre>{html.escape(error.detail)}</pre>"
    return _PAGE.format(
        status=error.status,
        title=html.escape(error.title),
        message=html.escape(message),
        detail=detail,
    )
