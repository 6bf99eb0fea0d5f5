"""The compiled data plane (proxy/edge/native.py): the same modules run compiled or as
Python, ``BASTION_INTERPRETED=1`` forces the sources, and ``serve`` warns when the data
plane is not compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import BastionProcess, app_command, simple_config

from bastion.proxy.edge import native

REPO = Path(__file__).resolve().parent.parent


def interpreted_in_child(cwd: Path = REPO, **env: str) -> list[str]:
    code = "import bastion.proxy.edge.native as n; print(','.join(n.interpreted()))"
    full = {k: v for k, v in os.environ.items() if k != "BASTION_INTERPRETED"}
    done = subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env={**full, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return [n for n in done.stdout.strip().split(",") if n]


def test_interpreted_flag_loads_every_module_from_its_source() -> None:
    assert interpreted_in_child(BASTION_INTERPRETED="1") == list(native.MODULES)


def test_built_modules_load_as_extensions(tmp_path: Path) -> None:
    if native.stale():
        pytest.skip("the data plane is not compiled here (no compiler at set-up)")
    assert interpreted_in_child() == []
    # From anywhere, not only the checkout's root (their shared runtime is in the package).
    assert interpreted_in_child(cwd=tmp_path) == []


def test_serve_warns_only_when_the_data_plane_is_not_compiled(tmp_path: Path) -> None:
    config = simple_config({"echo": {"command": app_command("uvicorn", "echo_asgi:app")}})
    (tmp_path / "plain").mkdir()
    (tmp_path / "built").mkdir()
    plain = BastionProcess(tmp_path / "plain", config, env={"BASTION_INTERPRETED": "1"})
    plain.start()
    try:
        assert plain.get("/", host="h").status == 200
        assert "the data plane runs as plain Python" in plain.log()
    finally:
        plain.stop()
    if native.stale():
        return
    built = BastionProcess(tmp_path / "built", config)
    built.start()
    try:
        assert built.get("/", host="h").status == 200
        assert "plain Python" not in built.log()
    finally:
        built.stop()
