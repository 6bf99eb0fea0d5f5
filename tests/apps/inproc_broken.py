"""An app that cannot be imported (in-process hosting tests)."""

raise ImportError("this app is broken on purpose")
