"""pytest plugin: run your app under a real Bastion in a test, and break it on purpose.

Loaded through the ``pytest11`` entry point ``bastion``; it gives the
``bastion`` fixture, a factory::

    def test_my_app(bastion):
        b = bastion(command=["uvicorn", "myapp:app", "--port", "{port}"], path="/shop")
        assert b.request("GET", "/shop/health").status == 200
        b.kill("app")                      # SIGKILL its processes
        assert b.get("/shop/health").status == 200   # served by a new process

Theory of operation
-------------------
``bastion(...)`` writes a configuration into a fresh temporary directory and runs
``python -m bastion serve -c FILE`` in its own session, its output in ``bastion.log``:

* listeners: every ``listen`` entry gets a free port on 127.0.0.1 (one HTTP and, with
  ``tls=True``, one HTTPS listener when the config has none). TLS listeners serve a
  certificate for ``127.0.0.1``, ``::1`` and ``localhost`` made by ``trustme`` when it is
  installed, else by :func:`proxy.devcert.ensure_dev_cert` in the temporary directory; the
  CA to trust is :attr:`BastionHandle.ca_path`.
* ``admin_socket`` is in the temporary directory (``status()`` reads it).
* each app without a ``cwd`` gets its own empty temporary one (``offline()`` writes
  ``app_offline.htm`` there), and its command is wrapped in
  ``python -m bastion.proxy.pytest_plugin_shim FLAG -- argv...``, which fails one start when
  ``fail_next_start()`` created FLAG and otherwise execs the command (same pid);
* each in-process app (``in_process="module:attr"``, or ``hosting_model: in_process`` in
  the config) is loaded through ``bastion.proxy.pytest_plugin_hosted``, which fails one
  load when ``fail_next_import()`` created FLAG and otherwise imports the real app;
  ``kill_worker()`` kills a proxy worker as a crashing in-process app would.

The factory returns once every listener accepts and the admin socket answers (and, with
``warmup="/path"``, once a request to that path was answered without a 5xx). At teardown
each Bastion gets SIGTERM; the test FAILS (error at teardown) when Bastion did not exit
within its time or any of its processes (apps, their children, anything left in its
session) is still alive afterwards; leftovers are then killed.

Only the standard library and pytest are imported when the plugin loads; ``psutil``,
``trustme``, ``yaml`` and the certificate code are imported when a fixture needs them.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

__all__ = ["BastionFactory", "BastionHandle", "Response", "bastion", "start_bastion"]

LOOPBACK = "127.0.0.1"
SERVER_NAMES = ("127.0.0.1", "::1", "localhost")
OFFLINE_FILE = "app_offline.htm"
SHIM_MODULE = "bastion.proxy.pytest_plugin_shim"
HOSTED_MODULE = "bastion.proxy.pytest_plugin_hosted"
HOSTED_ENV = "BASTION_TEST_HOSTED"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux


# -- small helpers --------------------------------------------------------------------
def free_port() -> int:
    """A free loopback port chosen by the kernel."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@dataclass
class Response:
    """A complete HTTP response (header names lower-cased)."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("bastion", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


# -- certificates ---------------------------------------------------------------------
_CA: Any = None
_CA_LOCK = threading.Lock()


def _make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(cert, key, ca) files for the loopback names, written to ``directory``."""
    global _CA
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import trustme
    except ImportError:
        from .control.devcert import ensure_dev_cert

        made = ensure_dev_cert(directory / "devcert")
        return made.cert_path, made.key_path, made.ca_path
    with _CA_LOCK:
        if _CA is None:
            _CA = trustme.CA()
        ca = _CA
    leaf = ca.issue_cert(*SERVER_NAMES)
    cert, key, ca_file = directory / "server.pem", directory / "server.key", directory / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


