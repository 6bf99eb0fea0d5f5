"""The benchmark's synchronous app (gunicorn sync worker), and the HTML page of the gzip cell.

    gunicorn --chdir bench wsgi_app:app --workers 1 --bind 127.0.0.1:PORT

``GET /fast``: 4 bytes at once. ``POST /upload``: reads the whole body, answers its size.
``GET /download?size=N``: N bytes (application/octet-stream, Content-Length N).
``GET /page``: ``page()``, a 100 KiB text/html product list. A sync worker serves one
request at a time from its first to its last byte, so a slow client holds it, unless a
buffering proxy is in front (the ``slow`` cell of ``bench/matrix.py``). ``bench/app.py``
serves the same page for the ``gzip`` cell; ``bench/gzip_levels.py`` measures on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

PAGE_SIZE = 100 * 1024


def page(size: int = PAGE_SIZE) -> bytes:
    """``size`` bytes of a product-list page of seeded words and numbers (the same bytes
    every time), which gzip compresses to about a quarter, as real pages."""
    rng = random.Random(size)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(400)]
    out = bytearray(b"<!doctype html><html><head><title>Shop</title></head><body><ul>\n")
    n = 0
    while len(out) < size:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        out += (f'<li class="item" id="p{rng.randint(1, 99999)}"><a href="/p/{n}">'
                f'{text.title()}</a> <span class="price">{rng.randint(1, 999)}.'
                f'{rng.randint(0, 99):02d}</span></li>\n').encode()
        n += 1
    return bytes(out[:size])


PAGE = page()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/upload":
        stream = environ["wsgi.input"]
        total = 0
        while chunk := stream.read(65536):
            total += len(chunk)
        body = b"%d\n" % total
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/download":
        size = int(parse_qs(environ.get("QUERY_STRING", "")).get("size", ["0"])[0])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        return [b"d" * size]
    if path == "/page":
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(PAGE)))])
        return [PAGE]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return [b"fast"]
