"""Pure unit tests of proxy.units and proxy.config_load (no sockets, no processes but one).

The broken example files in tests/configs/ carry their expectations in comments: a line
``... # expect: TEXT`` means a problem containing TEXT is reported on that very line
(several are joined with `` && ``), and no problem is reported that no comment expects.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bastion.module.spec import PoolSettings, RecycleSettings
from bastion.proxy.config.load import (
    ConfigError,
    Problem,
    check_main,
    config_from_dict,
    load_config,
)
from bastion.proxy.config.model import CertificatePair, Limits, Route
from bastion.proxy.config.units import parse_duration, parse_size

CONFIGS = Path(__file__).parent / "configs"
ROOT = Path(__file__).parent.parent


def problems_of(path: Path | str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return [str(problem) for problem in caught.value.problems]


def dict_problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return [str(problem) for problem in caught.value.problems]


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:8080"}],
        "apps": {"hello": {"command": ["python", "app.py"]}},
    }
    data.update(extra)
    return data


# --- units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0), (30, 30.0), (1.5, 1.5), ("30", 30.0), ("2.5", 2.5), ("500ms", 0.5),
        ("90s", 90.0), ("2m", 120.0), ("29h", 29 * 3600.0), ("1d", 86400.0), ("1.5s", 1.5),
        ("1h30m", 5400.0), (" 2m ", 120.0), ("0s", 0.0), (".5s", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must not be negative"), ("-5s", "must not be negative"),
        ("abc", "invalid duration 'abc'"), ("5x", "invalid duration"), ("", "invalid duration"),
        ("m", "invalid duration"), ("1.5.2s", "invalid duration"), ("2 m", "invalid duration"),
        ("5M", "invalid duration"), (True, "expected a duration, got true"),
        (None, "got null"), ([1], "got a list"), (math.nan, "finite"), (math.inf, "finite"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0), (512, 512), ("512", 512), ("64k", 65536), ("64K", 65536), ("64kb", 65536),
        ("64KB", 65536), ("30m", 30 * 1024**2), ("1g", 1024**3), ("1G", 1024**3),
        ("1.5m", 1572864), ("512b", 512), (2.0, 2), ("2t", 2 * 1024**4),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must not be negative"), ("-1k", "must not be negative"),
        ("30q", "invalid size '30q'"), ("", "invalid size"), ("k", "invalid size"),
        ("1.3k", "whole number of bytes"), (1.5, "whole number of bytes"),
        (True, "expected a size, got true"), (None, "got null"), ({}, "got a mapping"),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(value)


# --- the example files ---------------------------------------------------------------------


def expectations(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if "# expect: " in line:
            for text in line.split("# expect: ", 1)[1].split(" && "):
                found.append((number, text.strip()))
    return found


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("broken-*.yaml")
                                         if p.name != "broken-syntax.yaml"))
def test_broken_example(name: str) -> None:
    path = CONFIGS / name
    expected = expectations(path)
    assert expected, f"{name} has no '# expect:' comments"
    problems = problems_of(path)
    unmatched = list(problems)
    for line, text in expected:
        prefix = f"{path}:{line}: "
        hits = [p for p in unmatched if p.startswith(prefix) and text in p]
        assert hits, f"no problem '{text}' at line {line}; got:\n" + "\n".join(problems)
        unmatched.remove(hits[0])
    assert not unmatched, "unexpected problems:\n" + "\n".join(unmatched)


def test_problems_are_sorted_by_line() -> None:
    problems = problems_of(CONFIGS / "broken-top.yaml")
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == sorted(lines)


def make_full_example(tmp_path: Path) -> Path:
    """The full example, with its certificate files and app directory."""
    config = tmp_path / "bastion.yaml"
    shutil.copy(CONFIGS / "full.yaml", config)
    (tmp_path / "site.pem").write_text("placeholder certificate\n")
    (tmp_path / "site.key").write_text("placeholder key\n")
    (tmp_path / "shop").mkdir()
    return config


def test_full_example_from_the_spec(tmp_path: Path) -> None:
    config = load_config(str(make_full_example(tmp_path)))
    assert config.source == str(tmp_path / "bastion.yaml")
    plain, secure = config.listeners
    assert (plain.host, plain.port, plain.redirect_https, plain.tls) == ("0.0.0.0", 80, True, None)
    assert (secure.host, secure.port, secure.http2, secure.redirect_https) == ("0.0.0.0", 443, True, False)
    assert secure.tls is not None
    assert secure.tls.certificates == (
        CertificatePair(str(tmp_path / "site.pem"), str(tmp_path / "site.key")),
    )
    assert (secure.tls.hsts, secure.tls.client_certificates, secure.tls.client_ca) == (31536000, "none", None)
    assert config.https_port == 443
    assert (config.user, config.admin_socket, config.access_log) == (None, "/run/bastion/admin.sock", None)
    assert (config.workers, config.trusted_proxies, config.detailed_errors) == ("auto", (), False)
    assert config.limits == Limits()  # the example shows the defaults
    assert config.pools == {"default": PoolSettings()}
    shop = config.app("shop")
    assert shop.command == ("gunicorn", "shop.wsgi", "--bind", "127.0.0.1:{port}")
    assert (shop.pool, shop.cwd, shop.path_base) == ("default", str(tmp_path / "shop"), "")
    assert (shop.stdout_log, shop.transport, shop.https_port) == ("/var/log/bastion/shop.log", "tcp", 443)
    assert shop.environment == {"DJANGO_SETTINGS_MODULE": "shop.settings"}
    assert shop.settings == PoolSettings(environment=(("DJANGO_SETTINGS_MODULE", "shop.settings"),))
    assert config.routes == (Route(app="shop", hosts=("shop.example.com",), path="/"),)


def test_full_example_without_its_files_names_each(tmp_path: Path) -> None:
    config = tmp_path / "bastion.yaml"
    shutil.copy(CONFIGS / "full.yaml", config)
    assert problems_of(config) == [
        f"{config}:9: certificate file {tmp_path}/site.pem does not exist",
        f"{config}:9: key file {tmp_path}/site.key does not exist",
        f"{config}:46: apps.shop.cwd: directory {tmp_path}/shop does not exist",
    ]


def test_minimal_example_has_every_default() -> None:
    config = load_config(str(CONFIGS / "minimal.yaml"))
    (listener,) = config.listeners
    assert (listener.host, listener.port, listener.tls, listener.http2) == ("127.0.0.1", 8080, None, True)
    assert listener.address == "127.0.0.1:8080"
    assert config.pools == {"default": PoolSettings()}
    assert (config.workers, config.access_log_format, config.limits) == ("auto", "combined", Limits())
    assert (config.admin_socket, config.user, config.https_port) == ("/run/bastion/admin.sock", None, None)
    (app,) = config.apps
    assert (app.name, app.pool, app.settings, app.cwd, app.stdout_log) == (
        "hello", "default", PoolSettings(), None, None)
    assert (app.path_base, app.transport, app.https_port) == ("", "tcp", None)
    assert config.routes == (Route(app="hello", hosts=(), path="/"),)


def test_pools_and_app_overrides_merge() -> None:
    config = load_config(str(CONFIGS / "pools.yaml"))
    assert config.listeners[0].host == "::" and config.listeners[0].address == "[::]:8080"
    assert config.listeners[0].http2 is False
    web = config.pools["web"]
    assert web == PoolSettings(
        environment=(("TZ", "UTC"), ("WORKERS", "4")), idle_timeout=0.0, processes_per_app=2,
        request_timeout=300.0, startup_time_limit=180.0,  # from the x-slow anchor
        recycle=RecycleSettings(max_age=86400.0, max_memory=512 * 1024**2))
    assert config.pools["batch"] == PoolSettings(start_mode="always")
    assert config.pools["default"] == PoolSettings()
    shop = config.app("Shop.v2")
    assert shop.pool == "web"
    assert shop.command == ("gunicorn", "--workers", "4", "shop.wsgi")
    assert shop.environment == {"TZ": "UTC", "WORKERS": "8", "DEBUG": "0"}
    assert shop.settings.processes_per_app == 3  # the app's own value wins
    assert shop.settings.idle_timeout == 0.0 and shop.settings.request_timeout == 300.0
    assert shop.settings.recycle == RecycleSettings(max_age=86400.0, max_requests=1000,
                                                    max_memory=512 * 1024**2)
    assert (shop.path_base, shop.transport) == ("/shop", "unix")
    assert config.app("blog").settings == web
    assert config.app("jobs").settings == PoolSettings(start_mode="always")
    assert Route("Shop.v2", ("shop.example.com", "*.shop.example.com"), "/shop") in config.routes
    assert Route("blog", ("shop.example.com",), "/blog") in config.routes


def test_yaml_syntax_error_names_the_line() -> None:
    path = CONFIGS / "broken-syntax.yaml"
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:6: invalid YAML: expected ',' or ']'")
    assert "flow sequence at line 5" in problem


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert problems_of(path) == [f"{path}:1: empty configuration; listen and apps are required"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems_of(path) == [f"{path}:0: cannot read the configuration: No such file or directory"]


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: []\napps:\n  caf\xe9: {}\n")
    assert problems_of(path) == [f"{path}:3: the file is not valid UTF-8"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bastion.yaml"
    path.write_text(text)
    return path


def test_worker_timeout_default_and_problems_name_file_and_line(tmp_path: Path) -> None:
    assert config_from_dict(minimal()).worker_timeout == 30.0
    base = 'listen: [{address: "127.0.0.1:8080"}]\napps: {hello: {command: [x]}}\n'
    for value, message in (("0s", "worker_timeout must be more than 0"),
                           ("soon", "worker_timeout"), ("[1]", "worker_timeout")):
        path = write(tmp_path, base + f"workers: 2\nworker_timeout: {value}\n")
        (problem,) = problems_of(path)
        assert problem.startswith(f"{path}:4: ") and message in problem, problem
    path = write(tmp_path, base + "worker_timout: 5s\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:3: ") and "worker_timeout" in problem, problem


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- listen\n- apps\n")
    assert problems_of(path) == [f"{path}:1: the configuration must be a mapping, not a list"]


def test_listen_and_apps_are_required(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\nworkers: 2\n")
    assert problems_of(path) == [f"{path}:2: listen is required", f"{path}:2: apps is required"]


def test_empty_listen_and_apps(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: []\napps: {}\n")
    assert problems_of(path) == [
        f"{path}:1: listen must list at least one address",
        f"{path}:2: apps must define at least one app",
    ]


def test_recursive_alias(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: &a [*a]\napps: {a: {command: [x]}}\n")
    problems = problems_of(path)
    assert problems[0] == f"{path}:1: recursive alias: a value contains itself"


def test_unsafe_tags_are_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: !!python/object:os.system [x]\nworkers: !!python/name:os.system x\n")
    problems = problems_of(path)
    assert f"{path}:1: unsupported YAML tag tag:yaml.org,2002:python/object:os.system" in problems
    assert any(p.startswith(f"{path}:2: invalid YAML: could not determine a constructor")
               for p in problems)


def test_redirect_https_needs_a_tls_listener(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen:\n  - address: "0.0.0.0:80"\n    redirect_https: true\n'
                 "apps: {a: {command: [x]}}\n")
    assert problems_of(path) == [
        f"{path}:2: listen: redirect_https needs a listener with tls to redirect to"]


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("site.pem", "site.key", "ca.pem"):
        (tmp_path / "certs" / name).write_text("x")
    (tmp_path / "app").mkdir()
    path = write(tmp_path, """\
