"""Load and validate Bastion's YAML configuration into a ``proxy.config.Config``.

Theory of operation
-------------------
Loading happens in two passes, and only the second knows what the settings mean.

1. *Reading.* ``yaml.SafeLoader`` composes the file into a node graph (no Python objects
   yet), which ``_from_yaml`` turns into a tree of ``_Node`` values: mappings become
   ``dict[str, _Node]`` (keys are kept as written, so ``yes:`` stays ``"yes"``), sequences
   ``list[_Node]`` and scalars the SafeLoader's own values (int, float, bool, None, str).
   Every ``_Node`` remembers the 1-based line of its value and of the key it belongs to.
   Merge keys (``<<: *defaults``) are expanded, duplicate keys and recursive aliases are
   problems. ``config_from_dict`` builds the same tree from Python data with line 0.

2. *Checking.* A ``_Checker`` walks the tree and collects ``Problem``s instead of stopping
   at the first one. Flat sections are described by tables of rules (``_LIMIT_RULES``,
   ``_POOL_RULES``, ...): a rule turns one node into a typed value or records a problem
   and returns ``_BAD``. Keys no table knows get a "did you mean" suggestion. The parts
   that need more than one key (listeners and TLS, pools, apps, route conflicts) have
   their own small functions. Only when no problem was found is a ``Config`` built; else
   ``ConfigError`` carries all of them, each printed as ``FILE:LINE: message``.

Relative file names in the file (certificates, keys, ``client_ca``, ``cwd``, logs, the
admin socket) are taken relative to the directory of the configuration file (to the
current directory for ``config_from_dict``) and stored as absolute paths. Top-level keys
starting with ``x-`` are ignored, so they can hold anchors for merge keys.

An app's settings are its pool's, with the app's own pool keys replacing them; the
exceptions are ``environment``, ``recycle`` and ``health_check``, which are merged key by
key (``health_check: null`` on an app turns its pool's check off). A pool's ``buffering``
and ``compression`` are the edge's, not the module's: they go to ``Config.offload`` by
pool name, and its apps share them.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

import yaml

from bastion.module.spec import (
    POOL_SETTING_NAMES,
    AppSpec,
    HealthCheck,
    PoolSettings,
    RecycleSettings,
)

from .model import (
    Buffering,
    CertificatePair,
    Compression,
    Config,
    HealthSettings,
    Limits,
    Listener,
    Offload,
    Route,
    StaticLocation,
    TLSSettings,
)
from .units import _show, parse_duration, parse_size


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, at a 1-based line (0 when there are no lines)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` lists everything found wrong."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- pass 1: YAML or Python data to a tree of _Node ------------------------------------


@dataclass(frozen=True)
class _Node:
    """A value from the file: a scalar, ``dict[str, _Node]`` or ``list[_Node]``."""

    value: Any
    line: int  # where the value starts
    key_line: int  # where the key it is the value of starts (= line for list items)


_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_PLAIN_TAGS: Final = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _from_yaml(text: str, file: str, problems: list[Problem]) -> _Node | None:
    """Compose ``text``; None for an empty document; ConfigError for broken YAML.

    Duplicate keys, recursive aliases and keys that are not names go to ``problems``.
    """
    loader = yaml.SafeLoader(text)

    def convert(node: yaml.Node, key_line: int, active: frozenset[int]) -> _Node:
        line = node.start_mark.line + 1
        if id(node) in active:
            problems.append(Problem(file, line, "recursive alias: a value contains itself"))
            return _Node(None, line, key_line)
        active = active | {id(node)}
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_TAGS:
            problems.append(Problem(file, line, f"unsupported YAML tag {node.tag}"))
        if isinstance(node, yaml.MappingNode):
            return _Node(mapping(node, active), line, key_line)
        if isinstance(node, yaml.SequenceNode):
            return _Node([convert(item, item.start_mark.line + 1, active) for item in node.value],
                          line, key_line)
        try:
            return _Node(loader.construct_object(node, deep=True), line, key_line)
        except yaml.constructor.ConstructorError as exc:
            problems.append(Problem(file, line, f"invalid YAML: {exc.problem}"))
            return _Node(None, line, key_line)

    def mapping(node: yaml.MappingNode, active: frozenset[int]) -> dict[str, _Node]:
        own = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
        seen: dict[str, int] = {}
        for key_node, _ in own:
            if isinstance(key_node, yaml.ScalarNode):
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in seen:
                    problems.append(Problem(file, line, f"duplicate key '{key}' (first at line {seen[key]})"))
                seen.setdefault(key, line)
        loader.flatten_mapping(node)  # expands merge keys; own keys come last and win
        result: dict[str, _Node] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(file, line, "a key must be a plain name, not a list or mapping"))
                continue
            result.pop(key_node.value, None)  # keep the order of the winning keys
            result[key_node.value] = convert(value_node, line, active)
        return result

    try:
        root = loader.get_single_node()
        tree = None if root is None else convert(root, root.start_mark.line + 1, frozenset())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = exc.problem or exc.context or "unreadable"
        if exc.context and exc.problem and exc.context_mark is not None:
            what += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError([Problem(file, line, f"invalid YAML: {what}")]) from None
    except yaml.YAMLError as exc:  # e.g. a reader error for a control character
        raise ConfigError([Problem(file, 1, f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    return tree


def _from_python(data: object, problems: list[Problem], source: str) -> _Node:
    """The ``_Node`` tree of plain Python data (every line is 0)."""
    if isinstance(data, dict):
        result: dict[str, _Node] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                problems.append(Problem(source, 0, f"key {key!r} must be a string"))
                continue
            result[key] = _from_python(value, problems, source)
        return _Node(result, 0, 0)
    if isinstance(data, list | tuple):
        return _Node([_from_python(item, problems, source) for item in data], 0, 0)
    return _Node(data, 0, 0)


# --- pass 2: the checker and its rules --------------------------------------------------


class _Bad:
    """The result of a rule that recorded a problem."""


_BAD: Final = _Bad()
Rule = Callable[["_Checker", _Node, str], Any]


# Given an admin socket path: the listening addresses of the Bastion running there.
Running = Callable[[str], set[str]]


class _Checker:
    """Collects problems while converting nodes; ``path`` names a key, e.g. ``limits.x``."""

    def __init__(self, file: str, base_dir: str, files: bool = True,
                 start: bool = False, running: Running | None = None) -> None:
        self.file = file
        self.running = running  # the addresses a running Bastion holds, by admin socket
        self.base_dir = base_dir
        self.files = files  # check that files and directories exist
        self.start = start  # ``bastion check``: also what only fails at start
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}  # "listen[0]" / "metrics_listen" -> line

    def add(self, line: int, message: str) -> _Bad:
        self.problems.append(Problem(self.file, line, message))
        return _BAD

    def mapping(self, node: _Node, path: str) -> dict[str, _Node] | None:
        if isinstance(node.value, dict):
            return node.value
        self.add(node.line, f"{path or 'the configuration'} must be a mapping, not {_show(node.value)}")
        return None

    def sequence(self, node: _Node, path: str, example: str) -> list[_Node] | None:
        if isinstance(node.value, list):
            return node.value
        self.add(node.line, f"{path} must be a list, e.g. {example}, not {_show(node.value)}")
        return None

    def fields(self, node: _Node, path: str, rules: dict[str, Rule],
               also: Iterable[str] = ()) -> dict[str, Any]:
        """Convert a mapping's keys by ``rules``; keys in ``also`` are known but left out."""
        entries = self.mapping(node, path)
        if entries is None:
            return {}
        known = [*rules, *also]
        values: dict[str, Any] = {}
        for key, child in entries.items():
            if key in rules:
                value = rules[key](self, child, _join(path, key))
                if value is not _BAD:
                    values[key] = value
            elif key not in known and not (path == "" and key.startswith("x-")):
                self.unknown(key, child, path, known)
        return values

    def unknown(self, key: str, node: _Node, path: str, known: list[str]) -> None:
        where = f"in {path}" if path else "at the top level"
        message = f"unknown key '{key}' {where}"
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            message += f"; did you mean '{close[0]}'?"
        self.add(node.key_line, message)

    def require(self, values: dict[str, Any], entries: dict[str, _Node] | None, node: _Node,
                path: str, key: str, what: str) -> bool:
        """Record a problem when ``key`` is missing (a bad value was reported already)."""
        if key in values or (entries is not None and key in entries):
            return key in values
        if entries is not None:
            self.add(node.key_line, f"{_join(path, key)} is required ({what})")
        return False

    def absolute(self, name: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(name)))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _scalar(convert: Callable[[Any], Any]) -> Rule:
    """A rule from a converter that raises ValueError("must be ...") or a units message."""

    def rule(checker: _Checker, node: _Node, path: str) -> Any:
        try:
            return convert(node.value)
        except ValueError as exc:
            text = str(exc)
            sep = " " if text.startswith("must ") else ": "
            return checker.add(node.line, f"{path}{sep}{text}")

    return rule


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, not {_show(value)}")


