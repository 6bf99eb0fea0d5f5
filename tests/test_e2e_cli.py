"""End to end: the ``bastion`` command line, run as ``python -m bastion`` in real processes.

``check`` on broken and valid files, ``serve`` on a port already bound, the built-in demo
(``serve`` with no config, on 127.0.0.1:8080 / :8443; skipped when those are taken),
``dev-cert`` and ``status --json`` against a running Bastion.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import REPO, BastionProcess, app_command, free_port, pid_alive, wait_until

PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<message>.+)$")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO) ")


def bastion_cli(*args: str, env: dict[str, str] | None = None,
                timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bastion ARGS`` to completion (bounded)."""
    full_env = {k: v for k, v in os.environ.items() if k != "BASTION_CONFIG"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bastion", *args], cwd=str(REPO), env=full_env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def write(tmp: Path, text: str, name: str = "bastion.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# -- bastion check -------------------------------------------------------------------------

# Each case: the file (line numbers count from its first line) and the (line, pattern) of
# every problem it must report.
BROKEN = {
    "unknown-key": (
        """
        listen:
          - address: "127.0.0.1:18080"
        pools:
          web:
            idle_timout: 5m
        apps:
          shop:
            pool: web
            command: ["python", "app.py"]
        """,
        [(5, r"unknown key 'idle_timout'.*did you mean 'idle_timeout'\?")],
    ),
    "bad-duration": (
        """
        listen:
          - address: "127.0.0.1:18080"
        apps:
          shop:
            command: ["python", "app.py"]
            request_timeout: 10 parsecs
        """,
        [(6, r"request_timeout.*'10 parsecs'")],
    ),
    "unknown-pool": (
        """
        listen:
          - address: "127.0.0.1:18080"
        pools:
          web: {}
        apps:
          shop:
            command: ["python", "app.py"]
            pool: webb
        """,
        [(8, r"unknown pool 'webb'.*did you mean 'web'\?")],
    ),
    "command-string": (
        """
        listen:
          - address: "127.0.0.1:18080"
        apps:
          shop:
            command: gunicorn shop.wsgi
        """,
        [(5, r"command must be an argv list")],
    ),
    "duplicate-host-path": (
        """
        listen:
          - address: "127.0.0.1:18080"
        apps:
          blog:
            command: ["python", "app.py"]
            hosts: ["a.example.com"]
            path: /blog
          blog2:
            command: ["python", "app.py"]
            hosts: ["a.example.com"]
            path: /blog
        """,
        [(8, r"'blog2'.*same host 'a.example.com' and path '/blog'.*'blog'")],
    ),
    "missing-cert": (
        """
        listen:
          - address: "127.0.0.1:18443"
            tls:
              certificates:
                - cert: /nonexistent/bastion-test/site.pem
                  key: /nonexistent/bastion-test/site.key
        apps:
          shop:
            command: ["python", "app.py"]
        """,
        [(5, r"/nonexistent/bastion-test/site.pem does not exist"),
         (6, r"/nonexistent/bastion-test/site.key does not exist")],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_reports_file_line_and_exits_1(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    path = write(tmp_path, text)
    result = bastion_cli("check", "-c", str(path))
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.stderr
    problems = []
    for line in lines:
        match = PROBLEM.match(line)
        assert match, f"not FILE:LINE: message: {line!r}"
        assert match["file"] == str(path)
        problems.append((int(match["line"]), match["message"]))
    for line_no, pattern in expected:
        assert any(n == line_no and re.search(pattern, m) for n, m in problems), \
            (line_no, pattern, problems)
    assert len(problems) == len(expected), problems
    assert "configuration OK" not in result.stdout


def test_check_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, """
        listen:
          - address: "127.0.0.1:18080"
        pools:
          web:
            idle_timout: 5m
        apps:
          shop:
            pool: webb
            command: gunicorn shop.wsgi
        """)
    result = bastion_cli("check", "-c", str(path))
    assert result.returncode == 1
    found = [(int(m["line"]), m["message"]) for m in map(PROBLEM.match, result.stderr.splitlines())
             if m]
    assert [n for n, _ in found] == [5, 8, 9], found


def test_check_valid_config_exits_0(tmp_path: Path, tls_settings: dict[str, object]) -> None:
    cert = tls_settings["certificates"][0]  # type: ignore[index]
    path = write(tmp_path, f"""
        listen:
          - address: "127.0.0.1:18080"
            redirect_https: true
          - address: "127.0.0.1:18443"
            tls:
              certificates:
                - {{cert: {cert["cert"]}, key: {cert["key"]}}}
        trusted_proxies: ["10.0.0.0/8"]
        limits:
          max_body_size: 30m
          header_timeout: 500ms
        pools:
          web:
            idle_timeout: 2m
        apps:
          shop:
            pool: web
            hosts: ["shop.example.com", "*.example.com"]
            path: /shop
            command: ["python", "app.py", "--port", "{{port}}"]
          blog:
            command: ["python", "blog.py"]
        """)
    result = bastion_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if PROBLEM.match(line)]


# -- bastion serve: a port already bound ------------------------------------------------------


def test_serve_on_bound_port_exits_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        path = write(tmp_path, f"""
            listen:
              - address: "{address}"
            admin_socket: {tmp_path / "admin.sock"}
            apps:
              shop:
                command: ["python", "app.py"]
            """)
        result = bastion_cli("serve", "-c", str(path), env={"BASTION_DATA_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    # Informational log lines aside, exactly one line: the error, naming the address.
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    assert address in lines[0]
    assert re.search(r"in use|cannot", lines[0], re.I), lines[0]


def test_serve_with_broken_config_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, """
        listen:
          - address: "127.0.0.1:18080"
        apps:
          shop:
            command: gunicorn shop.wsgi
        """)
    result = bastion_cli("serve", "-c", str(path))
    assert result.returncode == 1
    assert re.search(rf"^{re.escape(str(path))}:5: .*argv list", result.stderr, re.M), \
        result.stderr
    assert "Traceback" not in result.stderr


# -- bastion serve: the built-in demo --------------------------------------------------------

DEMO_PORTS = (8080, 8443)


def _ports_free(ports: tuple[int, ...]) -> bool:
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    if not _ports_free(DEMO_PORTS):
        pytest.skip("127.0.0.1:8080 or :8443 is taken")
    env = {k: v for k, v in os.environ.items() if k != "BASTION_CONFIG"}
    env["BASTION_DATA_DIR"] = str(tmp_path / "data")
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "serve"], cwd=str(REPO), env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert wait_until(lambda: proc.poll() is not None or _accepting(DEMO_PORTS),
                          timeout=20), (tmp_path / "demo.log").read_text()
        assert proc.poll() is None, (tmp_path / "demo.log").read_text()
        yield proc, tmp_path / "data"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _accepting(ports: tuple[int, ...]) -> bool:
    for port in ports:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            return False
    return True


def _demo_fields(page: str) -> dict[str, str]:
    rows = re.findall(r"<tr><th>([^<]*)</th><td><code>([^<]*)</code></td></tr>", page)
    return {name.split(" (")[0]: value for name, value in rows}


def test_demo_answers_on_http_and_https(demo: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, data_dir = demo
    conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=30)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        page = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200, page
    fields = _demo_fields(page)
    assert fields["scheme"] == "http", page
    assert fields["root_path"] == "", page
    # What Bastion did, in two sentences; `bastion status`; where the development CA is.
    what = re.search(r'<p id="what">(.*?)</p>', page, re.S)
    assert what and what.group(1).count(". ") + what.group(1).endswith(".") == 2, page
    assert "Bastion accepted your http request" in what.group(1)
    status = re.search(r'<pre id="status">(.*?)</pre>', page, re.S)
    assert status and "listening on http://127.0.0.1:8080" in status.group(1), page
    assert f"curl --cacert {data_dir / 'ca.pem'} https://127.0.0.1:8443/" in page
    assert f"curl --cacert {data_dir / 'ca.pem'}" in (data_dir.parent / "demo.log").read_text()

    context = ssl.create_default_context(cafile=str(data_dir / "ca.pem"))
    sconn = http.client.HTTPSConnection("127.0.0.1", 8443, timeout=30, context=context)
    try:
        sconn.request("GET", "/wsgi/")
        resp = sconn.getresponse()
        page = resp.read().decode()
    finally:
        sconn.close()
    assert resp.status == 200, page
    fields = _demo_fields(page)
    assert fields["scheme"] == "https", page
    assert fields["root_path"] == "/wsgi", page
    assert fields["path"] == "/", page

    apps = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert apps
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert wait_until(lambda: not any(pid_alive(pid) for pid in apps), timeout=10)


# -- bastion dev-cert -------------------------------------------------------------------------


def test_dev_cert_prints_the_certificate_path(tmp_path: Path) -> None:
    env = {"BASTION_DATA_DIR": str(tmp_path / "data")}
    first = bastion_cli("dev-cert", env=env)
    assert first.returncode == 0, first.stderr
    paths = re.findall(r"(/\S+\.pem)\b", first.stdout)
    cert_path = tmp_path / "data" / "cert.pem"
    assert str(cert_path) in paths, first.stdout
    assert str(tmp_path / "data" / "ca.pem") in paths, first.stdout
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    # A second run shows the same certificate instead of making a new one.
    second = bastion_cli("dev-cert", env=env)
    assert second.returncode == 0, second.stderr
    assert str(cert_path) in second.stdout
    assert cert_path.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)


# -- bastion status --json --------------------------------------------------------------------


def test_status_json_lists_the_apps(tmp_path: Path) -> None:
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}"}],
        "apps": {
            "echo": {"command": app_command("uvicorn", "echo_asgi:app")},
            "idle": {"command": app_command("uvicorn", "echo_asgi:app"), "path": "/idle"},
        },
    }
    b = BastionProcess(tmp_path, config)
    try:
        b.start()
        assert b.get("/info").status == 200
        result = bastion_cli("status", "--json", "-c", str(b.path))
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert set(data["apps"]) == {"echo", "idle"}
        procs = data["apps"]["echo"]["processes"]
        assert len(procs) == 1
        proc = procs[0]
        assert proc["state"] == "ready"
        assert pid_alive(proc["pid"])
        assert proc["pid"] in {p.pid for p in b.descendants()}
        assert isinstance(proc["port"], int) and proc["port"] > 0
        assert data["apps"]["idle"]["processes"] == []  # on demand: not started yet

        text = bastion_cli("status", "-c", str(b.path))
        assert text.returncode == 0, text.stderr
        assert "echo" in text.stdout and str(proc["pid"]) in text.stdout
    finally:
        b.stop()


def test_status_without_running_bastion_fails_clearly(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
        listen:
          - address: "127.0.0.1:18080"
        admin_socket: {tmp_path / "nobody.sock"}
        apps:
          shop:
            command: ["python", "app.py"]
        """)
    started = time.monotonic()
    result = bastion_cli("status", "--json", "-c", str(path))
    assert result.returncode != 0
    assert "nobody.sock" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
