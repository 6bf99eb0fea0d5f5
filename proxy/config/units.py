"""Durations and sizes as written in Bastion's configuration (docs/configuration.md).

A duration is a number of seconds (``30``, ``1.5``) or a string of one or more
number-and-unit parts: ``"500ms"``, ``"90s"``, ``"2m"``, ``"29h"``, ``"1d"``, ``"1h30m"``;
a plain numeric string (``"30"``) is seconds too. A size is a number of bytes or a string
with a binary unit: ``"64k"`` (65536), ``"30m"``, ``"1g"``, ``"2t"``, case-insensitive, with
an optional ``b`` (``"64kb"``, ``"512b"``). Neither may be negative.

Both functions raise ``ValueError`` with a message meant for the person editing the file.
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS: dict[str, int] = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+|{_NUMBER}")
_SIZE = re.compile(rf"({_NUMBER})([kmgt]?)b?", re.IGNORECASE)

_DURATION_HINT = "use seconds (e.g. 30) or a number with a unit: 500ms, 90s, 2m, 29h, 1d"
_SIZE_HINT = "use bytes (e.g. 512) or a number with a unit: 64k, 30m, 1g"


def parse_duration(value: object) -> float:
    """Return ``value`` as a number of seconds (``"2m"`` -> 120.0, ``"500ms"`` -> 0.5)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration, got {_show(value)}; {_DURATION_HINT}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} must not be negative")
        if not _DURATION.fullmatch(text):
            raise ValueError(f"invalid duration {value!r}; {_DURATION_HINT}")
        parts = _DURATION_PART.findall(text)
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts) if parts else float(text)
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} must be a finite number")
    if seconds < 0:
        raise ValueError(f"duration {value!r} must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """Return ``value`` as a number of bytes (``"64k"`` -> 65536, ``"1g"`` -> 1073741824)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a size, got {_show(value)}; {_SIZE_HINT}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"size {value!r} must be a whole number of bytes")
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value!r} must not be negative")
        return value
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"size {value!r} must not be negative")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid size {value!r}; {_SIZE_HINT}")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[unit.lower()]
    if not size.is_integer():
        raise ValueError(f"size {value!r} must be a whole number of bytes")
    return int(size)


def _show(value: object) -> str:
    """``value`` the way the YAML file would spell it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)
