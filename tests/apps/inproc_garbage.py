"""An in-process ASGI app that looks at its own worker's cyclic garbage (tests only).

``GET /gc/start`` collects and turns the cycle collector off, so that every reference
cycle made afterwards stays until ``GET /gc/count``, which collects with
``gc.DEBUG_SAVEALL`` and answers, as JSON, how many unreachable objects of each
``bastion`` class it found, then turns the collector back on. Any other path answers
``ok``; ``GET /gc/plant`` leaves one ``bastion`` object in a cycle on purpose (the
check's own check). Run in a Bastion worker (``hosting_model: in_process``), it shows whether
serving a request leaves cycles behind in the data plane.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any


def _count() -> dict[str, int]:
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                        if type(o).__module__.startswith("bastion"))
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    return dict(found)


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        raise RuntimeError("no lifespan")
    path = scope["path"]
    if path == "/gc/start":
        gc.collect()
        gc.disable()
        body = b"started"
    elif path == "/gc/plant":
        from bastion.proxy.edge.health import NodeState

        planted: list[Any] = [NodeState()]
        planted.append(planted)  # unreachable once this returns, freed only by a collection
        body = b"planted"
    elif path == "/gc/count":
        body = json.dumps(_count()).encode()
    else:
        body = b"ok"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
