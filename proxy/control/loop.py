"""The event loop every Bastion process runs on: uvloop's where it is installed (Linux,
a runtime dependency there), else asyncio's own."""

from __future__ import annotations

import asyncio


def install_uvloop() -> bool:
    """Use uvloop's event loop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
