"""Importing an in-process app inside a proxy worker.

The app's ``cwd`` goes first on ``sys.path`` and its ``environment`` into
``os.environ`` (in-process apps share their worker, so the configuration checker makes
sure they agree), then ``package.module:attribute`` is imported and looked up the way
uvicorn does. A module that fails half-way is not left in ``sys.modules`` by Python, so
a retry runs it again from the start. Failures are ``LoadFailed`` with a short reason and
the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

from bastion.module.spec import AppSpec


class LoadFailed(Exception):
    """The app could not be imported; ``reason`` is short, ``detail`` the traceback."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def prepare(spec: AppSpec) -> None:
    """Put the app's ``cwd`` on ``sys.path`` and its environment in ``os.environ``."""
    for name, value in spec.environment.items():
        os.environ[name] = value
    if spec.cwd and spec.cwd not in sys.path:
        sys.path.insert(0, spec.cwd)


def load(spec: AppSpec) -> Any:
    """Import ``spec.app`` and return the callable (``LoadFailed`` when it cannot)."""
    assert spec.app is not None
    prepare(spec)
    module_name, _, attribute = spec.app.partition(":")
    importlib.invalidate_caches()
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except BaseException as exc:  # noqa: BLE001 - SystemExit at import is a failure too
        if isinstance(exc, KeyboardInterrupt):
            raise
        detail = "".join(traceback.format_exception(exc)).rstrip()
        if isinstance(exc, AttributeError) and module_name in sys.modules:
            reason = f"{spec.app}: {exc}"
        else:
            reason = f"importing {spec.app} failed: {type(exc).__name__}: {exc}"
        raise LoadFailed(reason, detail) from None
    if not callable(target):
        raise LoadFailed(f"{spec.app} is a {type(target).__name__}, not an ASGI or WSGI "
                         "callable")
    return target
