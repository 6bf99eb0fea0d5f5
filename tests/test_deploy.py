"""The files in deploy/: the example configuration loads, the unit and logrotate say what they must.

``deploy/bastion.yaml`` names production paths (Let's Encrypt certificates, /srv/...,
the user www-data) that do not exist here, so the test copies it to a temporary
directory and rewrites exactly those paths to trustme-generated certificates, empty
directories and the current user, keeping everything else as written.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import trustme
import yaml

from bastion.proxy.config.load import config_from_dict, load_config
from bastion.proxy.control.main import in_process, worker_count
from bastion.proxy.control.worker import alpn_protocols

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _localised(tmp_path: Path) -> Path:
    """deploy/bastion.yaml with certificates, directories, logs and users made local."""
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "bastion.yaml").read_text())
    ca = trustme.CA()
    leaf = ca.issue_cert("example.com", "www.example.com")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    me = pwd.getpwuid(os.getuid()).pw_name
    for listener in data["listen"]:
        for pair in listener.get("tls", {}).get("certificates", []):
            pair["cert"], pair["key"] = str(cert), str(key)
    if data.get("user"):
        data["user"] = me
    data["admin_socket"] = str(tmp_path / "run" / "admin.sock")
    data["access_log"] = str(tmp_path / "log" / "access.log")
    for pool in data.get("pools", {}).values():
        if pool.get("user"):
            pool["user"] = me
    for name, app in data["apps"].items():
        if "cwd" in app:
            (tmp_path / "srv" / name).mkdir(parents=True)
            app["cwd"] = str(tmp_path / "srv" / name)
        if "stdout_log" in app:
            app["stdout_log"] = str(tmp_path / "log" / f"{name}.log")
        if app.get("user"):
            app["user"] = me
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_example_config_loads(tmp_path: Path) -> None:
    path = _localised(tmp_path)
    config = load_config(str(path))
    # and the same data through the dict entry point
    assert config_from_dict(yaml.safe_load(path.read_text())).apps == config.apps

    plain, tls = config.listeners
    assert (plain.port, plain.redirect_https, plain.tls) == (80, True, None)
    assert tls.port == 443 and tls.tls is not None and not tls.redirect_https
    assert tls.tls.hsts == 31536000
    assert config.https_port == 443

    assert {app.name for app in config.apps} == {"shop", "api"}
    assert {app.pool for app in config.apps} == {"web"}
    assert "web" in config.pools
    shop, api = config.app("shop"), config.app("api")
    assert shop.command[0].endswith("gunicorn") and "shop.wsgi:application" in shop.command
    assert any("{port}" in arg for arg in shop.command)
    assert api.command[0].endswith("uvicorn") and "api.main:app" in api.command
    assert any("{port}" in arg for arg in api.command)
    assert shop.path_base == "" and api.path_base == "/api"
    assert shop.environment["DJANGO_SETTINGS_MODULE"] == "shop.settings.production"
    assert api.environment["PYTHONUNBUFFERED"] == "1"  # inherited from the pool
    assert shop.settings.start_mode == "always"
    assert api.settings.request_timeout == 30.0  # the app's own setting wins
    assert shop.settings.request_timeout == 60.0
    # gunicorn and uvicorn must stop before Bastion's SIGKILL
    assert shop.settings.shutdown_time_limit > 10
    assert shop.https_port == 443
    routes = {route.app: route for route in config.routes}
    assert routes["api"].path == "/api" and "example.com" in routes["api"].hosts


def _comment(text: str, key: str) -> str:
    """The comment at the end of the first line setting ``key`` (indented or not)."""
    match = re.search(rf"^\s*{re.escape(key)}:[^#\n]*#\s*(.*)$", text, re.M)
    assert match, f"no commented line for {key}"
    return match.group(1)


def test_example_config_comments_match_what_it_configures(tmp_path: Path) -> None:
    """``bastion check --no-files`` accepts the file as it is, and its comments' claims
    about workers, HTTP/2 and the user drop are what the settings do."""
    path = DEPLOY / "bastion.yaml"
    done = subprocess.run([sys.executable, "-m", "bastion", "check", "--no-files", "-c",
                           str(path)], cwd=str(DEPLOY.parent), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = load_config(str(path), files=False)
    text = path.read_text()
    # workers
    workers = _comment(text, "workers")
    if "per core" in workers:
        assert config.workers == "auto"
    else:
        count = re.search(r"(\d+) proxy worker", workers)
        assert count and config.workers == int(count.group(1)), workers
    assert worker_count(config) >= 1
    # HTTP/2
    tls = [lis for lis in config.listeners if lis.tls is not None]
    http2 = _comment(text, "http2")
    claims_h2 = "HTTP/2" in http2 and "only" not in http2
    assert tls and all(lis.http2 == claims_h2 for lis in tls), http2
    assert all(("h2" in alpn_protocols(lis)) == claims_h2 for lis in tls)
    # the user drop: workers become ``user``, so they are processes, not the main one
    user = _comment(text, "user")
    drop = re.search(r"drop to (\S+)", user)
    if drop:
        assert config.user == drop.group(1), user
        assert not in_process(config)
    else:
        assert config.user is None, user
    # no claim of a missing feature survives
    for stale in ("not built yet", "still speaks", "0.1 runs", "0.1 still"):
        assert stale not in text, stale
    # every app's pool user is a user the comments promise apps run as
    assert all(app.settings.user == "www-data" for app in config.apps)
    assert "apps run as this user" in _comment(text, "    user")


def test_example_config_has_only_production_paths() -> None:
    text = (DEPLOY / "bastion.yaml").read_text()
    assert "/etc/letsencrypt/live/example.com/fullchain.pem" in text
    assert "detailed_errors: false" in text


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (DEPLOY / "bastion.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_file() -> None:
    unit = _unit()
    service = unit["Service"]

    def one(key: str) -> str:
        assert key in service, f"{key}= missing from [Service]"
        return service[key][-1]

    assert one("Type") == "notify"
    assert one("ExecStart") == "/usr/local/bin/bastion serve -c /etc/bastion/bastion.yaml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillMode") == "mixed"
    assert int(one("TimeoutStopSec")) >= 45  # request grace (30 s) + shutdown_time_limit
    assert one("Restart") == "on-failure"
    assert one("RuntimeDirectory") == "bastion"
    assert int(one("LimitNOFILE")) >= 65536
    assert "User" not in service  # root: binds 80/443 and launches apps as pool users
    caps = one("CapabilityBoundingSet").split()
    for cap in ("CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"):
        assert cap in caps
    assert one("NoNewPrivileges") == "true"
    assert "AF_INET" in one("RestrictAddressFamilies").split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_logrotate_reopens_with_sigusr1() -> None:
    lines = (DEPLOY / "logrotate").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "/var/log/bastion/*.log" in text
    post = text[text.index("postrotate"):text.index("endscript")]
    assert "USR1" in post and "MainPID" in post
    assert "copytruncate" not in text  # Bastion reopens its files


def test_readme_names_the_files() -> None:
    text = (DEPLOY / "README.md").read_text()
    for name in ("bastion.service", "bastion.yaml", "logrotate"):
        assert name in text
