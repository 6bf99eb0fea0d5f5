"""The HTML page both demo apps show: what the app saw of the request."""

from __future__ import annotations

import html
import os


def render(flavour: str, seen: dict[str, str]) -> bytes:
    """A small page listing ``seen`` (scheme, client, root path, path, pid, port)."""
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>"
        for k, v in seen.items()
    )
    other = '<a href="/wsgi/">the WSGI app</a>' if flavour == "ASGI" else '<a href="/">the ASGI app</a>'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bastion demo ({flavour})</title></head>
<body><h1>Bastion demo: {flavour} app</h1>
<p>This is what the app received, after Bastion and the integration middleware.</p>
<table>
{rows}
<tr><th>pid</th><td><code>{os.getpid()}</code></td></tr>
<tr><th>port</th><td><code>{html.escape(os.environ.get("BASTION_PORT", "?"))}</code></td></tr>
</table>
<p>See also {other}.</p>
</body></html>
""".encode()
