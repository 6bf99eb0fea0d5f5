"""The ``bastion`` command line.

``serve``, ``check`` and ``config`` read a configuration file. The commands for a running
Bastion (``status``, ``reload``, ``recycle``, ``stop``, ``start``, ``restart``, ``logs``,
``drain``, ``undrain``)
only talk to its admin socket and never need a valid file: the socket is ``--socket
PATH``, else ``BASTION_ADMIN_SOCKET``, else ``admin_socket`` read leniently from ``-c
FILE`` (or ``BASTION_CONFIG``), else ``/run/bastion/admin.sock``.

Exit status: 0 done; 1 refused (an unknown app, a reload with a broken file) or problems
found (``check``, ``config``); 2 a usage error, or the running Bastion cannot be reached.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import sys
import time
from typing import Any

from ..version import version
from .adminclient import Found, Unreachable, call, find_socket, open_request

OK, REFUSED, UNREACHABLE = 0, 1, 2


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or os.environ.get("BASTION_CONFIG") or None


def _load(path: str | None) -> Any:
    """The Config for ``path``, or the built-in demo when there is none."""
    if path is None:
        from ..demo import demo_config

        return demo_config()
    from ..config.load import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(REFUSED) from None


def cmd_serve(args: argparse.Namespace) -> int:
    """``bastion serve``: run in the foreground."""
    from .main import serve

    config = _load(_config_path(args))
    if _config_path(args) is None:
        from .devcert import dev_cert_dir

        logging.getLogger("bastion").info(
            "no configuration given: running the built-in demo on http://127.0.0.1:8080 "
            "and https://127.0.0.1:8443; its development CA is %s (curl --cacert %s ...)",
            dev_cert_dir() / "ca.pem", dev_cert_dir() / "ca.pem",
        )
    return serve(config)


def cmd_check(args: argparse.Namespace) -> int:
    """``bastion check -c FILE``: validate like ``nginx -t``."""
    from ..config.load import check_main

    path = _config_path(args)
    if path is None:
        print("bastion check: give a file with -c FILE (or BASTION_CONFIG)", file=sys.stderr)
        return UNREACHABLE
    from .adminclient import running_addresses

    return check_main(path, files=not args.no_files, start=True, running=running_addresses)


def cmd_config(args: argparse.Namespace) -> int:
    """``bastion config -c FILE``: the effective configuration, defaults filled in."""
    from ..config.dump import dump
    from .main import worker_count

    path = _config_path(args)
    if path is None:
        print("bastion config: give a file with -c FILE (or BASTION_CONFIG)", file=sys.stderr)
        return UNREACHABLE
    config = _load(path)
    sys.stdout.write(dump(config, worker_count(config)))
    return OK


# -- talking to a running Bastion ----------------------------------------------------------


def _socket(args: argparse.Namespace) -> Found:
    return find_socket(getattr(args, "socket", None), _config_path(args))


def _ask(args: argparse.Namespace, method: str, path: str,
         timeout: float = 60.0) -> tuple[int, Any] | None:
    """One admin-socket call for ``bastion COMMAND``; None (after saying why) when the
    running Bastion cannot be reached."""
    try:
        return call(_socket(args), method, path, timeout)
    except Unreachable as exc:
        print(f"bastion {args.command}: {exc}", file=sys.stderr)
        return None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _listeners(data: dict[str, Any]) -> str:
    shown = []
    for lis in data.get("listeners", []):
        text = f"{'https' if lis['tls'] else 'http'}://{lis['address']}"
        if lis.get("http2"):
            text += " (HTTP/2)"
        if lis.get("redirect_https"):
            text += " (redirects to https)"
        shown.append(text)
    return ", ".join(shown) or "nothing"


def _why(app: dict[str, Any], now: float) -> str | None:
    """For an app that is not serving: why, and until when."""
    state = app["state"]
    if state not in ("offline", "failed", "backoff", "stopped") or (
            state == "stopped" and not app.get("reason")):
        return None
    text = f"  {app['name']}: {state}"
    if app.get("reason"):
        text += f": {app['reason']}"
    if app.get("retry_at"):
        left = max(0.0, app["retry_at"] - now)
        text += (f"; refused (503) until {time.strftime('%H:%M:%S', time.localtime(app['retry_at']))}"
                 f" (in {_duration(left)}), then started on the next request")
    elif state == "offline" and "administrator" in app.get("reason", ""):
        text += f"; until `bastion start {app['name']}`"
    elif state == "offline":
        text += "; until app_offline.htm is removed"
    elif state in ("failed", "stopped"):
        text += "; started again on the next request"
    return text


def _format_status(data: dict[str, Any]) -> str:
    """A ``passenger-status``-like table: one block per pool, one row per process."""
    now = time.time()
    lines = [f"bastion {data.get('version', '?')}, pid {data.get('pid')}, "
             f"up {_duration(data.get('uptime', now - data.get('started', now)))}, "
             f"generation {data.get('generation', 0)}, "
             f"{len(data.get('workers', []))} worker(s)"]
    if data.get("config"):
        lines.append(f"config {data['config']}")
    if data.get("draining"):
        lines.append("DRAINING: health answers 503 (`bastion undrain` serves again)")
    lines.append(f"listening on {_listeners(data)}")
    if data.get("metrics_listen"):
        lines.append(f"metrics on http://{data['metrics_listen']}/metrics")
    header = ("APP", "STATE", "PID", "PORT", "UPTIME", "REQUESTS", "IN FLIGHT", "RSS MiB",
              "CPU %")
    for pool, apps in sorted(data["pools"].items()):
        rows: list[tuple[str, ...]] = [header]
        notes: list[str] = []
        for name in apps:
            app = data["apps"][name]
            procs = app["processes"] or [None]
            for proc in procs:
                if proc is None:
                    rows.append((name, app["state"], "-", "-", "-", "-", "-", "-", "-"))
                    continue
                rows.append((
                    name, f"{app['state']}/{proc['state']}", str(proc["pid"]),
                    str(proc["port"] or proc.get("socket")
                        or ("in-proc" if app.get("hosting_model") == "in_process" else "-")),
                    _duration(proc["uptime"]), str(proc.get("requests", 0)),
                    str(proc.get("in_flight", 0)), f"{proc.get('rss', 0) / 1048576:.1f}",
                    f"{proc.get('cpu_percent', 0.0):.1f}",
                ))
            why = _why(app, now)
            if why:
                notes.append(why)
            if app["restarts"] or app.get("last_exit"):
                notes.append(f"  {name}: restarts {app['restarts']}"
                             + (f", last exit: {app['last_exit']}" if app.get("last_exit") else ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.append("")
        lines.append(f"pool {pool}")
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                         .rstrip())
        lines.extend(notes)
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """``bastion status``: ask the running Bastion through its admin socket."""
    answer = _ask(args, "GET", "/status")
    if answer is None:
        return UNREACHABLE
    data = answer[1]
    print(json.dumps(data, indent=2) if args.json else _format_status(data))
    return OK


def _app_action(args: argparse.Namespace, action: str, done: str) -> int:
    from urllib.parse import quote

    answer = _ask(args, "POST", f"/apps/{quote(args.app, safe='')}/{action}", timeout=300)
    if answer is None:
        return UNREACHABLE
    status, data = answer
    if status != 200:
        print(f"bastion {args.command}: {data.get('error', status)}", file=sys.stderr)
        return REFUSED
    print(f"{done} {args.app}")
    return OK


def cmd_recycle(args: argparse.Namespace) -> int:
    """``bastion recycle APP``: overlapped restart of one app."""
    return _app_action(args, "recycle", "recycling")


def cmd_stop(args: argparse.Namespace) -> int:
    """``bastion stop APP``: stop an app; requests get 503 until ``start``."""
    return _app_action(args, "stop", "stopped")


def cmd_start(args: argparse.Namespace) -> int:
    """``bastion start APP``: allow and start an app again."""
    return _app_action(args, "start", "started")


def cmd_restart(args: argparse.Namespace) -> int:
    """``bastion restart APP``: hard restart (stop every process, then start; an
    in-process app: its workers replaced one at a time, importing the code afresh)."""
    return _app_action(args, "restart", "restarted")


def cmd_reload(args: argparse.Namespace) -> int:
    """``bastion reload``: re-read the configuration without dropping connections."""
    answer = _ask(args, "POST", "/reload", timeout=300)
    if answer is None:
        return UNREACHABLE
    status, data = answer
    if status != 200:
        for problem in data.get("problems", []):
            print(problem, file=sys.stderr)
        print("bastion reload: refused; the running configuration is unchanged", file=sys.stderr)
        return REFUSED
    print("reloaded")
    return OK


def cmd_drain(args: argparse.Namespace) -> int:
    """``bastion drain`` / ``bastion undrain``: the node's health answers 503 (the load
    balancers stop sending it new connections; every request it gets is still served)
    or 200 again."""
    answer = _ask(args, "POST", f"/{args.command}")
    if answer is None:
        return UNREACHABLE
    status, data = answer
    if status != 200:
        print(f"bastion {args.command}: refused ({status})", file=sys.stderr)
        return REFUSED
    print("draining: health answers 503" if data.get("draining")
          else "serving: health answers 200")
    return OK


def cmd_logs(args: argparse.Namespace) -> int:
    """``bastion logs APP [-f] [-n N]``: the app's recent output, then live with ``-f``."""
    from urllib.parse import quote

    query = f"lines={args.lines}" + ("&follow=1" if args.follow else "")
    found = _socket(args)
    try:
        response = open_request(found, "GET", f"/apps/{quote(args.app, safe='')}/logs?{query}",
                                timeout=None if args.follow else 30)
    except Unreachable as exc:
        print(f"bastion logs: {exc}", file=sys.stderr)
        return UNREACHABLE
    with response:
        if response.status != 200:
            try:
                error = json.loads(response.read()).get("error", response.status)
            except ValueError:
                error = response.status
            print(f"bastion logs: {error}", file=sys.stderr)
            return REFUSED
        out = sys.stdout.buffer
        try:
            while chunk := response.read1(65536):
                out.write(chunk)
                out.flush()
        except (ConnectionResetError, http.client.IncompleteRead):
            pass  # Bastion stopped: the output ends here
    return OK


