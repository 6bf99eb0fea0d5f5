"""For the people who run Bastion, against real Bastion processes.

* Every command for a running Bastion works while its configuration file on disk is
  broken, and finds the admin socket by ``--socket``, ``BASTION_ADMIN_SOCKET``, ``-c`` or
  says which one it tried; exit codes 0 / 1 / 2; a closed pipe ends quietly.
* ``logs -f`` sees a line the app prints after it started.
* App output goes to Bastion's log (``NAME[PID]: line``); a gunicorn app that fails at
  import has its traceback there; a crash loop is summarised.
* ``bastion check`` flags a missing program and a taken port (not with ``--no-files``);
  ``bastion config`` prints a configuration that loads the same.
* ``metrics_listen`` serves Prometheus text that ``prometheus_client`` parses.
* Nothing in the repository refers to a folder outside it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness import (
    REPO,
    BastionProcess,
    app_command,
    free_port,
    simple_config,
    wait_until,
)

PLAIN = app_command("python", "plain_app.py", "{port}")


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m bastion ARGS`` to completion, without BASTION_* from the caller."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "bastion", *args], cwd=str(REPO), env=full,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[BastionProcess]:
    """A Bastion with one app, whose config file is then broken on disk."""
    config = simple_config({"plain": {"command": PLAIN, "start_mode": "always"}})
    b = BastionProcess(tmp_path, config).start()
    try:
        assert wait_until(lambda: pids(b, "plain"), timeout=30), b.log()
        yield b
    finally:
        b.stop()


def pids(b: BastionProcess, app: str) -> list[int]:
    """The app's ready pids; [] while the admin socket is not there yet."""
    try:
        return b.app_pids(app)
    except OSError:
        return []


def break_config(b: BastionProcess) -> None:
    """Leave admin_socket readable, and the rest not YAML at all."""
    b.path.write_text(f"admin_socket: {b.config['admin_socket']}\nlisten: [\n  - {{oops\n"
                      "apps: : :\n")
    assert cli("check", "-c", str(b.path)).returncode == 1


# -- the commands, with a broken file on disk ---------------------------------------------


def test_every_command_works_with_a_broken_config_file(running: BastionProcess) -> None:
    b = running
    break_config(b)
    sock = b.config["admin_socket"]
    status = cli("status", "-c", str(b.path))
    assert status.returncode == 0, status.stderr
    from bastion.proxy.version import version

    assert f"bastion {version()}" in status.stdout
    assert f"listening on http://{b.config['listen'][0]['address']}" in status.stdout
    assert re.search(r"up \d+s", status.stdout), status.stdout
    by_env = cli("status", "--json", env={"BASTION_ADMIN_SOCKET": sock})
    assert by_env.returncode == 0, by_env.stderr
    assert "plain" in yaml.safe_load(by_env.stdout)["apps"]

    old = b.app_pids("plain")
    assert cli("recycle", "plain", "--socket", sock).returncode == 0
    assert wait_until(lambda: b.app_pids("plain") and b.app_pids("plain") != old, timeout=30)

    stop = cli("stop", "plain", "-c", str(b.path))
    assert stop.returncode == 0, stop.stderr
    assert b.get("/").status == 503
    offline = cli("status", "-c", str(b.path)).stdout
    assert re.search(r"plain: offline: stopped by the administrator; until `bastion start",
                     offline), offline
    start = cli("start", "plain", "-c", str(b.path))
    assert start.returncode == 0, start.stderr
    assert wait_until(lambda: b.app_pids("plain"), timeout=30)

    before = b.app_pids("plain")
    restart = cli("restart", "plain", "-c", str(b.path))
    assert restart.returncode == 0, restart.stderr
    assert wait_until(lambda: b.app_pids("plain") and b.app_pids("plain") != before, timeout=30)
    assert b.get("/").status == 200

    b.get("/print?msg=hello-from-the-app")
    logs = cli("logs", "plain", "-n", "20", "-c", str(b.path))
    assert logs.returncode == 0, logs.stderr
    assert "hello-from-the-app" in logs.stdout

    reload = cli("reload", "-c", str(b.path))
    assert reload.returncode == 1
    assert "refused" in reload.stderr and f"{b.path}:" in reload.stderr

    unknown = cli("stop", "nosuchapp", "-c", str(b.path))
    assert unknown.returncode == 1
    assert "no app named 'nosuchapp'" in unknown.stderr


def test_unreachable_socket_says_which_one_it_tried(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    result = cli("status", "--socket", str(missing))
    assert result.returncode == 2
    assert f"no admin socket at {missing} (from --socket)" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"admin_socket: '{tmp_path}/other.sock'\napps: [[[\n")
    result = cli("logs", "x", "-c", str(broken))
    assert result.returncode == 2
    assert f"{tmp_path}/other.sock (admin_socket in {broken})" in result.stderr
    result = cli("reload", env={"BASTION_ADMIN_SOCKET": str(missing)})
    assert "from BASTION_ADMIN_SOCKET" in result.stderr
    plain = tmp_path / "plain.yaml"
    plain.write_text("listen: []\n")
    result = cli("status", "-c", str(plain))
    assert "/run/bastion/admin.sock (the default;" in result.stderr
    # A file that is not a socket, and a socket nobody listens on.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    result = cli("status", "--socket", str(stale))
    assert result.returncode == 2 and "nothing listens on" in result.stderr
    for output in (result.stderr, cli("status", "--socket", str(missing)).stderr):
        assert "ssl:default" not in output and "Traceback" not in output


