"""The ``static`` section: typed locations, FILE:LINE problems, routing with the apps,
``bastion config`` and ``bastion check``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bastion.proxy.config.dump import dump
from bastion.proxy.config.load import ConfigError, load_config
from bastion.proxy.config.model import StaticLocation
from bastion.proxy.edge.routing import Router

HEAD = """\
listen:
  - address: "127.0.0.1:8080"
apps:
  shop:
    path: /
    command: ["python", "app.py"]
  api:
    hosts: ["api.example.com"]
    path: /v1
    command: ["python", "app.py"]
"""


def write(tmp_path: Path, static: str) -> Path:
    (tmp_path / "files").mkdir(exist_ok=True)
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "bastion.yaml"
    path.write_text(HEAD + static)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return [str(problem) for problem in caught.value.problems]


def test_full_location(tmp_path: Path) -> None:
    path = write(tmp_path, """\
static:
  assets:
    hosts: ["Shop.Example.com"]
    path: /static/
    root: files
    index: index.html
    precompressed: true
    cache_control: "public, max-age=31536000, immutable"
  protected:
    path: /protected
    root: files
    internal: true
""")
    config = load_config(str(path))
    assets, protected = config.statics
    assert assets == StaticLocation(
        name="assets", root=str((tmp_path / "files").resolve()), hosts=("shop.example.com",),
        path="/static", index="index.html", precompressed=True,
        cache_control="public, max-age=31536000, immutable")
    assert protected.internal and protected.index is None and not protected.precompressed
    # Routed together with the apps: the longest path base wins.
    router = Router(config.all_routes)
    found = router.match("shop.example.com", "/static/a.css")
    assert found is not None and found.static == assets
    found = router.match("other.example.com", "/static/a.css")
    assert found is not None and found.app == "shop" and found.static is None
    found = router.match("x", "/protected/f.pdf")
    assert found is not None and found.static == protected
    assert len(config.routes) == 2  # the apps' own routes are unchanged


def test_dump_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, """\
static:
  assets:
    path: /static
    root: files
""")
    config = load_config(str(path))
    text = dump(config, 1)
    data = yaml.safe_load(text)
    assert data["static"]["assets"] == {
        "hosts": [], "path": "/static", "root": str((tmp_path / "files").resolve()),
        "index": None, "precompressed": False, "cache_control": None, "internal": False}
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert load_config(str(again)).statics == config.statics


@pytest.mark.parametrize(("static", "line", "text"), [
    ("static:\n  assets:\n    path: /static\n", 12, "static.assets.root is required"),
    ("static:\n  assets:\n    path: /static\n    root: missing\n", 14, "does not exist"),
    ("static:\n  assets:\n    path: /static\n    root: a-file\n", 14, "is not a directory"),
    ("static:\n  assets:\n    path: /\n    root: files\n", 13,
     "same path '/' as app 'shop'"),
    ("static:\n  assets:\n    hosts: [api.example.com]\n    path: /v1\n    root: files\n",
     14, "same host 'api.example.com' and path '/v1' as app 'api'"),
    ("static:\n  assets:\n    path: /s\n    root: files\n    precompresed: true\n", 15,
     "unknown key 'precompresed' in static.assets; did you mean 'precompressed'?"),
    ("static:\n  assets:\n    path: static\n    root: files\n", 13, 'must start with "/"'),
    ("static:\n  assets:\n    path: /s\n    root: files\n    index: a/b.html\n", 15,
     "must be a file name"),
    ("static:\n  assets:\n    path: /s\n    root: files\n    internal: maybe\n", 15,
     "must be true or false"),
    ("static:\n  assets:\n    path: /s\n    root: files\n    cache_control: \"a\\nb\"\n", 15,
     "header value on one line"),
    ("static:\n  a:\n    path: /s\n    root: files\n  b:\n    path: /s\n    root: files\n",
     16, "same path '/s' as static location 'a'"),
    ("static: [x]\n", 11, "static must be a mapping"),
])
def test_problems(tmp_path: Path, static: str, line: int, text: str) -> None:
    path = write(tmp_path, static)
    found = problems(path)
    assert any(p.startswith(f"{path}:{line}: ") and text in p for p in found), found


def test_other_host_same_path_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, """\
static:
  assets:
    hosts: ["cdn.example.com"]
    path: /
    root: files
""")
    assert load_config(str(path)).statics[0].hosts == ("cdn.example.com",)


def test_bastion_check_reports_file_line(tmp_path: Path) -> None:
    path = write(tmp_path, "static:\n  assets:\n    path: /static\n    root: nowhere\n")
    done = subprocess.run([sys.executable, "-m", "bastion", "check", "--no-files", "-c",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # --no-files: the directory is not looked at
    done = subprocess.run([sys.executable, "-m", "bastion", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"{path}:14: static.assets.root: directory" in done.stderr