listen:
  - address: "127.0.0.1:8443"
    tls:
      certificates: [{cert: certs/site.pem, key: ./certs/site.key}]
      client_certificates: optional
      client_ca: certs/ca.pem
      hsts: 1d
admin_socket: run/admin.sock
access_log: logs/access.log
apps:
  a: {command: [x], cwd: app, stdout_log: logs/a.log}
""")
    config = load_config(str(path))
    tls = config.listeners[0].tls
    assert tls is not None
    assert tls.certificates[0] == CertificatePair(f"{tmp_path}/certs/site.pem", f"{tmp_path}/certs/site.key")
    assert (tls.client_certificates, tls.client_ca, tls.hsts) == ("optional", f"{tmp_path}/certs/ca.pem", 86400)
    assert (config.admin_socket, config.access_log) == (f"{tmp_path}/run/admin.sock", f"{tmp_path}/logs/access.log")
    app = config.app("a")
    assert (app.cwd, app.stdout_log, app.https_port) == (str(tmp_path / "app"), f"{tmp_path}/logs/a.log", 8443)


def test_unreadable_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "site.pem").write_text("x")
    (tmp_path / "site.key").write_text("x")
    (tmp_path / "site.key").chmod(0)
    real_access = os.access  # root can read anything: pretend it cannot, for this file
    monkeypatch.setattr(os, "access", lambda name, mode: not str(name).endswith("site.key")
                        and real_access(name, mode))
    path = write(tmp_path, 'listen:\n  - address: "127.0.0.1:8443"\n    tls:\n'
                 "      certificates: [{cert: site.pem, key: site.key}]\napps: {a: {command: [x]}}\n")
    assert problems_of(path) == [f"{path}:4: key file {tmp_path}/site.key is not readable"]


# --- config_from_dict ------------------------------------------------------------------------


def test_config_from_dict_defaults_and_source() -> None:
    config = config_from_dict(minimal(), source="<demo>")
    assert config.source == "<demo>"
    assert config.app("hello").settings == PoolSettings()


def test_config_from_dict_reports_line_zero() -> None:
    assert dict_problems({"listen": [{"address": "127.0.0.1:80"}], "workers": 0}) == [
        "<dict>:0: workers must be a positive integer or \"auto\", not 0",
        "<dict>:0: apps is required",
    ]


def test_config_from_dict_rejects_non_string_keys() -> None:
    assert dict_problems(minimal(limits={1: 2})) == ["<dict>:0: key 1 must be a string"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"workers": 4}, 4),
        ({"workers": "auto"}, "auto"),
        ({"worker_timeout": "90s"}, 90.0),
        ({"worker_timeout": 5}, 5.0),
        ({"access_log": "-"}, "-"),
        ({"access_log_format": "json"}, "json"),
        ({"detailed_errors": True}, True),
        ({"user": "root"}, "root"),
        ({"trusted_proxies": ["10.1.2.3/8", "192.168.0.1", "fd00::/8"]},
         ("10.0.0.0/8", "192.168.0.1/32", "fd00::/8")),
        ({"limits": {"max_body_size": "1g", "keepalive_timeout": 0}},
         Limits(max_body_size=1024**3, keepalive_timeout=0.0)),
    ],
)
def test_top_level_settings(extra: dict[str, Any], expected: object) -> None:
    (key,) = extra
    assert getattr(config_from_dict(minimal(**extra)), key) == expected


@pytest.mark.parametrize(
    ("hosts", "path", "route_hosts", "route_path", "path_base"),
    [
        (["Shop.Example.COM."], "/", ("shop.example.com",), "/", ""),
        (["*.example.com", "example.com", "example.com"], "/shop/", ("*.example.com", "example.com"), "/shop", "/shop"),
        (["10.0.0.1", "[::1]"], "/a/b//"[:-1], ("10.0.0.1", "[::1]"), "/a/b", "/a/b"),
    ],
)
def test_hosts_and_path_are_normalised(hosts: list[str], path: str, route_hosts: tuple[str, ...],
                                       route_path: str, path_base: str) -> None:
    config = config_from_dict(minimal(apps={"a": {"command": ["x"], "hosts": hosts, "path": path}}))
    assert config.routes == (Route("a", route_hosts, route_path),)
    assert config.app("a").path_base == path_base


def test_app_settings_override_their_pool() -> None:
    config = config_from_dict(minimal(
        pools={"default": {"max_queue": 5, "environment": {"A": "1", "B": "2"},
                           "recycle": {"max_age": "1h", "max_requests": 10}}},
        apps={"a": {"command": ["x"], "max_queue": 0, "environment": {"B": 3, "C": 1.5},
                    "recycle": {"max_requests": 99}, "user": "root"},
              "b": {"command": ["y"], "path": "/b"}},
    ))
    a, b = config.app("a").settings, config.app("b").settings
    assert a.max_queue == 0 and b.max_queue == 5
    assert dict(a.environment) == {"A": "1", "B": "3", "C": "1.5"}
    assert a.recycle == RecycleSettings(max_age=3600.0, max_requests=99)
    assert b.recycle == RecycleSettings(max_age=3600.0, max_requests=10)
    assert (a.user, b.user) == ("root", None)
    assert b == config.pools["default"]


def test_command_numbers_become_strings() -> None:
    config = config_from_dict(minimal(apps={"a": {"command": ["srv", "--workers", 4, "--t", 1.5]}}))
    assert config.app("a").command == ("srv", "--workers", "4", "--t", "1.5")


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ({"command": "gunicorn app:app"}, 'apps.a.command must be an argv list, e.g. ["gunicorn", "app:app"]'),
        ({"command": "unbalanced 'quote"}, 'apps.a.command must be an argv list, e.g. ["gunicorn", "app:app"]'),
        ({"command": ["", "x"]}, "apps.a.command: the program name must not be empty"),
        ({"command": ["x", None]}, "apps.a.command: each argument must be a string, not null"),
        ({"command": ["x"], "pool": "web"}, "app 'a' names unknown pool 'web'"),
        ({"command": ["x"], "cwd": "/nonexistent-bastion-dir"},
         "apps.a.cwd: directory /nonexistent-bastion-dir does not exist"),
        ({"command": ["x"], "environment": {"A=B": "1"}}, "apps.a.environment: 'A=B' is not a valid"),
        ({"command": ["x"], "hosts": ["shop.example.com:8080"]}, "is not a host name"),
        ({"command": ["x"], "hosts": ["-bad.example.com"]}, "is not a host name"),
        ({"command": ["x"], "path": "/a?b"}, "apps.a.path must be a plain path"),
        ({"command": ["x"], "stdout_log": ""}, "apps.a.stdout_log must be a file name"),
        ({"command": ["x"], "user": "no-such-user-for-bastion"}, "apps.a.user must name an existing user"),
        ({"command": ["x"], "request_timeout": "0s"}, "apps.a.request_timeout must be more than 0"),
    ],
)
def test_app_problems(app: dict[str, Any], message: str) -> None:
    (problem,) = dict_problems(minimal(apps={"a": app}))
    assert problem.startswith("<dict>:0: ") and message in problem


def test_every_app_name_character_rule() -> None:
    config = config_from_dict(minimal(apps={"A.b_c-1": {"command": ["x"]}}))
    assert config.apps[0].name == "A.b_c-1"
    (problem,) = dict_problems(minimal(apps={"_a": {"command": ["x"]}}))
    assert "app name '_a' must start with a letter or digit" in problem


def test_ipv6_and_host_name_listeners() -> None:
    config = config_from_dict(minimal(listen=[{"address": "[::1]:80"}, {"address": "localhost:81"}]))
    assert [(lis.host, lis.port, lis.address) for lis in config.listeners] == [
        ("::1", 80, "[::1]:80"), ("localhost", 81, "localhost:81")]


def test_same_address_twice_is_a_problem() -> None:
    assert dict_problems(minimal(listen=[{"address": "[::]:80"}, {"address": "[0::0]:80"}])) == [
        "<dict>:0: listen[1].address [::]:80 is already used by listen[0]"]
    config = config_from_dict(minimal(listen=[{"address": "[0:0::1]:80"}, {"address": "LocalHost:81"}]))
    assert [lis.address for lis in config.listeners] == ["[::1]:80", "localhost:81"]


# --- Problem, ConfigError, check_main ---------------------------------------------------------


def test_problem_and_error_text() -> None:
    problem = Problem("a.yaml", 3, "workers must be a positive integer")
    assert str(problem) == "a.yaml:3: workers must be a positive integer"
    error = ConfigError([problem, Problem("a.yaml", 4, "x")])
    assert str(error) == "a.yaml:3: workers must be a positive integer\na.yaml:4: x"
    assert error.problems[1].line == 4


def test_check_main_ok(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(CONFIGS / "minimal.yaml")
    assert check_main(path) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{path}: configuration OK\n", "")


def test_check_main_problems(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(CONFIGS / "broken-duplicates.yaml")
    assert check_main(path) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"{path}:5: duplicate key 'workers' (first at line 4)\n"
                   f"{path}:9: duplicate key 'command' (first at line 8)\n")


def test_module_entry_point(tmp_path: Path) -> None:
    good = make_full_example(tmp_path)
    run = [sys.executable, "-m", "bastion.proxy.config.load"]
    done = subprocess.run([*run, str(good)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{good}: configuration OK\n", "")
    bad = str(CONFIGS / "broken-syntax.yaml")
    done = subprocess.run([*run, bad], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"{bad}:6: invalid YAML: ")