def _integer(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"must be {kind}, not {_show(value)}")

    return convert


def _choice(*options: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str) and value in options:
            return value
        listed = ", ".join(options[:-1]) + f" or {options[-1]}"
        raise ValueError(f"must be {listed}, not {_show(value)}")

    return convert


def _text(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"must be a non-empty string, not {_show(value)}")


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0, not {_show(value)}")
    return seconds


def _user(value: object) -> str | None:
    if value is None:
        return None
    name = _text(value)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"must name an existing user; '{name}' does not exist here") from None
    return name


def _user_rule(checker: _Checker, node: _Node, path: str) -> Any:
    """A user name that must exist here (any non-empty name with ``files=False``)."""
    if not checker.files:
        return _scalar(lambda value: None if value is None else _text(value))(checker, node, path)
    return _scalar(_user)(checker, node, path)


def _workers(value: object) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f'must be a positive integer or "auto", not {_show(value)}')


def _cidrs(checker: _Checker, node: _Node, path: str) -> Any:
    items = checker.sequence(node, path, '["10.0.0.0/8"]')
    if items is None:
        return _BAD
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(str(item.value), strict=False)))
        except ValueError:
            checker.add(item.line, f"{path}: {_show(item.value)} is not an IP network (CIDR)")
    return tuple(networks)


def _path_rule(optional: bool, dash: bool = False) -> Rule:
    """A file name, made absolute; None when ``optional``; "-" kept when ``dash``."""

    def rule(checker: _Checker, node: _Node, path: str) -> Any:
        if node.value is None and optional:
            return None
        if dash and node.value == "-":
            return "-"
        if not isinstance(node.value, str) or not node.value.strip():
            return checker.add(node.line, f"{path} must be a file name, not {_show(node.value)}")
        return checker.absolute(node.value)

    return rule


def _existing_file(label: str) -> Rule:
    """A file that must exist and be readable, e.g. a certificate."""

    def rule(checker: _Checker, node: _Node, path: str) -> Any:
        name = _path_rule(optional=False)(checker, node, path)
        if name is _BAD or not checker.files:
            return name
        if not os.path.exists(name):
            return checker.add(node.line, f"{label} file {name} does not exist")
        if not os.path.isfile(name):
            return checker.add(node.line, f"{label} file {name} is not a regular file")
        if not os.access(name, os.R_OK):
            return checker.add(node.line, f"{label} file {name} is not readable")
        return name

    return rule


