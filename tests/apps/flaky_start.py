"""A plain HTTP app whose next start fails on demand.

While the file named by ``$FAIL_FLAG`` exists it prints one line and exits with status 3
before listening; otherwise it serves ``GET`` on the port given as its only argument with
``{"pid": ...}``. A test starts it, creates the flag, kills the process, and the restart
fails: "make the next start fail".
"""

from __future__ import annotations

import http.server
import json
import os
import sys


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
    flag = os.environ.get("FAIL_FLAG", "")
    if flag and os.path.exists(flag):
        print("flaky: refusing to start, the fail flag is set", flush=True)
        sys.exit(3)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
