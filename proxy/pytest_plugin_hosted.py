"""Import shim for in-process apps started by the ``bastion`` pytest fixture.

The fixture points every in-process app's ``app`` at an attribute of this module
(``bastion.proxy.pytest_plugin_hosted:app0``, ``app1``, ...) and writes what each one
stands for into the JSON file named by ``BASTION_TEST_HOSTED``: the real
``module:attribute`` and a flag file. Looking the attribute up (which Bastion's worker
does at every load) imports the real app, unless ``fail_next_import`` created the flag:
then the flag is deleted and the lookup raises ``ImportError`` once, so exactly one load
fails the way a broken app's would. Standard library only.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

ENV = "BASTION_TEST_HOSTED"


def _entries() -> dict[str, dict[str, str]]:
    path = os.environ.get(ENV)
    if not path:
        raise ImportError(f"{ENV} is not set: this module is for the bastion pytest fixture")
    with open(path, encoding="utf-8") as stream:
        data: dict[str, dict[str, str]] = json.load(stream)
    return data


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    entry = _entries().get(name)
    if entry is None:
        raise AttributeError(f"no in-process test app {name!r}")
    try:
        os.unlink(entry["flag"])
    except FileNotFoundError:
        pass
    else:
        raise ImportError(f"this load of {entry['target']} fails on purpose "
                          "(fail_next_import)")
    module_name, _, attribute = entry["target"].partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target
