"""Start real Bastion processes for tests and talk to them over loopback.

``BastionProcess`` writes a YAML config into a temporary directory, runs
``python -m bastion serve -c FILE`` as a subprocess (in its own session, so a test can
SIGKILL it without touching pytest), waits until every listener accepts, and gives the
base URLs. ``stop()`` sends SIGTERM and waits. ``app_pids()`` reads the admin socket's
``/status``. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
PY = sys.executable


def free_port() -> int:
    """A free loopback port chosen by the kernel."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Wait until ``host:port`` accepts a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept within {timeout}s")


@dataclass
class Response:
    """A complete HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class BastionProcess:
    """A real Bastion started from a config dict."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 tls_ca: Any = None) -> None:
        self.tmp = tmp
        self.config = dict(config)
        self.config.setdefault("admin_socket", str(tmp / "admin.sock"))
        # One proxy worker in the main process unless a test asks for more: counters
        # and queues are then exact. tests/test_workers.py covers worker processes.
        self.config.setdefault("workers", 1)
        self.path = tmp / "bastion.yaml"
        self.path.write_text(yaml.safe_dump(self.config))
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("BASTION_DATA_DIR", str(tmp / "data"))
        self.log_path = tmp / "bastion.log"
        self.tls_ca = tls_ca  # a trustme.CA for https requests
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> BastionProcess:
        """Start Bastion and wait for its listeners."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "bastion", "serve", "-c", str(self.path)],
            cwd=str(REPO), env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        for listener in self.config["listen"]:
            host, _, port_text = listener["address"].rpartition(":")
            host = host.strip("[]")
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1" if host != "::" else "::1"
            port = int(port_text)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"bastion exited {self.proc.returncode}:\n{self.log()}")
                try:
                    wait_port(port, timeout=0.2, host=host)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        admin = self.config.get("admin_socket")
        if admin:  # the listeners accept a moment before the admin socket does
            while not _accepts_unix(str(admin)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"bastion exited {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the admin socket {admin} never accepted:\n{self.log()}")
                time.sleep(0.01)
        return self

    def log(self) -> str:
        """Everything Bastion wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        """Bastion's pid."""
        assert self.proc is not None
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        """Every live process below Bastion."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for Bastion to exit; return its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    # -- requests -------------------------------------------------------------------
    def port(self, index: int = 0) -> int:
        """The port of listener ``index``."""
        return int(self.config["listen"][index]["address"].rsplit(":", 1)[1])

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None, listener: int = 0,
                timeout: float = 30.0, host: str | None = None) -> Response:
        """One request through Bastion (HTTPS when the listener has TLS)."""
        port = self.port(listener)
        tls = "tls" in self.config["listen"][listener]
        if tls:
            context = ssl.create_default_context()
            if self.tls_ca is not None:
                self.tls_ca.configure_trust(context)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        hdrs = dict(headers or {})
        if host is not None:
            hdrs["Host"] = host
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        """GET ``path``."""
        return self.request("GET", path, **kw)

    # -- admin ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``GET /status`` from the admin socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.config["admin_socket"])
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: bastion\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if b"chunked" in head.lower():
            body = _dechunk(body)
        return json.loads(body)  # type: ignore[no-any-return]

    def admin_post(self, path: str) -> tuple[int, Any]:
        """``POST path`` on the admin socket; return the status and the JSON body."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.config["admin_socket"])
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: bastion\r\nContent-Length: 0\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if b"chunked" in head.lower():
            body = _dechunk(body)
        return int(head.split()[1]), json.loads(body) if body else None

    def app_pids(self, app: str) -> list[int]:
        """Pids of the running processes of ``app``."""
        return [p["pid"] for p in self.status()["apps"][app]["processes"]
                if p["state"] == "ready"]

    def __enter__(self) -> BastionProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def readable_apps_copy() -> Path:
    """A copy of tests/apps in a fresh directory under /tmp that every user may read.

    A test whose app runs as another user cannot use tests/apps itself when the
    repository is cloned where only root may enter (``/root/...``, a ``mktemp -d``).
    The caller removes the directory (``shutil.rmtree``)."""
    import shutil
    import tempfile

    base = "/tmp" if os.path.isdir("/tmp") else None
    directory = Path(tempfile.mkdtemp(prefix="bastion-apps-", dir=base))
    directory.chmod(0o755)
    for source in APPS.glob("*.py"):
        target = directory / source.name
        shutil.copyfile(source, target)
        target.chmod(0o644)
    return directory


def runs_as(python: str, uid: int, gid: int, script: Path) -> str | None:
    """None when user ``uid`` can run ``python`` on ``script``; else why not."""
    code = f"import http.server; open({str(script)!r}).read()"
    try:
        done = subprocess.run([python, "-c", code], user=uid, group=gid, extra_groups=[],
                              cwd="/", capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{python} cannot be run as uid {uid}: {exc}"
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return f"uid {uid} cannot run {python} on {script}: {' '.join(last)}"
    return None


def app_command(kind: str, module: str, *extra: str) -> list[str]:
    """argv running a test app from tests/apps with a real server on ``{port}``."""
    if kind == "uvicorn":
        return [PY, "-m", "uvicorn", "--app-dir", str(APPS), module, "--host", "127.0.0.1",
                "--port", "{port}", "--no-access-log", "--no-proxy-headers", *extra]
    if kind == "gunicorn":
        return [PY, "-m", "gunicorn", "--chdir", str(APPS), module, "--bind",
                "127.0.0.1:{port}", "--workers", "2", "--forwarded-allow-ips", "192.0.2.1",
                *extra]
    if kind == "python":
        return [PY, str(APPS / module), *extra]
    raise ValueError(kind)


def simple_config(apps: dict[str, dict[str, Any]], *, tls: dict[str, Any] | None = None,
                  **top: Any) -> dict[str, Any]:
    """A config with one HTTP listener (and one HTTPS listener when ``tls`` is given)."""
    listen: list[dict[str, Any]] = [{"address": f"127.0.0.1:{free_port()}"}]
    if tls is not None:
        listen.append({"address": f"127.0.0.1:{free_port()}", "tls": tls})
    return {"listen": listen, "apps": apps, **top}


def _accepts_unix(path: str) -> bool:
    """True when a Unix socket at ``path`` accepts a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
