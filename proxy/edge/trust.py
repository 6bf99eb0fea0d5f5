"""Which peers are trusted proxies (their X-Forwarded-* chain is kept): pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class TrustedProxies:
    """A set of networks; ``contains`` tells whether an address lies in one."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def contains(self, address: str) -> bool:
        """True when ``address`` is inside a trusted network."""
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)
