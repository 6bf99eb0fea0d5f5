"""The ``bastion`` command line (SPEC section 2)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or os.environ.get("BASTION_CONFIG") or None


def _load(path: str | None) -> Any:
    """The Config for ``path``, or the built-in demo when there is none."""
    if path is None:
        from .demo import demo_config

        return demo_config()
    from .config_load import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> int:
    """``bastion serve``: run in the foreground."""
    from .main import serve

    config = _load(_config_path(args))
    if _config_path(args) is None:
        logging.getLogger("bastion").info(
            "no configuration given: running the built-in demo on http://127.0.0.1:8080 "
            "and https://127.0.0.1:8443"
        )
    return serve(config)


def cmd_check(args: argparse.Namespace) -> int:
    """``bastion check -c FILE``: validate like ``nginx -t``."""
    from .config_load import check_main

    path = _config_path(args)
    if path is None:
        print("bastion check: give a file with -c FILE (or BASTION_CONFIG)", file=sys.stderr)
        return 2
    return check_main(path)


async def _admin(socket_path: str, method: str, path: str) -> tuple[int, Any]:
    import aiohttp

    connector = aiohttp.UnixConnector(path=socket_path)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, f"http://bastion{path}") as response:
            return response.status, await response.json()


def _format_status(data: dict[str, Any]) -> str:
    """A ``passenger-status``-like table: one block per pool, one row per process."""
    lines = [f"bastion pid {data.get('pid')}, generation {data.get('generation', 0)}, "
             f"{len(data.get('workers', []))} worker(s)"]
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
                    str(proc["port"] or proc.get("socket") or "-"),
                    _duration(proc["uptime"]), str(proc.get("requests", 0)),
                    str(proc.get("in_flight", 0)), f"{proc.get('rss', 0) / 1048576:.1f}",
                    f"{proc.get('cpu_percent', 0.0):.1f}",
                ))
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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _ask(args: argparse.Namespace, command: str, method: str, path: str
         ) -> tuple[int, Any] | None:
    """One admin-socket call for ``bastion COMMAND``; None (after saying why) when
    the running Bastion cannot be reached."""
    config = _load(_config_path(args))
    try:
        return asyncio.run(_admin(config.admin_socket, method, path))
    except OSError as exc:
        print(f"bastion {command}: cannot reach {config.admin_socket}: {exc}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    """``bastion status``: ask the running Bastion through its admin socket."""
    answer = _ask(args, "status", "GET", "/status")
    if answer is None:
        return 1
    data = answer[1]
    print(json.dumps(data, indent=2) if args.json else _format_status(data))
    return 0


def cmd_recycle(args: argparse.Namespace) -> int:
    """``bastion recycle APP``: overlapped restart of one app."""
    answer = _ask(args, "recycle", "POST", f"/apps/{args.app}/recycle")
    if answer is None:
        return 1
    status, data = answer
    if status != 200:
        print(f"bastion recycle: {data.get('error', status)}", file=sys.stderr)
        return 1
    print(f"recycling {args.app}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """``bastion reload``: re-read the configuration without dropping connections."""
    answer = _ask(args, "reload", "POST", "/reload")
    if answer is None:
        return 1
    status, data = answer
    if status != 200:
        for problem in data.get("problems", []):
            print(problem, file=sys.stderr)
        print("bastion reload: refused; the running configuration is unchanged", file=sys.stderr)
        return 1
    print("reloaded")
    return 0


def cmd_dev_cert(args: argparse.Namespace) -> int:
    """``bastion dev-cert``: create or show the development certificate."""
    from .devcert import describe, ensure_dev_cert

    print(describe(ensure_dev_cert()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bastion``."""
    parser = argparse.ArgumentParser(prog="bastion", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run in the foreground")
    serve.add_argument("-c", "--config", help="configuration file (default: built-in demo)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("-c", "--config", help="configuration file")
    check.set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="pools, apps and processes of the running Bastion")
    status.add_argument("-c", "--config", help="configuration file (for the admin socket)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)
    reload = sub.add_parser("reload", help="re-read the configuration (like SIGHUP)")
    reload.add_argument("-c", "--config", help="configuration file (for the admin socket)")
    reload.set_defaults(func=cmd_reload)
    recycle = sub.add_parser("recycle", help="overlapped restart of one app")
    recycle.add_argument("app", help="the app's name")
    recycle.add_argument("-c", "--config", help="configuration file (for the admin socket)")
    recycle.set_defaults(func=cmd_recycle)
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
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
