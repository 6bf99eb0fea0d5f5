"""The compiled data plane (proxy/edge/native.py): the same modules run compiled or as
Python, ``BASTION_INTERPRETED=1`` forces the sources, and ``serve`` warns when the data
plane is not compiled. The HTTP/2 engine: libnghttp2 (``_ng2``) when built, ``h2`` when
``BASTION_H2_ENGINE=h2`` or when the extension is missing (with a warning at start)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trustme
from conftest import tls_config
from harness import BastionProcess, app_command, free_port, simple_config

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


# -- the HTTP/2 engine ---------------------------------------------------------------------

ENGINE_CODE = "import bastion.proxy.edge.native as n; print(n.h2_engine())"
NG2 = "bastion.proxy.edge._ng2"


def ng2_built() -> bool:
    return importlib.util.find_spec(NG2) is not None


def without_ng2(tmp_path: Path) -> dict[str, str]:
    """An environment in which the extension cannot be imported, as when it was never
    built (``sitecustomize`` runs first in every Python process of it)."""
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(
        f"import sys\nsys.modules[{NG2!r}] = None  # unimportable\n")
    return {"PYTHONPATH": str(tmp_path / "site")}


def engine_in_child(tmp_path: Path, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k != "BASTION_H2_ENGINE"}
    done = subprocess.run([sys.executable, "-c", ENGINE_CODE], cwd=str(REPO),
                          env={**full, **env}, capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.strip()


def test_h2_engine_is_native_when_built_and_h2_when_asked_or_missing(tmp_path: Path) -> None:
    if not ng2_built():
        pytest.skip("the native HTTP/2 engine is not built here")
    assert engine_in_child(tmp_path) == "ng2"
    assert engine_in_child(tmp_path, BASTION_H2_ENGINE="ng2") == "ng2"
    assert engine_in_child(tmp_path, BASTION_H2_ENGINE="h2") == "h2"
    assert engine_in_child(tmp_path, **without_ng2(tmp_path)) == "h2"


def test_ng2_builds_from_its_source(tmp_path: Path) -> None:
    """``build_ng2`` compiles ``_ng2.c`` (in well under a few seconds) into an extension
    that imports; here into a copy of the package, so the checkout's is left alone."""
    if not (shutil.which("gcc") and native.NGHTTP2_HEADER.is_file()):
        pytest.skip("gcc or libnghttp2-dev is missing")
    copy = tmp_path / "edge"
    copy.mkdir()
    shutil.copy(REPO / "proxy" / "edge" / "_ng2.c", copy / "_ng2.c")
    script = ("import sys, pathlib, bastion.proxy.edge.native as n; "
              "n.HERE = pathlib.Path(sys.argv[1]); sys.exit(n.build_ng2())")
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", script, str(copy)], cwd=str(REPO), check=True,
                   timeout=120)
    assert time.monotonic() - started < 30
    [built] = list(copy.glob("_ng2.*.so"))
    probe = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location("
             "'_ng2', sys.argv[1]); m = importlib.util.module_from_spec(spec); "
             "spec.loader.exec_module(m); print(m.NGHTTP2_VERSION)")
    done = subprocess.run([sys.executable, "-c", probe, str(built)], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip().count(".") == 2  # libnghttp2's version, e.g. 1.52.0


def h2_status(port: int, ca: trustme.CA) -> int:
    """One HTTP/2 GET over TLS; the response status."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                              (":authority", "127.0.0.1")], end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "closed before the answer"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
            sock.sendall(conn.data_to_send())


def test_serve_names_its_h2_engine_and_warns_on_fallback(tmp_path: Path) -> None:
    ca = trustme.CA()
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}", "tls": tls_config(ca, tmp_path)}],
        "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app"),
                          "hosts": ["127.0.0.1"]}},
    }
    cases = [("missing", without_ng2(tmp_path), "warning", "HTTP/2 engine: h2, the pure-Python")]
    if ng2_built():
        cases += [("asked", {"BASTION_H2_ENGINE": "h2"}, "info", "HTTP/2 engine: h2 (BASTION"),
                  ("native", {}, "info", "HTTP/2 engine: ng2 (libnghttp2 ")]
    for name, env, level, line in cases:
        (tmp_path / name).mkdir()
        proc = BastionProcess(tmp_path / name, config, env=env, tls_ca=ca).start()
        try:
            assert h2_status(proc.port(), ca) == 200
            log = proc.log()
            assert line in log, (name, log)
            assert ("WARNING" in log.split(line)[0].splitlines()[-1]) == (level == "warning")
            assert log.count("HTTP/2 engine:") == 1
        finally:
            proc.stop()
