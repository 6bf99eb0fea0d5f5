"""Start shim used by the ``bastion`` pytest fixture: ``python -m bastion.proxy.pytest_plugin_shim FLAG -- argv...``.

The fixture wraps every app command in this shim so that ``fail_next_start(app)`` can make
exactly one start fail: when ``FLAG`` exists, the shim deletes it, prints one line and exits
with status 1 (before the app could listen, so Bastion sees a failed start). Otherwise it
replaces itself with ``argv`` (``os.execvp``): same pid, same process group, nothing left
in between. Standard library only; it must start fast.
"""

from __future__ import annotations

import os
import sys

USAGE = "usage: python -m bastion.proxy.pytest_plugin_shim FLAGFILE -- COMMAND [ARG...]"


def main(args: list[str] | None = None) -> int:
    """Fail once if the flag file exists, else exec the command (does not return then)."""
    argv = sys.argv[1:] if args is None else args
    if len(argv) < 3 or argv[1] != "--":
        print(USAGE, file=sys.stderr, flush=True)
        return 2
    flag, command = argv[0], argv[2:]
    try:
        os.unlink(flag)
    except FileNotFoundError:
        pass
    else:
        print("bastion pytest plugin: this start fails on purpose (fail_next_start)",
              file=sys.stderr, flush=True)
        return 1
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"bastion pytest plugin: cannot run {command[0]!r}: {exc.strerror or exc}",
              file=sys.stderr, flush=True)
        return 127
    return 0  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main())
