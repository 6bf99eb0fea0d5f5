"""Bastion's version, as installed (``bastion --version``, ``status``, metrics)."""

from __future__ import annotations

from functools import cache


@cache
def version() -> str:
    """The installed package's version; ``unknown`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("bastion")
    except PackageNotFoundError:
        return "unknown"
