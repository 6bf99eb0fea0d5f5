"""The module's exceptions: one small hierarchy, no HTTP in it."""

from __future__ import annotations


class ModuleError(Exception):
    """Base of every error the module raises."""


class UnknownApp(ModuleError):
    """A message named an app the module does not know."""


class LaunchError(ModuleError):
    """An app process could not be started at all (bad command, cwd, user)."""


class StartFailed(ModuleError):
    """A started process exited or did not listen within its startup time limit."""

    def __init__(self, reason: str, detail: str = "", port_taken: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.port_taken = port_taken  # another process holds the port: try another one
