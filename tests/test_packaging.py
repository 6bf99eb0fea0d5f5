"""What installing Bastion puts into an environment: its wheel adds only the top-level
packages ``bastion`` and ``integration_middleware`` (nothing named ``proxy`` or
``module`` to shadow an app's own), and the middleware's own wheel installs and imports
with nothing else. Real wheels, built from the checkout, installed into fresh virtual
environments."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def build_wheel(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out),
         str(source)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "Could not find a version" in done.stderr:
        pytest.skip("no package index to build a wheel with here")
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def fresh_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(where)
    return where / "bin" / "python"


def top_level(python: Path) -> set[str]:
    code = ("import sysconfig, os; p = sysconfig.get_paths()['purelib']; "
            "print('\\n'.join(sorted(os.listdir(p))))")
    names = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    return {n for n in names if not n.endswith((".dist-info", ".pth")) and n != "__pycache__"}


def test_bastion_wheel_adds_only_bastion_and_the_middleware(tmp_path: Path) -> None:
    wheel = build_wheel(REPO, tmp_path / "dist")
    python = fresh_venv(tmp_path / "venv")
    before = top_level(python)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, timeout=300)
    added = top_level(python) - before
    assert added == {"bastion", "integration_middleware"}, added
    files = subprocess.run(
        [str(python), "-c", "import bastion, os; print(os.listdir(os.path.dirname("
         "bastion.__file__)))"], capture_output=True, text=True, check=True).stdout
    assert "proxy" in files and "module" in files


def test_middleware_wheel_installs_and_imports_alone(tmp_path: Path) -> None:
    # Built from a copy: the build leaves its scratch folders next to the sources.
    source = tmp_path / "src" / "integration_middleware"
    shutil.copytree(REPO / "integration_middleware", source,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    wheel = build_wheel(source, tmp_path / "dist")
    python = fresh_venv(tmp_path / "venv")
    before = top_level(python)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True,
                   timeout=300)
    assert top_level(python) - before == {"integration_middleware"}
    done = subprocess.run(
        [str(python), "-c", "import integration_middleware as m, sys; "
         "print(m.IntegrationMiddleware.__name__, m.WSGIIntegrationMiddleware.__name__, "
         "'aiohttp' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["IntegrationMiddleware", "WSGIIntegrationMiddleware", "False"]
