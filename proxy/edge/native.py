"""The compiled data plane: the hottest modules of ``proxy/edge`` built with mypyc.

Theory of operation
-------------------
The per-request path (``h1``, ``flow``, ``upstream``, ``strict``, ``codec``,
``headers``, ``routing``, ``metrics``, ``site``, ``endpoints``, ``compress`` and
``h1state``, for HTTP/2 ``h2translate``,
``h2common`` and ``h2native``, for static files ``staticrules`` and ``static``, for
in-process apps ``hosting.host``, ``hosting.scope`` and ``hosting.asgi``) is ordinary,
``mypy --strict`` clean Python. mypyc compiles
those modules to C extensions that sit next to their sources; Python imports an
extension before a source of the same name, so nothing else changes. Measured on the
benchmark machine (``bench/``; ``workers: 1``, ``wrk -c32``): 59 us of CPU per request
as Python, 34 us compiled. A module of a subpackage is named by its path below
``proxy/edge`` (``hosting.asgi``); its extension sits next to its source too.

``./run`` builds them (``python -m bastion.proxy.edge.native``) whenever a source is
newer than its extension; the same command builds them in an installed Bastion (with
mypy, gcc and the Python headers there). Without them the same modules run as Python
and ``serve`` logs a warning (``warn_if_interpreted``).
``BASTION_INTERPRETED=1`` in the environment makes a process load the sources even when
the extensions are built (``prefer_sources``): the tests run both ways.

The same step builds the native HTTP/2 engine, ``_ng2`` (``_ng2.c``: a small C extension
over libnghttp2, compiled by gcc in well under a second; ``build_ng2``). Which HTTP/2
engine a process uses is decided here, once (``h2_engine``): ``ng2`` when the extension
imports, else the pure-Python ``h2`` library, with one warning at start
(``report_h2_engine``). ``BASTION_H2_ENGINE=h2`` forces the ``h2`` engine (tests run
both; the benchmark compares them).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

MODULES = ("codec", "strict", "headers", "upstream", "flow", "h1", "h2translate", "h2common",
           "h2native", "staticrules", "static", "hosting.host", "hosting.scope",
           "hosting.asgi", "routing", "metrics", "site", "endpoints", "compress", "h1state")
PACKAGE = "bastion.proxy.edge"
HERE = Path(__file__).resolve().parent  # proxy/edge in the checkout
NG2 = "_ng2"
H2_ENGINE_ENV = "BASTION_H2_ENGINE"
NGHTTP2_HEADER = Path("/usr/include/nghttp2/nghttp2.h")


def _source(name: str) -> Path:
    """The source of module ``name`` of ``MODULES`` (``hosting.asgi``: hosting/asgi.py)."""
    return HERE.joinpath(*name.split(".")).with_suffix(".py")


def interpreted() -> list[str]:
    """The modules of ``MODULES`` that run (or would run) as Python in this process.

    Found, not imported: ``h2native`` imports only where the HTTP/2 extension is built."""
    slow = []
    for name in MODULES:
        spec = importlib.util.find_spec(f"{PACKAGE}.{name}")
        if spec is None or str(spec.origin or "").endswith(".py"):
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
        if not fullname.startswith(PACKAGE + "."):
            return None
        name = fullname[len(PACKAGE) + 1:]
        if name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(name))


def prefer_sources() -> None:
    """From now on, this process loads ``MODULES`` from their sources."""
    if not any(isinstance(finder, _SourcesFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())


def _extensions(name: str) -> list[Path]:
    source = _source(name)
    return sorted(source.parent.glob(f"{source.stem}.*.so"))


def stale() -> bool:
    """Whether any module's extension is missing or older than its source."""
    for name in MODULES:
        built = _extensions(name)
        if not built or built[0].stat().st_mtime < _source(name).stat().st_mtime:
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
        edge = Path("bastion", "proxy", "edge")
        sources = [str(edge.joinpath(*name.split(".")).with_suffix(".py")) for name in MODULES]
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
            built = Path(scratch, edge)
            for so in built.glob("**/*.so"):
                target = HERE / so.relative_to(built)
                shutil.move(str(so), target)
    return done.returncode


def ng2_stale() -> bool:
    """Whether the HTTP/2 extension is missing or older than its source."""
    built = _extensions(NG2)
    return not built or built[0].stat().st_mtime < (HERE / f"{NG2}.c").stat().st_mtime


def _nghttp2_features() -> list[str]:
    """``-D`` flags for what this libnghttp2's header declares beyond what ``_ng2.c``
    needs (newer versions, or older ones with a distribution's security update)."""
    try:
        done = subprocess.run(["gcc", "-E", "-x", "c", "-"], input="#include <nghttp2/nghttp2.h>\n",
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    flags = []
    if "nghttp2_option_set_max_continuations" in done.stdout:
        flags.append("-DNG2_HAVE_MAX_CONTINUATIONS")
    return flags


def build_ng2() -> int:
    """Compile ``_ng2.c`` next to it (gcc, the Python headers, libnghttp2-dev); 0 on
    success. A failed build leaves no extension: Bastion then speaks HTTP/2 with ``h2``."""
    for old in _extensions(NG2):
        old.unlink()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory(prefix="bastion-ng2-") as scratch:
        target = Path(scratch, NG2 + suffix)
        done = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", f"-I{include}",
                               *_nghttp2_features(), str(HERE / f"{NG2}.c"), "-lnghttp2",
                               "-o", str(target)], check=False)
        if done.returncode == 0:
            shutil.move(str(target), HERE / target.name)
    return done.returncode


@functools.cache
def h2_engine() -> str:
    """``"ng2"`` (libnghttp2, compiled) or ``"h2"`` (the pure-Python library): the
    HTTP/2 engine of this process. ``BASTION_H2_ENGINE=h2`` forces ``h2``."""
    if os.environ.get(H2_ENGINE_ENV, "").strip().lower() == "h2":
        return "h2"
    try:
        importlib.import_module(f"{PACKAGE}.{NG2}")
    except ImportError:
        return "h2"
    return "ng2"


def report_h2_engine(log: logging.Logger, http2: bool) -> None:
    """At start, when HTTP/2 is served (``http2``): which engine, and a warning when it
    is the slower ``h2`` because the native one is not built."""
    if not http2:
        return
    if h2_engine() == "ng2":
        from . import _ng2
        log.info("HTTP/2 engine: ng2 (libnghttp2 %s)", _ng2.NGHTTP2_VERSION)
    elif os.environ.get(H2_ENGINE_ENV, "").strip().lower() == "h2":
        log.info("HTTP/2 engine: h2 (%s=h2)", H2_ENGINE_ENV)
    else:
        log.warning("HTTP/2 engine: h2, the pure-Python library: it works, at several times "
                    "the CPU per request; the native engine (libnghttp2) is not built: "
                    "`python -m bastion.proxy.edge.native` builds it (needs gcc, the Python "
                    "headers and libnghttp2-dev)")


def main() -> int:
    """``python -m bastion.proxy.edge.native [--if-stale]``: build the compiled data
    plane (mypyc) and the HTTP/2 engine; 1 when either could not be built."""
    only_stale = "--if-stale" in sys.argv[1:]
    status = 0
    if not only_stale or stale():
        status |= build()
    if not only_stale or ng2_stale():
        if build_ng2() != 0:
            print("native: the HTTP/2 engine (_ng2) could not be built; HTTP/2 runs on h2",
                  file=sys.stderr)
            status |= 1
    return status


if __name__ == "__main__":
    sys.exit(main())
