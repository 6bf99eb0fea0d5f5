"""A plain HTTP app (standard library only, so any ``python3`` can run it, as any user).

    plain_app.py PORT [--start-delay S] [--flood BYTES] [--banner TEXT]

``--start-delay`` sleeps before listening (a slow start), ``--flood`` writes that many
bytes to stdout before listening, ``--banner`` prints one line at start. Routes, matched
on the end of the path: ``/print?msg=X`` prints X to stdout; ``/slow?s=N`` sleeps N
seconds; anything else answers ``{"pid", "uid", "euid", "cwd", "app"}`` as JSON.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import time
from urllib.parse import parse_qs, urlsplit


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path.endswith("/print"):
            print(query.get("msg", [""])[0], flush=True)
        if url.path.endswith("/slow"):
            time.sleep(float(query.get("s", ["1"])[0]))
        body = json.dumps({
            "pid": os.getpid(), "uid": os.getuid(), "euid": os.geteuid(),
            "cwd": os.getcwd(), "app": os.environ.get("BASTION_APP"),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--banner", default="")
    args = parser.parse_args()
    if args.banner:
        print(args.banner, flush=True)
    if args.flood:
        line = b"x" * 1023 + b"\n"
        left = args.flood
        while left > 0:
            chunk = line * min(64, (left + 1023) // 1024)
            sys.stdout.buffer.write(chunk[:left])
            left -= len(chunk)
        sys.stdout.buffer.write(b"\nflood done\n")
        sys.stdout.flush()
    if args.start_delay:
        time.sleep(args.start_delay)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