def _directory(checker: _Checker, node: _Node, path: str) -> Any:
    name = _path_rule(optional=True)(checker, node, path)
    if name is None or name is _BAD or not checker.files:
        return name
    if not os.path.isdir(name):
        return checker.add(node.line, f"{path}: directory {name} does not exist")
    return name


_ENV_NAME = re.compile(r"[^=\0]+")


def _environment(checker: _Checker, node: _Node, path: str) -> Any:
    entries = checker.mapping(node, path)
    if entries is None:
        return _BAD
    pairs: list[tuple[str, str]] = []
    for name, item in entries.items():
        value = item.value
        if not _ENV_NAME.fullmatch(name):
            checker.add(item.key_line, f"{path}: {name!r} is not a valid environment variable name")
        elif isinstance(value, str):
            pairs.append((name, value))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            pairs.append((name, str(value)))
        else:
            checker.add(item.line, f'{path}.{name} must be a string, not {_show(value)} (quote it: "...")')
    return tuple(pairs)


def _section(rules: dict[str, Rule]) -> Rule:
    """A nested mapping checked by ``rules``; the result is a dict of the keys given."""

    def rule(checker: _Checker, node: _Node, path: str) -> Any:
        if isinstance(node.value, dict):
            return checker.fields(node, path, rules)
        checker.mapping(node, path)  # records the problem
        return _BAD

    return rule


_IMPORT_STRING = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _import_string(value: object) -> str:
    """``package.module:attribute`` (the attribute may be dotted, as uvicorn allows)."""
    text = _text(value)
    if not _IMPORT_STRING.fullmatch(text):
        raise ValueError(f"must be 'package.module:attribute', e.g. 'api.main:app', not {text!r}")
    return text


def _command(checker: _Checker, node: _Node, path: str) -> Any:
    if isinstance(node.value, str):
        try:
            words = shlex.split(node.value)
        except ValueError:  # unbalanced quotes
            words = []
        example = json.dumps(words) if words else '["gunicorn", "app:app"]'
        return checker.add(node.line, f"{path} must be an argv list, e.g. {example}")
    items = checker.sequence(node, path, '["gunicorn", "app:app"]')
    if items is None:
        return _BAD
    if not items:
        return checker.add(node.line, f"{path} must not be empty")
    argv: list[str] = []
    for item in items:
        if isinstance(item.value, int | float) and not isinstance(item.value, bool):
            argv.append(str(item.value))
        elif isinstance(item.value, str) and (item.value or argv):
            argv.append(item.value)
        elif item.value == "":
            checker.add(item.line, f"{path}: the program name must not be empty")
        else:
            checker.add(item.line, f"{path}: each argument must be a string, not {_show(item.value)}")
    return tuple(argv)


_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _is_hostname(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _hosts(checker: _Checker, node: _Node, path: str) -> Any:
    items = checker.sequence(node, path, '["shop.example.com", "*.example.com"]')
    if items is None:
        return _BAD
    hosts: list[str] = []
    for item in items:
        name = item.value.strip().lower().rstrip(".") if isinstance(item.value, str) else ""
        bare = name[2:] if name.startswith("*.") else name
        if name == "*":
            checker.add(item.line, f"{path}: leave hosts out to match any host, instead of '*'")
        elif not (_is_hostname(bare) or (bare == name and _is_ip(name.strip("[]")))):
            checker.add(item.line, f"{path}: {_show(item.value)} is not a host name or '*.domain' pattern")
        elif name not in hosts:
            hosts.append(name)
    return tuple(hosts)


def _url_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f'must start with "/", not {_show(value)}')
    segments = value.strip("/").split("/")
    if any(c in value for c in "?# \t") or "//" in value or {".", ".."} & set(segments):
        raise ValueError(f"must be a plain path such as /shop, not {_show(value)}")
    return value.rstrip("/") or "/"


def _request_path(value: object) -> str:
    """A request target in origin form: ``/health``, ``/status?full=1``."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f'must start with "/", not {_show(value)}')
    if "#" in value or any(c <= " " or c == "\x7f" for c in value):
        raise ValueError(f"must be a path without spaces, control characters or '#', "
                         f"not {_show(value)}")
    return value


def _health_check(checker: _Checker, node: _Node, path: str) -> Any:
    """``null`` (off) or a mapping of ``_HEALTH_RULES`` (missing keys: their defaults)."""
    if node.value is None:
        return None
    if isinstance(node.value, dict):
        return checker.fields(node, path, _HEALTH_RULES)
    checker.add(node.line, f"{path} must be a mapping such as {{path: /health, interval: 10s, "
                f"timeout: 2s, failures: 3}} or null, not {_show(node.value)}")
    return _BAD


def _node_health_path(value: object) -> str | None:
    """``health.path``: an absolute path without a query, or null (not answered)."""
    if value is None:
        return None
    path = _request_path(value)
    if "?" in path:
        raise ValueError(f"must be a path without a query, not {_show(value)}")
    return path


def _app_names(checker: _Checker, node: _Node, path: str) -> Any:
    items = checker.sequence(node, path, "[shop, api]")
    if items is None:
        return _BAD
    names = []
    for item in items:
        if isinstance(item.value, str) and item.value:
            names.append(item.value)
        else:
            checker.add(item.line, f"{path}: {_show(item.value)} is not an app name")
    return tuple(names)


def _hsts(value: object) -> int | None:
    return None if value is None else int(parse_duration(value))


def _address(value: object) -> tuple[str, int]:
    example = 'host:port, e.g. "0.0.0.0:443" or "[::]:443"'
    if not isinstance(value, str):
        raise ValueError(f"must be {example}, not {_show(value)}")
    match = re.fullmatch(r"\[([^\]]*)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if match is None:
        raise ValueError(f"must be {example}, not {_show(value)}")
    v6, v6_port, host, port_text = match.groups()
    port = int(v6_port or port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6)
        except ValueError:
            raise ValueError(f"[{v6}] is not an IPv6 address") from None
        return str(ipaddress.IPv6Address(v6)), port
    if not host:
        raise ValueError(f'the host is missing; use "0.0.0.0:{port}" (all IPv4) or "[::]:{port}" (all IPv6)')
    if _is_ip(host):
        return str(ipaddress.ip_address(host)), port
    if not _is_hostname(host.lower()):
        raise ValueError(f"{host!r} is not an IP address or host name")
    return host.lower(), port


def _metrics_address(value: object) -> str | None:
    """``metrics_listen``: host:port, or a bare port on the loopback interface."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"127.0.0.1:{value}"
    elif isinstance(value, str) and value.strip().lstrip(":").isdigit():
        value = f"127.0.0.1:{value.strip().lstrip(':')}"
    host, port = _address(value)
    return Listener(host, port).address


