"""A real WSGI app for the offload tests (compression, buffering), run under gunicorn.

The last path segment picks the answer; ``size`` (bytes) and ``gap`` (seconds) come from
the query string:

- ``/page``: text/html of ``size`` bytes with Content-Length (and ``etag`` when asked)
- ``/image``: image/png of ``size`` bytes
- ``/chunked``: text/html of ``size`` bytes without a length (chunked)
- ``/encoded``: a gzip body the app encoded itself (Content-Encoding: gzip)
- ``/notransform``: text/html with Cache-Control: no-transform
- ``/events``: text/event-stream, one event per ``gap`` seconds
- ``/stream``: text/html in three parts ``gap`` seconds apart, without a length
- ``/upload``: reads the whole body, answers its size and sha256
- ``/fast``: a tiny text/plain answer
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs


def html(size: int) -> bytes:
    """``size`` bytes of a product-list page (seeded words and numbers: the same bytes
    every time) that compresses about as real pages do (gzip: about a quarter)."""
    pages = _PAGES.get(size)
    if pages is not None:
        return pages
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
    page = bytes(out[:size])
    _PAGES[size] = page
    return page


_PAGES: dict[int, bytes] = {}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    name = path.rsplit("/", 1)[-1]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    size = int(query.get("size", ["4096"])[0])
    gap = float(query.get("gap", ["0.5"])[0])
    if name == "upload":
        digest = hashlib.sha256()
        total = 0
        stream = environ["wsgi.input"]
        while chunk := stream.read(65536):
            digest.update(chunk)
            total += len(chunk)
        body = json.dumps({"size": total, "sha256": digest.hexdigest()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if name == "fast":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return [b"fast"]
    if name == "image":
        start_response("200 OK", [("Content-Type", "image/png"),
                                  ("Content-Length", str(size))])
        return [b"\x89PNG" + b"\0" * (size - 4)]
    if name == "encoded":
        body = gzip.compress(html(size))
        start_response("200 OK", [("Content-Type", "text/html"), ("Content-Encoding", "gzip"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if name == "notransform":
        start_response("200 OK", [("Content-Type", "text/html"),
                                  ("Cache-Control", "public, no-transform"),
                                  ("Content-Length", str(size))])
        return [html(size)]
    if name == "chunked":
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        page = html(size)
        return [page[i:i + 65536] for i in range(0, len(page), 65536)]
    if name in ("stream", "events"):
        kind = "text/event-stream" if name == "events" else "text/html"

        def parts() -> Iterable[bytes]:
            for i in range(3):
                if i:
                    time.sleep(gap)
                yield (b"data: part %d\n\n" % i) if name == "events" \
                    else b"<p>part %d</p>" % i + b"<!-- padding -->" * 100
        start_response("200 OK", [("Content-Type", kind), ("Cache-Control", "no-cache")])
        return parts()
    headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(size))]
    if "etag" in query:
        headers.append(("ETag", '"v1"'))
    if "vary" in query:
        headers.append(("Vary", "Cookie"))
    start_response("200 OK", headers)
    return [html(size)]
