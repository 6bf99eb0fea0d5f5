"""Free loopback ports for app processes.

A port is picked at random in 10000-48000 (outside the usual ephemeral range, so an
outgoing connection rarely holds it) and checked by binding it on 127.0.0.1 without
SO_REUSEADDR. The check and the app's own bind are separate moments, so the caller
treats "address already in use" at start as "try another port", not as a crash.
"""

from __future__ import annotations

import random
import socket

PORT_RANGE = (10000, 48000)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(avoid: set[int] | None = None, attempts: int = 200) -> int:
    """A random free loopback port in ``PORT_RANGE`` not in ``avoid``."""
    avoid = avoid or set()
    low, high = PORT_RANGE
    for _ in range(attempts):
        port = random.randint(low, high)
        if port not in avoid and port_is_free(port):
            return port
    raise OSError(f"no free loopback port found in {low}-{high} after {attempts} tries")