# -- the handle -----------------------------------------------------------------------
class BastionHandle:
    """One running Bastion started by the ``bastion`` fixture (or :func:`start_bastion`)."""

    def __init__(self, directory: Path, config: dict[str, Any], *, ca_path: Path | None,
                 env: dict[str, str] | None = None,
                 flags: dict[str, Path] | None = None) -> None:
        self.directory = directory
        self._flags = dict(flags or {})
        self.config = config
        self.ca_path = ca_path
        self.config_path = directory / "bastion.yaml"
        self.log_path = directory / "bastion.log"
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("BASTION_DATA_DIR", str(directory / "data"))
        self.env.pop("BASTION_CONFIG", None)
        hosted = directory / "hosted.json"
        if hosted.exists():
            self.env[HOSTED_ENV] = str(hosted)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._log_file: Any = None
        self._hung: dict[str, set[int]] = {}  # app -> process groups sent SIGSTOP
        self._seen: set[int] = set()  # every app pid the handle ever saw
        self._problems: list[str] = []
        self._closed = False

    # -- configuration ------------------------------------------------------------
    @property
    def apps(self) -> dict[str, dict[str, Any]]:
        """The apps of the generated configuration (with their ``cwd``)."""
        apps: dict[str, dict[str, Any]] = self.config["apps"]
        return apps

    def cwd(self, app: str) -> Path:
        """The working directory of ``app`` (where ``app_offline.htm`` goes)."""
        return Path(self._app(app)["cwd"])

    def _app(self, app: str) -> dict[str, Any]:
        try:
            return self.apps[app]
        except KeyError:
            raise KeyError(f"no app named {app!r} in this Bastion (apps: "
                           f"{', '.join(sorted(self.apps))})") from None

    def _listener(self, tls: bool) -> dict[str, Any] | None:
        for listener in self.config["listen"]:
            if ("tls" in listener) == tls:
                return dict(listener)
        return None

    @staticmethod
    def _port_of(listener: dict[str, Any]) -> int:
        return int(str(listener["address"]).rsplit(":", 1)[1])

    @property
    def http_port(self) -> int | None:
        """Port of the first plain-HTTP listener."""
        listener = self._listener(False)
        return None if listener is None else self._port_of(listener)

    @property
    def https_port(self) -> int | None:
        """Port of the first HTTPS listener."""
        listener = self._listener(True)
        return None if listener is None else self._port_of(listener)

    @property
    def http_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the first plain-HTTP listener (None without one)."""
        return None if self.http_port is None else f"http://{LOOPBACK}:{self.http_port}"

    @property
    def https_url(self) -> str | None:
        """``https://127.0.0.1:PORT`` of the first HTTPS listener (None without one)."""
        return None if self.https_port is None else f"https://{LOOPBACK}:{self.https_port}"

    @property
    def url(self) -> str:
        """The HTTPS URL when there is an HTTPS listener, else the HTTP one."""
        found = self.https_url or self.http_url
        assert found is not None
        return found

    @property
    def admin_socket(self) -> str:
        """Path of the admin socket."""
        return str(self.config["admin_socket"])

    @property
    def pid(self) -> int:
        """Bastion's own pid."""
        assert self.proc is not None, "Bastion was not started"
        return self.proc.pid

    def log(self) -> str:
        """Everything Bastion (and its apps, unless they log elsewhere) wrote so far."""
        if self._log_file is not None:
            with contextlib.suppress(ValueError):
                self._log_file.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting :attr:`ca_path`."""
        context = ssl.create_default_context()
        if self.ca_path is not None:
            context.load_verify_locations(cafile=str(self.ca_path))
        return context

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 30.0, warmup: str | None = None) -> BastionHandle:
        """Run Bastion and wait until its listeners accept and its admin socket answers."""
        self.config_path.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "-c", str(self.config_path)],
            cwd=str(self.directory), env=self.env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        pending = [self._port_of(listener) for listener in self.config["listen"]]
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Bastion exited with status {self.proc.returncode} "
                                   f"before it was ready:\n{self.log()}")
            pending = [port for port in pending if not _accepts(LOOPBACK, port)]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"Bastion's ports {pending} did not accept within "
                                   f"{timeout}s:\n{self.log()}")
            if pending:
                time.sleep(0.05)
        while True:
            try:
                self.status()
                break
            except (OSError, http.client.HTTPException, ValueError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Bastion's admin socket never answered:\n"
                                       f"{self.log()}") from None
                time.sleep(0.05)
        if warmup is not None:
            left = max(5.0, deadline - time.monotonic())
            response = self.request("GET", warmup, timeout=left)
            if response.status >= 500:
                raise RuntimeError(f"warm-up GET {warmup} answered {response.status}:\n"
                                   f"{response.text[:2000]}\n--- bastion log ---\n{self.log()}")
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM Bastion and wait; return its exit status (idempotent).

        Problems (Bastion not stopping in time, processes left alive afterwards) are
        recorded for :meth:`close`; the leftovers are killed.
        """
        if self.proc is None or self._closed:
            return self.returncode
        self._closed = True
        self.resume()
        known = set(self._seen)
        with contextlib.suppress(Exception):
            known |= {p["pid"] for a in self.status(timeout=2.0)["apps"].values()
                      for p in a.get("processes", ())}
        known |= self._descendants()
        known.discard(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._problems.append(f"Bastion (pid {self.proc.pid}) did not exit within "
                                      f"{timeout}s of SIGTERM; killed. Its processes then:\n"
                                      + self._tree() + "\n--- last lines of its log ---\n"
                                      + "\n".join(self.log().splitlines()[-15:]))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.returncode = self.proc.returncode
        self._check_leftovers(known)
        if self._log_file is not None:
            self._log_file.close()
        return self.returncode

    def close(self) -> list[str]:
        """Stop Bastion (if needed); return the problems found (empty when clean)."""
        self.stop()
        return list(self._problems)

    def _descendants(self) -> set[int]:
        import psutil

        try:
            return {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.Error:
            return set()

    def _tree(self) -> str:
        import psutil

        lines = []
        try:
            procs = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return "  (gone)"
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                lines.append(f"  pid {proc.pid} ({proc.status()}): {' '.join(proc.cmdline())}")
        return "\n".join(lines)

    def _in_session(self) -> set[int]:
        import psutil

        found = set()
        for pid in psutil.pids():
            with contextlib.suppress(OSError):
                if pid != self.pid and os.getsid(pid) == self.pid and _alive(pid):
                    found.add(pid)
        return found

    def _check_leftovers(self, known: set[int]) -> None:
        import psutil

        def left() -> set[int]:
            return {pid for pid in known if _alive(pid)} | self._in_session()

        if wait_until(lambda: not left(), timeout=5.0, interval=0.1):
            return
        leftovers = sorted(left())
        lines = []
        for pid in leftovers:
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                cmd = "?"
            lines.append(f"  pid {pid}: {cmd}")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        self._problems.append("processes left alive after Bastion stopped (now killed):\n"
                              + "\n".join(lines))

    def __enter__(self) -> BastionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        problems = self.close()
        if problems and exc[0] is None:
            raise AssertionError("\n".join(problems))

    # -- admin socket -------------------------------------------------------------
    def admin(self, method: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        """One request to the admin socket; ``(status, parsed JSON or text)``."""
        conn = _UnixHTTPConnection(self.admin_socket, timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("content-type", "")
        finally:
            conn.close()
        return resp.status, (json.loads(raw) if "json" in ctype else raw.decode())

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """``GET /status`` from the admin socket (pools, apps, processes)."""
        code, body = self.admin("GET", "/status", timeout=timeout)
        if code != 200 or not isinstance(body, dict):
            raise ValueError(f"admin /status answered {code}: {body!r}")
        return body

    def app_status(self, app: str) -> dict[str, Any]:
        """The ``/status`` entry of ``app`` (state, restarts, processes, ...)."""
        self._app(app)
        entry: dict[str, Any] = self.status()["apps"][app]
        return entry

    def processes(self, app: str) -> list[dict[str, Any]]:
        """The processes of ``app`` as ``/status`` lists them (any state)."""
        procs = list(self.app_status(app)["processes"])
        self._seen.update(p["pid"] for p in procs if p.get("pid"))
        return procs

    def in_process(self, app: str) -> bool:
        """Whether ``app`` is hosted in process (its processes are Bastion's workers)."""
        return self._app(app).get("hosting_model") == "in_process"

    def pids(self, app: str) -> list[int]:
        """Pids of the ready processes of ``app`` (empty when it is not running); for an
        in-process app, the worker processes that loaded it."""
        return [p["pid"] for p in self.processes(app) if p["state"] == "ready"]

    def ports(self, app: str) -> list[int]:
        """Loopback ports of the ready processes of ``app``."""
        return [p["port"] for p in self.processes(app) if p["state"] == "ready"]

    def in_flight(self, app: str) -> int:
        """Requests ``app``'s processes are serving now (as Bastion's workers last reported)."""
        return sum(int(p.get("in_flight", 0)) for p in self.processes(app))

    def wait_ready(self, app: str, timeout: float = 30.0) -> list[int]:
        """Wait until ``app`` has a ready process (without sending it a request)."""
        if not wait_until(lambda: self.pids(app), timeout=timeout):
            raise TimeoutError(f"app {app!r} not ready within {timeout}s:\n{self.log()}")
        return self.pids(app)

    # -- fault injection ----------------------------------------------------------
    def kill(self, app: str, sig: int = signal.SIGKILL, *, wait: bool | None = None
             ) -> list[int]:
        """Send ``sig`` to each ready process of ``app``; return their pids.

        With ``wait`` (default: when ``sig`` is SIGKILL) it returns once Bastion no longer
        lists those pids as ready, so the next request certainly goes to a new process.
        """
        pids = self.pids(app)
        if not pids:
            raise RuntimeError(f"app {app!r} has no running process to signal "
                               f"(state {self.app_status(app)['state']!r})")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait is None:
            wait = sig == signal.SIGKILL
        if wait and not wait_until(lambda: not set(pids) & set(self.pids(app)), timeout=10):
            raise TimeoutError(f"Bastion still lists {pids} of {app!r} after signal {sig}")
        return pids

    def kill_worker(self, app: str | None = None, sig: int = signal.SIGKILL, *,
                    wait: bool = True) -> int:
        """SIGKILL one proxy worker (one hosting ``app`` when given), as an in-process app
        that crashes its process would; return its pid. With ``wait``, return once a
        replacement worker is listed (and, with ``app``, has loaded it)."""
        if app is not None:
            candidates = self.pids(app)
        else:
            candidates = [w["pid"] for w in self.status().get("workers", [])
                          if w["pid"] != self.pid]
        if not candidates:
            raise RuntimeError("no worker process to kill"
                               + (f" hosting {app!r}" if app is not None else ""))
        victim = candidates[0]
        before = {w["pid"] for w in self.status().get("workers", [])}
        os.kill(victim, sig)
        if not wait:
            return victim

        def replaced() -> bool:
            workers = {w["pid"] for w in self.status().get("workers", [])}
            if victim in workers or len(workers) < len(before):
                return False
            return app is None or (victim not in self.pids(app)
                                   and len(self.pids(app)) >= len(candidates))

        if not wait_until(replaced, timeout=30):
            raise TimeoutError(f"worker {victim} was not replaced:\n{self.log()}")
        return victim

    def fail_next_import(self, app: str) -> None:
        """Make the next load of the in-process ``app`` (in any worker) raise ImportError."""
        if not self.in_process(app):
            raise RuntimeError(f"app {app!r} is not in process (use fail_next_start)")
        flag = self._flags[app]
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text("fail the next import\n")

    def hang(self, app: str) -> list[int]:
        """SIGSTOP every process of ``app`` (its whole process group); return the pids.
        For an in-process app: its worker processes (so the worker watchdog acts)."""
        pids = self.pids(app)
        if not pids:
            raise RuntimeError(f"app {app!r} has no running process to hang")
        if self.in_process(app):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    self._hung.setdefault(app, set()).add(-pid)
            return pids
        groups = self._hung.setdefault(app, set())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                pgid = os.getpgid(pid)
                groups.add(pgid)
                os.killpg(pgid, signal.SIGSTOP)
        return pids

    def resume(self, app: str | None = None) -> None:
        """SIGCONT what :meth:`hang` stopped (for ``app``, or every app)."""
        names = [app] if app is not None else list(self._hung)
        for name in names:
            for pgid in self._hung.pop(name, set()):
                with contextlib.suppress(ProcessLookupError):
                    if pgid < 0:  # a worker process (in-process app): not its group
                        os.kill(-pgid, signal.SIGCONT)
                    else:
                        os.killpg(pgid, signal.SIGCONT)

    def fail_next_start(self, app: str) -> None:
        """Make the next start of ``app`` exit with status 1 before it listens."""
        self._app(app)
        flag = self._flags.get(app)
        if flag is None:
            raise RuntimeError(f"app {app!r} has no start shim (its command is not a list)")
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text("fail the next start\n")

    def offline(self, app: str, html: str = "<h1>Down for maintenance</h1>", *,
                wait: bool = True) -> None:
        """Write ``app_offline.htm`` into ``app``'s cwd; wait until Bastion took it offline."""
        path = self.cwd(app) / OFFLINE_FILE
        tmp = path.with_name(OFFLINE_FILE + ".tmp")
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
        if wait and not wait_until(lambda: self.app_status(app)["state"] == "offline",
                                   timeout=10):
            raise TimeoutError(f"app {app!r} did not go offline:\n{self.log()}")

    def online(self, app: str, *, wait: bool = True) -> None:
        """Remove ``app_offline.htm``; wait until Bastion no longer reports the app offline."""
        with contextlib.suppress(FileNotFoundError):
            (self.cwd(app) / OFFLINE_FILE).unlink()
        if wait and not wait_until(lambda: self.app_status(app)["state"] != "offline",
                                   timeout=10):
            raise TimeoutError(f"app {app!r} is still offline:\n{self.log()}")

    def recycle(self, app: str) -> None:
        """Overlapped restart of ``app`` (admin ``POST /apps/NAME/recycle``)."""
        code, body = self.admin("POST", f"/apps/{app}/recycle")
        if code != 200:
            raise RuntimeError(f"recycle {app!r}: {code} {body!r}")

    # -- requests -----------------------------------------------------------------
    def request(self, method: str, path: str, *, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, https: bool | None = None,
                host: str | None = None, timeout: float = 30.0,
                source_address: tuple[str, int] | None = None) -> Response:
        """One request through Bastion; HTTPS by default when there is an HTTPS listener."""
        if https is None:
            https = self.https_port is not None
        port = self.https_port if https else self.http_port
        if port is None:
            raise RuntimeError(f"this Bastion has no {'HTTPS' if https else 'HTTP'} listener")
        conn: http.client.HTTPConnection
        if https:
            conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout,
                                               context=self.ssl_context(),
                                               source_address=source_address)
        else:
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout,
                                              source_address=source_address)
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
        """``request("GET", path, ...)``."""
        return self.request("GET", path, **kw)

    def __repr__(self) -> str:
        return f"<BastionHandle {self.url} apps={sorted(self.apps)}>"


# -- building the configuration -------------------------------------------------------
def _resolve(value: Any, base: Path | None) -> Any:
    if not isinstance(value, str) or base is None:
        return value
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else str(base / expanded)


def _load(config: dict[str, Any] | str | os.PathLike[str]) -> tuple[dict[str, Any], Path | None]:
    if isinstance(config, dict):
        return copy.deepcopy(config), None
    import yaml

    path = Path(config)
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a mapping")
    return loaded, path.resolve().parent


def build_config(directory: Path, config: dict[str, Any] | str | os.PathLike[str] | None = None,
                 *, command: list[str] | None = None, app: str = "app", path: str = "/",
                 tls: bool = True, in_process: str | None = None, **app_settings: Any
                 ) -> tuple[dict[str, Any], Path | None, dict[str, Path]]:
    """The configuration a test Bastion runs with, the CA file, and each app's flag file."""
    if config is None:
        if command is not None and in_process is not None:
            raise TypeError("give command= or in_process=, not both")
        if in_process is not None:
            entry = {"hosting_model": "in_process", "app": in_process, "path": path,
                     **app_settings}
            config = {"apps": {app: entry}}
        elif command is None:
            raise TypeError("bastion() needs a config, a command or in_process")
        else:
            config = {"apps": {app: {"command": list(command), "path": path,
                                     **app_settings}}}
        base: Path | None = None
    else:
        if command is not None or in_process is not None or app_settings:
            raise TypeError("give either a config or command=/in_process=/app settings, "
                            "not both")
        config, base = _load(config)
    config.setdefault("apps", {})
    listen = config.get("listen")
    if not listen:
        listen = [{"address": ""}] + ([{"address": "", "tls": {}}] if tls else [])
    ca_path: Path | None = None
    flags: dict[str, Path] = {}
    hosted: dict[str, dict[str, str]] = {}  # shim attribute -> real app and flag
    new_listen: list[dict[str, Any]] = []
    for entry in listen:
        listener: dict[str, Any] = dict(entry)
        listener["address"] = f"{LOOPBACK}:{free_port()}"
        if "tls" in listener:
            tls_map: dict[str, Any] = dict(listener.get("tls") or {})
            cert, key, ca_path = _make_certificate(directory / "tls")
            tls_map["certificates"] = [{"cert": str(cert), "key": str(key)}]
            if "client_ca" in tls_map:
                tls_map["client_ca"] = _resolve(tls_map["client_ca"], base)
            listener["tls"] = tls_map
        new_listen.append(listener)
    config["listen"] = new_listen
    admin = directory / "admin.sock"
    if len(str(admin)) > SOCKET_PATH_MAX:
        admin = Path(tempfile.mkdtemp(prefix="bastion-")) / "admin.sock"
    config["admin_socket"] = str(admin)
    if config.get("access_log") not in (None, "-"):
        config["access_log"] = _resolve(config["access_log"], base)
    for name, spec in config["apps"].items():
        spec = dict(spec)
        if spec.get("cwd"):
            spec["cwd"] = _resolve(spec["cwd"], base)
        else:
            cwd = directory / "apps" / name
            cwd.mkdir(parents=True, exist_ok=True)
            spec["cwd"] = str(cwd)
        if spec.get("stdout_log"):
            spec["stdout_log"] = _resolve(spec["stdout_log"], base)
        flag = directory / "flags" / f"{name}.fail"
        flags[name] = flag
        command_argv = spec.get("command")
        if spec.get("hosting_model") == "in_process" and isinstance(spec.get("app"), str):
            attribute = f"app{len(hosted)}"
            hosted[attribute] = {"target": spec["app"], "flag": str(flag), "name": name}
            spec["app"] = f"{HOSTED_MODULE}:{attribute}"
        elif isinstance(command_argv, list) and command_argv:
            spec["command"] = [sys.executable, "-m", SHIM_MODULE, str(flag), "--",
                               *[str(a) for a in command_argv]]
        config["apps"][name] = spec
    if hosted:
        (directory / "hosted.json").write_text(json.dumps(hosted, indent=2))
    return config, ca_path, flags


def start_bastion(directory: Path, config: dict[str, Any] | str | os.PathLike[str] | None = None,
                  *, command: list[str] | None = None, app: str = "app", path: str = "/",
                  tls: bool = True, warmup: str | None = None, start_timeout: float = 30.0,
                  env: dict[str, str] | None = None, in_process: str | None = None,
                  **app_settings: Any) -> BastionHandle:
    """Build a config in ``directory``, start Bastion and wait for it (see :func:`bastion`).

    For module- or session-scoped fixtures; the caller must call ``close()`` (or use it as
    a context manager) and check the problems it returns.
    """
    directory.mkdir(parents=True, exist_ok=True)
    full, ca_path, flags = build_config(directory, config, command=command, app=app,
                                        path=path, tls=tls, in_process=in_process,
                                        **app_settings)
    handle = BastionHandle(directory, full, ca_path=ca_path, env=env, flags=flags)
    try:
        handle.start(timeout=start_timeout, warmup=warmup)
    except BaseException:
        handle.close()
        raise
    return handle


# -- the fixture ----------------------------------------------------------------------
class BastionFactory(Protocol):
    """The type of the ``bastion`` fixture."""

    def __call__(self, config: dict[str, Any] | str | os.PathLike[str] | None = None, *,
                 command: list[str] | None = None, app: str = "app", path: str = "/",
                 tls: bool = True, warmup: str | None = None, start_timeout: float = 30.0,
                 env: dict[str, str] | None = None, in_process: str | None = None,
                 **app_settings: Any) -> BastionHandle: ...


@pytest.fixture
def bastion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionFactory]:
    """Factory: ``bastion(config=None, *, command=None, app="app", path="/", tls=True,
    warmup=None, start_timeout=30, env=None, in_process=None, **app_settings)
    -> BastionHandle``.

    ``config`` is a dict or the path of a YAML file (its relative paths are taken from its
    directory); without one, ``command`` (argv, ``{port}`` substituted) becomes the single
    app ``app`` at ``path`` with ``app_settings`` (e.g. ``request_timeout=2``), or
    ``in_process="module:attribute"`` makes it an in-process app (``interface="wsgi"``,
    ``cwd=...`` among the settings). Every
    Bastion started is stopped at teardown, and the test fails if any of its processes
    outlives it.
    """
    handles: list[BastionHandle] = []

    def factory(config: dict[str, Any] | str | os.PathLike[str] | None = None, *,
                command: list[str] | None = None, app: str = "app", path: str = "/",
                tls: bool = True, warmup: str | None = None, start_timeout: float = 30.0,
                env: dict[str, str] | None = None, in_process: str | None = None,
                **app_settings: Any) -> BastionHandle:
        directory = tmp_path_factory.mktemp("bastion")
        handle = start_bastion(directory, config, command=command, app=app, path=path,
                               tls=tls, warmup=warmup, start_timeout=start_timeout, env=env,
                               in_process=in_process, **app_settings)
        handles.append(handle)
        return handle

    yield factory
    problems: list[str] = []
    for handle in handles:
        found = handle.close()
        if found:
            problems.append(f"{handle.directory}:\n" + "\n".join(found))
    if problems:
        pytest.fail("bastion fixture: " + "\n".join(problems), pytrace=False)