def _certificates(checker: _Checker, node: _Node, path: str) -> Any:
    items = checker.sequence(node, path, "[{cert: site.pem, key: site.key}]")
    if items is None:
        return _BAD
    if not items:
        return checker.add(node.line, f"{path} must list at least one {{cert, key}} pair")
    pairs: list[CertificatePair] = []
    for index, item in enumerate(items):
        item_path = f"{path}[{index}]"
        values = checker.fields(item, item_path, _CERT_RULES)
        entries = item.value if isinstance(item.value, dict) else None
        has_cert = checker.require(values, entries, item, item_path, "cert", "a PEM certificate chain")
        has_key = checker.require(values, entries, item, item_path, "key", "its PEM private key")
        if has_cert and has_key:
            pairs.append(CertificatePair(values["cert"], values["key"]))
    return tuple(pairs) if len(pairs) == len(items) else _BAD


def _tls(checker: _Checker, node: _Node, path: str) -> Any:
    values = checker.fields(node, path, _TLS_RULES)
    entries = node.value if isinstance(node.value, dict) else None
    ok = checker.require(values, entries, node, path, "certificates", "a list of {cert, key}")
    mode = values.get("client_certificates", "none")
    if mode != "none" and "client_ca" not in values and not (entries and "client_ca" in entries):
        checker.add(entries["client_certificates"].line if entries else node.line,
                    f"{path}.client_certificates: {mode} needs client_ca, the CA file to verify them")
        ok = False
    if not ok or entries is None or len(values) < len(entries):
        return _BAD
    return TLSSettings(**values)


_LIMIT_RULES: Final[dict[str, Rule]] = {
    "max_body_size": _scalar(parse_size),
    "max_header_size": _scalar(parse_size),
    "header_timeout": _scalar(_positive_duration),
    "body_timeout": _scalar(_positive_duration),
    "keepalive_timeout": _scalar(parse_duration),
    "max_connections": _scalar(_integer(1)),
    "buffer_memory": _scalar(parse_size),
}
_RECYCLE_RULES: Final[dict[str, Rule]] = {
    "max_age": _scalar(parse_duration),
    "max_requests": _scalar(_integer(0)),
    "max_memory": _scalar(parse_size),
}
_HEALTH_RULES: Final[dict[str, Rule]] = {
    "path": _scalar(_request_path),
    "interval": _scalar(_positive_duration),
    "timeout": _scalar(_positive_duration),
    "failures": _scalar(_integer(1)),
}
_POOL_RULES: Final[dict[str, Rule]] = {
    "user": _user_rule,
    "environment": _environment,
    "start_mode": _scalar(_choice("on_demand", "always")),
    "idle_timeout": _scalar(parse_duration),
    "startup_time_limit": _scalar(_positive_duration),
    "shutdown_time_limit": _scalar(parse_duration),
    "request_timeout": _scalar(_positive_duration),
    "rapid_fails_per_minute": _scalar(_integer(0)),
    "processes_per_app": _scalar(_integer(1)),
    "max_concurrency": _scalar(_integer(0)),
    "max_queue": _scalar(_integer(0)),
    "recycle": _section(_RECYCLE_RULES),
    "health_check": _health_check,
}
if set(_POOL_RULES) != POOL_SETTING_NAMES:  # keep the table in step with module.spec
    raise RuntimeError(f"_POOL_RULES differs from PoolSettings: {set(_POOL_RULES) ^ POOL_SETTING_NAMES}")