def cmd_dev_cert(args: argparse.Namespace) -> int:
    """``bastion dev-cert``: create or show the development certificate."""
    from .devcert import describe, ensure_dev_cert

    print(describe(ensure_dev_cert()))
    return OK


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--socket", metavar="PATH",
                        help="the admin socket (else BASTION_ADMIN_SOCKET, else admin_socket "
                             "in -c FILE, else /run/bastion/admin.sock)")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="configuration file to read admin_socket from (only that key "
                             "is read; the rest may be broken)")


EPILOG = """\
The commands for a running Bastion find its admin socket by --socket, then
BASTION_ADMIN_SOCKET, then admin_socket in -c FILE (or BASTION_CONFIG), then
/run/bastion/admin.sock. Exit status: 0 done; 1 refused or problems found;
2 usage error or Bastion not reachable. See docs/configuration.md and
docs/troubleshooting.md.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bastion``."""
    parser = argparse.ArgumentParser(
        prog="bastion", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Bastion: the edge server for Python web apps (TLS, routing, app "
                    "processes).")
    parser.add_argument("--version", action="version", version=f"bastion {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run in the foreground")
    serve.add_argument("-c", "--config", help="configuration file (default: built-in demo)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate a configuration file (FILE:LINE: problem)")
    check.add_argument("-c", "--config", help="configuration file")
    check.add_argument("--no-files", action="store_true",
                       help="check the file alone, for CI: no look at certificates, "
                            "directories, programs, users or ports of this machine")
    check.set_defaults(func=cmd_check)
    config = sub.add_parser("config", help="print the effective configuration, every "
                                           "default filled in")
    config.add_argument("-c", "--config", help="configuration file")
    config.set_defaults(func=cmd_config)
    status = sub.add_parser("status", help="version, listeners, pools, apps and processes of "
                                           "the running Bastion")
    _admin_options(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)
    reload = sub.add_parser("reload", help="re-read the configuration (like SIGHUP)")
    _admin_options(reload)
    reload.set_defaults(func=cmd_reload)
    for name, func, text in (
        ("recycle", cmd_recycle, "overlapped restart of one app (no request is dropped)"),
        ("stop", cmd_stop, "stop one app; its requests get 503 until `start`"),
        ("start", cmd_start, "start one app again (after `stop`, or to clear rapid-fail)"),
        ("restart", cmd_restart, "hard restart of one app: stop every process, then start"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument("app", help="the app's name")
        _admin_options(action)
        action.set_defaults(func=func)
    for name, text in (
        ("drain", "take this node out of its load balancer: health answers 503, clients "
                  "are told to move, every request is still served"),
        ("undrain", "put this node back: health answers 200"),
    ):
        drain = sub.add_parser(name, help=text)
        _admin_options(drain)
        drain.set_defaults(func=cmd_drain)
    logs = sub.add_parser("logs", help="an app's recent output (kept in memory), -f to follow")
    logs.add_argument("app", help="the app's name")
    logs.add_argument("-f", "--follow", action="store_true", help="go on with live output")
    logs.add_argument("-n", "--lines", type=int, default=50, metavar="N",
                      help="how many recent lines (default 50)")
    _admin_options(logs)
    logs.set_defaults(func=cmd_logs)
    dev = sub.add_parser("dev-cert", help="create or show the development certificate")
    dev.set_defaults(func=cmd_dev_cert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bastion`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # ``bastion status | head -1``: the reader is gone; end quietly. Python would
        # complain when it flushes stdout at exit, so stdout becomes /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
