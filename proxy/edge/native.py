"""The compiled data plane: the hottest modules of ``proxy/edge`` built with mypyc.

Theory of operation
-------------------
The per-request path (``h1``, ``flow``, ``upstream``, ``strict``, ``codec``,
``headers``) is ordinary, ``mypy --strict`` clean Python. mypyc compiles
those modules to C extensions that sit next to their sources; Python imports an
extension before a source of the same name, so nothing else changes. Measured on the
benchmark machine (``bench/``; ``workers: 1``, ``wrk -c32``): 59 us of CPU per request
as Python, 34 us compiled.

``./run`` builds them (``python -m bastion.proxy.edge.native``) whenever a source is
newer than its extension; the same command builds them in an installed Bastion (with
mypy, gcc and the Python headers there). Without them the same modules run as Python
and ``serve`` logs a warning (``warn_if_interpreted``).
``BASTION_INTERPRETED=1`` in the environment makes a process load the sources even when
the extensions are built (``prefer_sources``): the tests run both ways.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = ("codec", "strict", "headers", "upstream", "flow", "h1")
PACKAGE = "bastion.proxy.edge"
HERE = Path(__file__).resolve().parent  # proxy/edge in the checkout


def interpreted() -> list[str]:
    """The modules of ``MODULES`` that run as Python in this process."""
    slow = []
    for name in MODULES:
        module = importlib.import_module(f"{PACKAGE}.{name}")
        if str(getattr(module, "__file__", "")).endswith(".py"):
            slow.append(name)
    return slow


def warn_if_interpreted(log: logging.Logger) -> None:
    """One warning when the data plane is not compiled."""
    slow = interpreted()
    if slow:
        log.warning("the data plane runs as plain Python (%s not compiled): it works, at about "
                    "twice the CPU per request; `python -m bastion.proxy.edge.native` builds "
                    "it (needs mypy, gcc and the Python headers)", ", ".join(slow))


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds the Python source of a compiled module of ``MODULES`` before its extension."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, HERE / f"{name}.py")


def prefer_sources() -> None:
    """From now on, this process loads ``MODULES`` from their sources."""
    if not any(isinstance(finder, _SourcesFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())


def _extensions(name: str) -> list[Path]:
    return sorted(HERE.glob(f"{name}.*.so"))


def stale() -> bool:
    """Whether any module's extension is missing or older than its source."""
    for name in MODULES:
        built = _extensions(name)
        if not built or built[0].stat().st_mtime < (HERE / f"{name}.py").stat().st_mtime:
            return True
    return False


def _root() -> Path | None:
    """The folder that holds ``bastion/proxy/edge``: a checkout (whose ``bastion/`` links
    to ``proxy/``) or the site-packages Bastion is installed in."""
    for root in (HERE.parent.parent, HERE.parents[2]):
        if (root / "bastion" / "proxy" / "edge" / "native.py").is_file():
            return root
    return None


def build() -> int:
    """Compile ``MODULES`` next to their sources; 0 on success.

    The compiler works on a copy of the ``bastion`` package in a scratch folder (in an
    installed Bastion, site-packages must not be mypy's own tree: every module there
    would pass for the project's), and the extensions are then moved next to the
    sources."""
    root = _root()
    if root is None:
        print("native: bastion/proxy/edge not found beside this file", file=sys.stderr)
        return 1
    for old in [*(so for name in MODULES for so in _extensions(name)),
                *HERE.glob("native_rt__mypyc.*.so")]:
        old.unlink()  # ours only: never another package's runtime
    with tempfile.TemporaryDirectory(prefix="bastion-native-") as scratch:
        shutil.copytree(root / "bastion", Path(scratch, "bastion"),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        # Stub packages are test dependencies: what they type is never compiled here.
        Path(scratch, "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
        sources = [f"bastion/proxy/edge/{name}.py" for name in MODULES]
        # One extension per module, and their shared runtime inside this package (the
        # group name), so that they import from anywhere.
        script = (
            "from setuptools import setup; from mypyc.build import mypycify; "
            f"setup(name='bastion-native', ext_modules=mypycify({sources!r}, opt_level='3', "
            f"group_name='{PACKAGE}.native_rt'), "
            "script_args=['build_ext', '--inplace'])"
        )
        done = subprocess.run([sys.executable, "-c", script], cwd=scratch,
                              stdout=subprocess.DEVNULL)
        if done.returncode == 0:
            for so in Path(scratch, *PACKAGE.split(".")).glob("*.so"):
                shutil.move(str(so), HERE / so.name)
    return done.returncode


def main() -> int:
    """``python -m bastion.proxy.edge.native [--if-stale]``."""
    if "--if-stale" in sys.argv[1:] and not stale():
        return 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