def _level(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise ValueError(f"must be an integer from {low} to {high}, not {_show(value)}")

    return convert


_MEDIA_TYPE = re.compile(r"(\*/\*|[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*))")


def _media_types(checker: _Checker, node: _Node, path: str) -> Any:
    items = checker.sequence(node, path, '["text/*", "application/json"]')
    if items is None:
        return _BAD
    types: list[str] = []
    for item in items:
        value = item.value.strip().lower() if isinstance(item.value, str) else None
        if value is None or not _MEDIA_TYPE.fullmatch(value):
            checker.add(item.line, f"{path}: {_show(item.value)} is not a media type such as "
                        "text/html or text/*")
        elif value not in types:
            types.append(value)
    return tuple(types)


_BUFFERING_RULES: Final[dict[str, Rule]] = {
    "request": _scalar(parse_size),
    "response": _scalar(parse_size),
}
_COMPRESSION_RULES: Final[dict[str, Rule]] = {
    "enabled": _scalar(_boolean),
    "min_size": _scalar(parse_size),
    "types": _media_types,
    "level": _scalar(_level(1, 9)),
    "brotli_level": _scalar(_level(0, 11)),
}


def _switch_or_section(rules: dict[str, Rule], example: str) -> Rule:
    """``off``/``false`` (``{"enabled": False}``), ``on``/``true`` (the defaults) or a
    mapping checked by ``rules``."""

    def rule(checker: _Checker, node: _Node, path: str) -> Any:
        value = node.value
        if isinstance(value, str) and value.strip().lower() in ("off", "on"):
            value = value.strip().lower() == "on"
        if isinstance(value, bool):
            return {} if value else {"enabled": False}
        if isinstance(value, dict):
            return checker.fields(node, path, rules)
        return checker.add(node.line, f"{path} must be off, on or a mapping such as "
                           f"{example}, not {_show(value)}")

    return rule


_OFFLOAD_RULES: Final[dict[str, Rule]] = {
    "buffering": _switch_or_section(_BUFFERING_RULES, "{request: 64k, response: 1m}"),
    "compression": _switch_or_section(_COMPRESSION_RULES, "{min_size: 1k, level: 4}"),
}


def _offload(values: dict[str, Any]) -> Offload:
    """The ``Offload`` of a pool from its checked ``buffering`` / ``compression`` keys."""
    buffering = dict(values.get("buffering", {}))
    if buffering.pop("enabled", True) is False:
        buffering = {"request": 0, "response": 0}
    return Offload(buffering=Buffering(**buffering),
                   compression=Compression(**values.get("compression", {})))


def _pool_only(checker: _Checker, node: _Node, path: str) -> Any:
    """``buffering`` / ``compression`` on an app: a problem that says where they go."""
    key = path.rsplit(".", 1)[-1]
    return checker.add(node.key_line, f"{path}: {key} is set per pool (pools.NAME.{key}), "
                       "not per app; put the app in a pool that has it")


_APP_RULES: Final[dict[str, Rule]] = {
    **_POOL_RULES,
    "buffering": _pool_only,
    "compression": _pool_only,
    "pool": _scalar(_text),
    "hosts": _hosts,
    "path": _scalar(_url_path),
    "command": _command,
    "cwd": _directory,
    "stdout_log": _path_rule(optional=True),
    "transport": _scalar(_choice("tcp", "unix")),
    "websockets": _scalar(_boolean),
    "hosting_model": _scalar(_choice("out_of_process", "in_process")),
    "app": _scalar(_import_string),
    "interface": _scalar(_choice("asgi", "wsgi")),
    "threads": _scalar(_integer(1)),
}
# What an in-process app cannot use: it has no process of its own.
_NOT_IN_PROCESS: Final[dict[str, str]] = {
    "command": "the app is imported from `app` instead",
    "processes_per_app": "it runs in every proxy worker: see workers",
    "transport": "there is no connection to the app",
    "stdout_log": "it writes to Bastion's own output",
    # Every worker loads it when it starts and keeps it until it stops: there is no
    # on-demand start, and a Python app cannot be unloaded from a process.
    "start_mode": "every worker loads it as it starts and keeps it loaded; use "
                  "hosting_model: out_of_process for an app started on demand",
    "idle_timeout": "it stays loaded in every worker: an imported Python app cannot be "
                    "unloaded to free its memory; use hosting_model: out_of_process for "
                    "an app stopped when idle",
}
_IN_PROCESS_ONLY: Final[tuple[str, ...]] = ("app", "interface", "threads")
_NODE_HEALTH_RULES: Final[dict[str, Rule]] = {
    "path": _scalar(_node_health_path),
    "drain_delay": _scalar(parse_duration),
    "require_apps": _app_names,
}
_TOP_RULES: Final[dict[str, Rule]] = {
    "user": _user_rule,
    "admin_socket": _path_rule(optional=False),
    "access_log": _path_rule(optional=True, dash=True),
    "access_log_format": _scalar(_choice("combined", "json")),
    "workers": _scalar(_workers),
    "worker_timeout": _scalar(_positive_duration),
    "trusted_proxies": _cidrs,
    "detailed_errors": _scalar(_boolean),
    "limits": _section(_LIMIT_RULES),
    "metrics_listen": _scalar(_metrics_address),
    "health": _section(_NODE_HEALTH_RULES),
}
_CERT_RULES: Final[dict[str, Rule]] = {
    "cert": _existing_file("certificate"),
    "key": _existing_file("key"),
}
_TLS_RULES: Final[dict[str, Rule]] = {
    "certificates": _certificates,
    "hsts": _scalar(_hsts),
    "client_certificates": _scalar(_choice("none", "optional", "required")),
    "client_ca": _existing_file("client_ca"),
}
_LISTEN_RULES: Final[dict[str, Rule]] = {
    "address": _scalar(_address),
    "redirect_https": _scalar(_boolean),
    "tls": _tls,
    "http2": _scalar(_boolean),
    "proxy_protocol": _scalar(_boolean),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _static_root(checker: _Checker, node: _Node, path: str) -> Any:
    """The directory a static location serves: absolute, its symbolic links resolved."""
    name = _path_rule(optional=False)(checker, node, path)
    if name is _BAD or not checker.files:
        return name
    if not os.path.exists(name):
        return checker.add(node.line, f"{path}: directory {name} does not exist")
    if not os.path.isdir(name):
        return checker.add(node.line, f"{path}: {name} is not a directory")
    return os.path.realpath(name)


def _index_name(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "/" in value or value in (".", "..") \
            or "\0" in value:
        raise ValueError(f"must be a file name such as index.html, not {_show(value)}")
    return value


def _header_value(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() \
            or any(c < " " and c != "\t" or c == "\x7f" for c in value):
        raise ValueError(f"must be a header value on one line, not {_show(value)}")
    return value.strip()


_STATIC_RULES: Final[dict[str, Rule]] = {
    "hosts": _hosts,
    "path": _scalar(_url_path),
    "root": _static_root,
    "index": _scalar(_index_name),
    "precompressed": _scalar(_boolean),
    "cache_control": _scalar(_header_value),
    "internal": _scalar(_boolean),
}


# --- the parts that need more than one key ----------------------------------------------


def _listeners(checker: _Checker, node: _Node) -> list[Listener]:
    items = checker.sequence(node, "listen", '[{address: "0.0.0.0:80"}]')
    if items is None:
        return []
    if not items:
        checker.add(node.line, "listen must list at least one address")
    listeners: list[Listener] = []
    seen: dict[tuple[str, int], int] = {}
    for index, item in enumerate(items):
        path = f"listen[{index}]"
        values = checker.fields(item, path, _LISTEN_RULES)
        entries = item.value if isinstance(item.value, dict) else None
        if not checker.require(values, entries, item, path, "address", 'e.g. "0.0.0.0:80"'):
            continue
        host, port = values.pop("address")
        checker.lines[path] = entries["address"].line if entries else item.line
        if (host, port) in seen:
            checker.add(entries["address"].line if entries else item.line,
                        f"{path}.address {Listener(host, port).address} is already used "
                        f"by listen[{seen[host, port]}]")
        seen.setdefault((host, port), index)
        if values.get("redirect_https") and entries and "tls" in entries:
            checker.add(entries["redirect_https"].line,
                        f"{path}.redirect_https is for plain listeners; this one has tls")
        listeners.append(Listener(host=host, port=port, **values))
    declares_tls = any(isinstance(item.value, dict) and "tls" in item.value for item in items)
    if any(lis.redirect_https for lis in listeners) and not declares_tls:
        checker.add(node.line, "listen: redirect_https needs a listener with tls to redirect to")
    return listeners


def _pools(checker: _Checker, node: _Node | None,
           offload: dict[str, Offload]) -> dict[str, PoolSettings]:
    """The pools' settings; their buffering and compression go to ``offload``."""
    pools = {"default": PoolSettings()}
    offload["default"] = Offload()
    entries = checker.mapping(node, "pools") if node is not None else None
    for name, item in (entries or {}).items():
        if not _NAME.fullmatch(name):
            checker.add(item.key_line, f"pool name '{name}' must be letters, digits, '_', '.' or '-'")
        values = checker.fields(item, f"pools.{name}", _POOL_RULES, also=_OFFLOAD_RULES)
        if isinstance(item.value, dict):
            edge = {key: child for key, child in item.value.items() if key in _OFFLOAD_RULES}
            offload[name] = _offload(checker.fields(_Node(edge, item.line, item.key_line),
                                                    f"pools.{name}", _OFFLOAD_RULES))
        values["recycle"] = RecycleSettings(**values.get("recycle", {}))
        if values.get("health_check") is not None:
            values["health_check"] = HealthCheck(**values["health_check"])
        pools[name] = PoolSettings(**values)
    return pools


def _apps(checker: _Checker, node: _Node, pools: dict[str, PoolSettings],
          https_port: int | None, top_user: str | None = None
          ) -> tuple[list[AppSpec], list[Route]]:
    entries = checker.mapping(node, "apps")
    if entries is not None and not entries:
        checker.add(node.line, "apps must define at least one app")
    apps: list[AppSpec] = []
    routes: list[Route] = []
    claimed: dict[tuple[str, str], str] = {}  # (host or "", path) -> app
    for name, item in (entries or {}).items():
        path = f"apps.{name}"
        if not _NAME.fullmatch(name):
            checker.add(item.key_line, f"app name '{name}' must start with a letter or digit "
                        "and hold only letters, digits, '_', '.' or '-'")
        values = checker.fields(item, path, _APP_RULES)
        app_entries = item.value if isinstance(item.value, dict) else None
        pool = values.pop("pool", "default")
        if pool not in pools and app_entries:
            close = difflib.get_close_matches(pool, list(pools), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            checker.add(app_entries["pool"].line, f"app '{name}' names unknown pool '{pool}'{hint}")
        hosted = values.get("hosting_model") == "in_process"
        if hosted:
            has_command = _in_process_keys(checker, values, app_entries or {}, item, path,
                                           pools.get(pool, PoolSettings()), top_user)
        else:
            for key in _IN_PROCESS_ONLY:
                if app_entries and key in app_entries:
                    checker.add(app_entries[key].line,
                                f"{path}.{key} is for hosting_model: in_process")
            has_command = checker.require(values, app_entries, item, path, "command",
                                          'an argv list, e.g. ["gunicorn", "app:app"]')
        routable = app_entries is not None and all(
            key in values or key not in app_entries for key in ("hosts", "path"))
        hosts, url_path = values.pop("hosts", ()), values.pop("path", "/")
        websockets = values.pop("websockets", True)
        if routable:
            _claim(checker, claimed, Route(app=name, hosts=hosts, path=url_path), item.key_line)
        routes.append(Route(app=name, hosts=hosts, path=url_path, websockets=websockets))
        if not has_command:
            continue
        if checker.start and checker.files and app_entries is not None and not hosted:
            _check_program(checker, app_entries["command"].line, path, values["command"],
                           values.get("cwd"), dict(values.get("environment", ())),
                           pools.get(pool, PoolSettings()).environment)
        own = {key: values.pop(key) for key in list(values) if key in POOL_SETTING_NAMES}
        base = pools.get(pool, PoolSettings())
        if "recycle" in own:
            own["recycle"] = replace(base.recycle, **own["recycle"])
        if own.get("health_check") is not None:
            own["health_check"] = replace(base.health_check or HealthCheck(),
                                          **own["health_check"])
        apps.append(AppSpec(name=name, pool=pool, settings=base.merged(own),
                            path_base="" if url_path == "/" else url_path,
                            https_port=https_port, **values))
    _shared_environment(checker, apps, entries or {})
    return apps, routes


def _in_process_keys(checker: _Checker, values: dict[str, Any], entries: dict[str, _Node],
                     item: _Node, path: str, pool: PoolSettings, top_user: str | None) -> bool:
    """The keys of an in-process app: ``app`` is required, and whatever needs a process
    of the app's own is refused (FILE:LINE of the key). True when the app can be built."""
    ok = checker.require(values, entries, item, path, "app",
                         "a module:attribute to import, e.g. 'api.main:app'")
    for key, why in _NOT_IN_PROCESS.items():
        if key in entries:
            checker.add(entries[key].line, f"{path}.{key} means nothing for hosting_model: "
                        f"in_process ({why})")
            ok = False
    user = values.get("user", pool.user)
    if user is not None and user != top_user:
        line = entries["user"].line if "user" in entries else entries["hosting_model"].line
        checker.add(line, f"{path}: an in_process app runs as the proxy workers' user "
                    f"({top_user or 'the user Bastion runs as'}), not as user {user!r}")
        ok = False
    values.pop("command", None)
    return ok


def _shared_environment(checker: _Checker, apps: list[AppSpec], entries: dict[str, _Node]) -> None:
    """In-process apps share the workers' process, so their environments must agree."""
    seen: dict[str, tuple[str, str]] = {}  # variable -> (value, app)
    for spec in apps:
        if not spec.in_process:
            continue
        for name, value in spec.environment.items():
            other = seen.setdefault(name, (value, spec.name))
            if other[0] != value:
                node = entries.get(spec.name)
                checker.add(node.key_line if node is not None else 0,
                            f"apps.{spec.name}: environment {name}={value!r} differs from "
                            f"{other[0]!r} of app '{other[1]}'; in-process apps share one "
                            "process, so they must agree")


def _check_program(checker: _Checker, line: int, path: str, argv: tuple[str, ...],
                   cwd: str | None, own_env: dict[str, str],
                   pool_env: tuple[tuple[str, str], ...]) -> None:
    """``command[0]`` must be found, and be executable, as the app will look for it."""
    program = argv[0]
    if "{" in program:
        return  # {port} or {socket}: only known at start
    if "/" in program:
        where = os.path.join(cwd or os.getcwd(), os.path.expanduser(program))
        if not os.path.exists(where):
            checker.add(line, f"{path}.command: {program} does not exist"
                        + (f" (relative to cwd {cwd})" if cwd and not program.startswith("/") else ""))
        elif os.path.isdir(where) or not os.access(where, os.X_OK):
            checker.add(line, f"{path}.command: {program} is not an executable file")
        return
    env = {**os.environ, **dict(pool_env), **own_env}
    search = env.get("PATH") or os.defpath
    found = shutil.which(program, path=search)
    if found is None:
        near = [d for d in search.split(os.pathsep)
                if d and os.path.exists(os.path.join(d, program))]
        if near:
            checker.add(line, f"{path}.command: {program} in {near[0]} is not executable")
        else:
            checker.add(line, f"{path}.command: {program!r} is not found on the app's PATH "
                        f"({search}); give its full path or set PATH in environment")


def _check_ports(checker: _Checker, listeners: list[Listener], metrics: str | None,
                 admin_socket: str) -> None:
    """Addresses to listen on that another program holds already (``bastion check``)."""
    wanted = [(f"listen[{i}].address", lis.host, lis.port) for i, lis in enumerate(listeners)]
    if metrics is not None:
        metrics_host, _, metrics_port = metrics.rpartition(":")
        wanted.append(("metrics_listen", metrics_host.strip("[]"), int(metrics_port)))
    taken = [(key, host, port) for key, host, port in wanted if _in_use(host, port)]
    if not taken:
        return
    ours = checker.running(admin_socket) if checker.running is not None else set()
    for key, host, port in taken:
        address = Listener(host, port).address
        if address not in ours:
            line = checker.lines.get(key.removesuffix(".address"), 0)
            checker.add(line, f"{key} {address} is already in use by another program")


def _in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    return False


def _claim(checker: _Checker, claimed: dict[tuple[str, str], str], route: Route, line: int) -> None:
    """Record where ``route`` is mounted; a problem when another app already is there."""
    for host in route.hosts or ("",):
        other = claimed.setdefault((host, route.path), route.app)
        if other != route.app:
            same = f"host '{host}' and path" if host else "path"
            tail = "" if host else ", and neither names hosts"
            checker.add(line, f"app '{route.app}' has the same {same} '{route.path}' "
                        f"as app '{other}'{tail}")


def _statics(checker: _Checker, node: _Node, routes: list[Route]) -> list[StaticLocation]:
    """The ``static`` locations; a problem for each one mounted where an app (or another
    location) is, at the same host and path base."""
    entries = checker.mapping(node, "static")
    claimed: dict[tuple[str, str], str] = {}
    for route in routes:
        for host in route.hosts or ("",):
            claimed.setdefault((host, route.path), f"app '{route.app}'")
    locations: list[StaticLocation] = []
    for name, item in (entries or {}).items():
        path = f"static.{name}"
        if not _NAME.fullmatch(name):
            checker.add(item.key_line, f"static location name '{name}' must start with a "
                        "letter or digit and hold only letters, digits, '_', '.' or '-'")
        values = checker.fields(item, path, _STATIC_RULES)
        static_entries = item.value if isinstance(item.value, dict) else None
        if not checker.require(values, static_entries, item, path, "root",
                               "the directory to serve, e.g. /srv/shop/static"):
            continue
        location = StaticLocation(name=name, **values)
        for host in location.hosts or ("",):
            other = claimed.setdefault((host, location.path), f"static location '{name}'")
            if other != f"static location '{name}'":
                same = f"host '{host}' and path" if host else "path"
                line = static_entries["path"].line if static_entries and "path" in static_entries \
                    else item.key_line
                checker.add(line, f"static location '{name}' has the same {same} "
                            f"'{location.path}' as {other}")
        locations.append(location)
    return locations


def _check_node_health(checker: _Checker, entries: dict[str, _Node], values: dict[str, Any],
                       listeners: list[Listener], apps: list[AppSpec]) -> None:
    """``health.require_apps`` names apps that are always started; ``proxy_protocol``
    needs ``trusted_proxies`` (the balancers allowed to send the header)."""
    health = entries.get("health")
    required = values.get("health", {}).get("require_apps", ())
    if health is not None and isinstance(health.value, dict) and required:
        line = health.value["require_apps"].line
        by_name = {spec.name: spec for spec in apps}
        for name in required:
            spec = by_name.get(name)
            if spec is None and "apps" in entries:
                close = difflib.get_close_matches(name, list(by_name), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                checker.add(line, f"health.require_apps names unknown app '{name}'{hint}")
            elif spec is not None and spec.settings.start_mode != "always":
                checker.add(line, f"health.require_apps: app '{name}' must have start_mode: "
                            "always (an on_demand app is not started until a request comes, "
                            "and no request would come to a node whose health is 503)")
    if any(lis.proxy_protocol for lis in listeners) and not values.get("trusted_proxies"):
        index = next(i for i, lis in enumerate(listeners) if lis.proxy_protocol)
        checker.add(checker.lines.get(f"listen[{index}]", 0),
                    f"listen[{index}].proxy_protocol needs trusted_proxies: the addresses of "
                    "the load balancers allowed to send the PROXY header")


def _build(checker: _Checker, root: _Node) -> Config:
    values = checker.fields(root, "", _TOP_RULES, also=("listen", "pools", "apps", "static"))
    entries: dict[str, _Node] = root.value if isinstance(root.value, dict) else {}
    for key in ("listen", "apps"):
        if isinstance(root.value, dict) and key not in entries:
            checker.add(root.line, f"{key} is required")
    listeners = _listeners(checker, entries["listen"]) if "listen" in entries else []
    https_port = next((lis.port for lis in listeners if lis.tls is not None), None)
    offload: dict[str, Offload] = {}
    pools = _pools(checker, entries.get("pools"), offload)
    apps, routes = _apps(checker, entries["apps"], pools, https_port,
                         values.get("user")) if "apps" in entries else ([], [])
    statics = _statics(checker, entries["static"], routes) if "static" in entries else []
    _check_node_health(checker, entries, values, listeners, apps)
    if checker.start and checker.files:
        if "metrics_listen" in entries:
            checker.lines["metrics_listen"] = entries["metrics_listen"].line
        _check_ports(checker, listeners, values.get("metrics_listen"),
                     values.get("admin_socket", Config.admin_socket))
    if checker.problems:
        raise ConfigError(sorted(checker.problems, key=lambda problem: problem.line))
    if "limits" in values:
        values["limits"] = Limits(**values["limits"])
    if "health" in values:
        values["health"] = HealthSettings(**values["health"])
    return Config(listeners=tuple(listeners), apps=tuple(apps), routes=tuple(routes),
                  pools=pools, offload=offload, source=checker.file,
                  statics=tuple(statics), **values)


# --- public entry points ----------------------------------------------------------------


def load_config(path: str, files: bool = True, start: bool = False,
                running: Running | None = None) -> Config:
    """Read, check and convert the YAML file ``path``; ConfigError lists every problem.

    ``files=False`` takes file, directory and user names on trust (linting a file for another
    machine); ``start=True`` also checks what would only fail when Bastion starts: each
    app's program on its PATH, listening addresses held by another program than the
    Bastion that ``running`` finds on the admin socket (its addresses are no problem)."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as exc:
        raise ConfigError([Problem(path, 0, f"cannot read the configuration: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([Problem(path, line, "the file is not valid UTF-8")]) from None
    checker = _Checker(path, os.path.dirname(os.path.abspath(path)), files, start, running)
    root = _from_yaml(text, path, checker.problems)
    if root is None or root.value is None:
        raise ConfigError([Problem(path, 1, "empty configuration; listen and apps are required")])
    return _build(checker, root)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Check and convert already-parsed data, as ``load_config`` does (lines are 0)."""
    checker = _Checker(source, os.getcwd())
    return _build(checker, _from_python(data, checker.problems, source))


def check_main(path: str, files: bool = True, start: bool = False,
               running: Running | None = None) -> int:
    """``bastion check -c FILE``: print the problems on stderr (1) or "FILE: configuration OK" (0).

    ``start`` (``bastion check``) also looks at the apps' programs and the listening
    addresses; ``files=False`` (``--no-files``) looks at nothing on this machine."""
    try:
        load_config(path, files=files, start=start and files, running=running)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"{path}: configuration OK")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bastion.proxy.config.load FILE")
    sys.exit(check_main(sys.argv[1]))
