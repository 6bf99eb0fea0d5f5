"""An app that leaves a daemon behind: a double-forked grandchild in its own session.

    setsid_grandchild.py PORT

The child calls ``os.setsid()`` (it leaves the app's process group) and forks the
grandchild, then exits at once, so the grandchild is an orphan outside the group: killing
the group does not reach it. The grandchild writes its pid to ``$PIDFILE`` and sleeps.
The app then serves ``GET`` with ``{"pid": ...}`` on PORT.

``DAEMON_LEAVES=pgid`` makes the child leave only the process group (``setpgid``), not
the session; ``DAEMON_ENV=empty`` makes the grandchild exec a sleeping Python with an
empty environment (no ``BASTION_TOKEN`` left to name its app).
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def main() -> None:
    port = int(sys.argv[1])
    pidfile = os.environ["PIDFILE"]
    child = os.fork()
    if child == 0:
        if os.environ.get("DAEMON_LEAVES") == "pgid":
            os.setpgid(0, 0)
        else:
            os.setsid()
        if os.fork() == 0:
            with open(pidfile + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            if os.environ.get("DAEMON_ENV") == "empty":
                code = "import time\nwhile True: time.sleep(3600)"
                os.execve(sys.executable, [sys.executable, "-c", code], {})
            while True:
                time.sleep(3600)
        os._exit(0)
    os.waitpid(child, 0)
    deadline = time.monotonic() + 5
    while not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.01)
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