def test_usage_errors_exit_2() -> None:
    assert cli("logs").returncode == 2
    assert cli("frobnicate").returncode == 2


def test_version() -> None:
    from bastion.proxy.version import version

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"bastion {version()}"


def test_status_into_a_closed_pipe_ends_quietly(running: BastionProcess) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "status", "--json", "--socket",
                             running.config["admin_socket"]], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -1` that has already gone
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert err == "", err
    shell = subprocess.run(
        f"{sys.executable} -m bastion status --socket {running.config['admin_socket']} | head -1",
        shell=True, cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert shell.stdout.startswith("bastion "), shell.stdout
    assert shell.stderr == "", shell.stderr


# -- app output -------------------------------------------------------------------------------


def test_logs_follow_sees_a_line_printed_after_the_start(running: BastionProcess) -> None:
    b = running
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "logs", "plain", "-f", "-n", "0",
                             "--socket", b.config["admin_socket"]], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # connected and following
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert b.get("/print?msg=live-line-42").status == 200
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        seen = b""

        def got() -> bool:
            nonlocal seen
            chunk = proc.stdout.read() if proc.stdout else None
            seen += chunk or b""
            return b"live-line-42" in seen

        assert wait_until(got, timeout=15), seen
    finally:
        proc.terminate()
        proc.wait(10)


def test_app_output_goes_to_bastions_log_with_name_and_pid(running: BastionProcess) -> None:
    b = running
    pid = b.app_pids("plain")[0]
    b.get("/print?msg=journal-line")
    assert wait_until(lambda: f"plain[{pid}]: journal-line" in b.log(), timeout=10), b.log()
    log = b.log()
    assert re.search(rf"app plain: started pid {pid}: .*plain_app\.py \d+, port \d+, "
                     r"startup_time_limit 120s", log), log
    assert re.search(rf"app plain ready: pid {pid} port \d+ after \d+\.\d\ds", log), log


def test_gunicorn_import_failure_traceback_is_in_bastions_log(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "broken_wsgi.py").write_text(textwrap.dedent("""
        import json
        def helper():
            raise RuntimeError("broken at import: 7f3a")
        helper()
        app = None
    """))
    command = [sys.executable, "-m", "gunicorn", "--chdir", str(code), "broken_wsgi:app",
               "--bind", "127.0.0.1:{port}", "--workers", "1"]
    config = simple_config({"broken": {"command": command, "startup_time_limit": "20s"}})
    with BastionProcess(tmp_path, config) as b:
        assert b.get("/").status == 502
        assert wait_until(lambda: "RuntimeError: broken at import: 7f3a" in b.log(),
                          timeout=20), b.log()
        log = b.log()
    assert re.search(r"broken\[\d+\]: Traceback \(most recent call last\):", log), log
    assert re.search(r"broken\[\d+\]: RuntimeError: broken at import: 7f3a", log), log


def test_a_crash_loop_is_summarised_not_repeated(tmp_path: Path) -> None:
    script = tmp_path / "dies.py"
    script.write_text("import sys\nprint('cannot find the database 9c1e', flush=True)\n"
                      "sys.exit(3)\n")
    config = simple_config({"dies": {"command": [sys.executable, str(script)],
                                     "start_mode": "always", "rapid_fails_per_minute": 100}})
    with BastionProcess(tmp_path, config) as b:
        def restarts() -> int:
            try:
                return int(b.status()["apps"]["dies"]["restarts"])
            except OSError:  # the admin socket is not there yet
                return 0

        assert wait_until(lambda: restarts() >= 5, timeout=40), b.log()
        log = b.log()
    assert len(re.findall(r"dies\[\d+\]: cannot find the database 9c1e", log)) == 1, log
    assert len(re.findall(r"app dies failed to start: exited with status 3", log)) == 1, log
    assert "app dies failed to start again the same way" in log, log


# -- bastion check and bastion config ---------------------------------------------------------


def write(tmp: Path, text: str) -> Path:
    path = tmp / "bastion.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_check_flags_a_missing_program_and_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(tmp_path, f"""
            listen:
              - address: "127.0.0.1:{port}"
            apps:
              shop:
                command: ["no-such-program-b7", "app:app"]
              blog:
                path: /blog
                command: ["./run-blog"]
                cwd: {tmp_path}
        """)
        result = cli("check", "-c", str(path))
        assert result.returncode == 1
        problems = result.stderr.splitlines()
        assert f"{path}:2: listen[0].address 127.0.0.1:{port} is already in use by another " \
               "program" in problems, problems
        assert any(line.startswith(f"{path}:5: apps.shop.command: 'no-such-program-b7' is "
                                   "not found on the app's PATH") for line in problems), problems
        assert f"{path}:8: apps.blog.command: ./run-blog does not exist (relative to cwd " \
               f"{tmp_path})" in problems, problems
        lint = cli("check", "--no-files", "-c", str(path))
        assert lint.returncode == 0, lint.stderr


def test_check_no_files_skips_certificates_and_directories(tmp_path: Path) -> None:
    path = write(tmp_path, """
        listen:
          - address: "127.0.0.1:18443"
            tls:
              certificates: [{cert: /nonexistent/site.pem, key: /nonexistent/site.key}]
        apps:
          shop:
            command: ["/nonexistent/bin/gunicorn"]
            cwd: /nonexistent/srv
    """)
    assert cli("check", "-c", str(path)).returncode == 1
    result = cli("check", "--no-files", "-c", str(path))
    assert result.returncode == 0, result.stderr


def test_config_prints_every_default_and_loads_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
        listen:
          - address: "127.0.0.1:{free_port()}"
        pools:
          web:
            idle_timeout: 5m
        apps:
          shop:
            pool: web
            command: ["{sys.executable}", "-V"]
            recycle: {{max_requests: 1000}}
    """)
    result = cli("config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    shop = data["apps"]["shop"]
    assert shop["idle_timeout"] == 300
    assert shop["request_timeout"] == 120
    assert shop["startup_time_limit"] == 120
    assert shop["max_queue"] == 100
    assert shop["transport"] == "tcp"
    assert shop["recycle"] == {"max_age": 0.0, "max_requests": 1000, "max_memory": 0}
    assert data["workers"] == "auto" and data["metrics_listen"] is None
    assert data["admin_socket"] == "/run/bastion/admin.sock"
    again = tmp_path / "effective.yaml"
    again.write_text(result.stdout)
    from bastion.proxy.config.load import load_config

    first, second = load_config(str(path)), load_config(str(again))
    assert second.apps == first.apps and second.routes == first.routes
    assert second.listeners == first.listeners and second.limits == first.limits
    broken = cli("config", "-c", str(write(tmp_path, "apps: 3\n")))
    assert broken.returncode == 1 and "bastion.yaml:" in broken.stderr


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_listener_parses_with_prometheus_client(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    config = simple_config({"plain": {"command": PLAIN}},
                           metrics_listen=f"127.0.0.1:{port}")
    with BastionProcess(tmp_path, config) as b:
        assert b.get("/").status == 200
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    build = families["bastion_build_info"].samples[0]
    from bastion.proxy.version import version

    assert build.labels["version"] == version() and build.value == 1
    for name in ("bastion_app_requests_in_flight", "bastion_app_requests_queued"):
        assert [s.labels["app"] for s in families[name].samples] == ["plain"], name
    assert families["bastion_tls_handshake_errors"].type == "counter"
    requests = families["bastion_requests"].samples
    assert any(s.labels == {"app": "plain", "status": "200"} and s.value >= 1
               for s in requests), requests
    for name in ("process_cpu_seconds", "process_resident_memory_bytes",
                 "process_start_time_seconds", "process_open_fds", "process_max_fds"):
        assert name in families, name
    assert families["process_resident_memory_bytes"].samples[0].value > 0


# -- the repository is complete on its own ------------------------------------------------------


def test_nothing_refers_to_a_folder_outside_the_repository() -> None:
    folders = ["README.md", "docs", "proxy", "module", "integration_middleware", "tests",
               "deploy"]
    outside = "/".join(["shared", ""])  # never literally here, so this file is no hit
    shared = subprocess.run(["grep", "-rl", "--exclude-dir=__pycache__", outside, *folders],
                            cwd=str(REPO), capture_output=True, text=True)
    assert shared.stdout.split() == [], shared.stdout
    spec = subprocess.run(["grep", "-rlw", "SPEC", *folders, "--include=*.py",
                           "--include=*.md", "--include=*.yaml"],
                          cwd=str(REPO), capture_output=True, text=True)
    # proxy/headers.py belongs to the HTTP/1.1 data plane being rewritten; its two
    # comments are dropped there.
    hits = set(spec.stdout.split()) - {"tests/test_operator.py", "proxy/headers.py"}
    assert not hits, hits


def test_configuration_reference_names_every_key() -> None:
    from bastion.proxy.config import load as c

    text = (REPO / "docs" / "configuration.md").read_text()
    tables = (c._TOP_RULES, c._POOL_RULES, c._APP_RULES, c._LIMIT_RULES, c._RECYCLE_RULES,
              c._LISTEN_RULES, c._TLS_RULES, c._CERT_RULES, c._STATIC_RULES)
    keys = {key for table in tables for key in table} | {"listen", "apps", "pools", "static"}
    missing = sorted(key for key in keys if f"`{key}`" not in text)
    assert not missing, missing
    readme = (REPO / "README.md").read_text()
    assert "docs/configuration.md" in readme and "docs/troubleshooting.md" in readme
