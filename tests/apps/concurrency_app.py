"""An ASGI test app (run under uvicorn) that records how many requests it serves at once.

Every request counts as in flight from the moment it reaches the app until its response
is sent. Each process writes what it saw to ``$CONCURRENCY_DIR/<pid>.json`` when a request
arrives and after it is answered: ``{"pid", "max_in_flight", "served", "starts": [[n, monotonic], ...]}``, where
``n`` is the request's ``n`` query parameter and ``monotonic`` when it reached the app
(``time.monotonic()`` is system-wide, so the test can compare it with its own clock).
Route: any path; ``?s=SECONDS`` makes the request take that long, ``?n=ID`` names it.
No middleware: the test only needs the counts, and the file is the only output.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

STATE: dict[str, Any] = {"in_flight": 0, "max_in_flight": 0, "served": 0, "starts": []}


def _write() -> None:
    directory = os.environ.get("CONCURRENCY_DIR")
    if not directory:
        return
    data = {"pid": os.getpid(), "max_in_flight": STATE["max_in_flight"],
            "served": STATE["served"], "starts": STATE["starts"]}
    path = Path(directory) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # readers never see half a file


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    STATE["in_flight"] += 1
    STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
    try:
        query = parse_qs(scope["query_string"].decode())
        name = query.get("n", [""])[0]
        STATE["starts"].append([name, time.monotonic()])
        _write()  # on disk before the answer: a test reading after it sees this start
        await asyncio.sleep(float(query.get("s", ["0"])[0]))
        body = json.dumps({"pid": os.getpid(), "n": name,
                           "in_flight": STATE["in_flight"]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    finally:
        STATE["in_flight"] -= 1
        STATE["served"] += 1
        _write()
