"""Apps that misbehave on purpose, chosen by the first argument.

  exit-at-once     print a line and exit with status 3
  never-bind       sleep forever without listening
  grandchild PORT  fork a child (same group) and a setsid grandchild that sleep, then
                   serve HTTP on PORT; writes their pids to $PIDFILE
"""

from __future__ import annotations

import http.server
import os
import sys
import time


def main() -> None:
    mode = sys.argv[1]
    if mode == "exit-at-once":
        print("misbehave: giving up at once", flush=True)
        sys.exit(3)
    if mode == "never-bind":
        print("misbehave: not listening", flush=True)
        while True:
            time.sleep(3600)
    if mode == "grandchild":
        port = int(sys.argv[2])
        pids = []
        child = os.fork()
        if child == 0:
            while True:
                time.sleep(3600)
        pids.append(child)
        with open(os.environ["PIDFILE"], "w") as f:
            f.write(" ".join(str(p) for p in [os.getpid(), *pids]))
        server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
        server.serve_forever()
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
