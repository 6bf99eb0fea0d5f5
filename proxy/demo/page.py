"""The HTML page both demo apps show: what Bastion did, what the app saw, ``bastion status``."""

from __future__ import annotations

import html
import os


def _field(seen: dict[str, str], name: str) -> str:
    for key, value in seen.items():
        if key.split(" (")[0] == name:
            return value
    return "?"


def _status() -> str:
    """``bastion status`` of the Bastion running this demo (its admin socket)."""
    try:
        from ..control.adminclient import Found, call
        from ..control.cli import _format_status
        from ..control.devcert import dev_cert_dir

        found = Found(str(dev_cert_dir() / "admin.sock"), "the demo's admin socket")
        status, data = call(found, "GET", "/status", timeout=5)
        return _format_status(data) if status == 200 else f"(admin socket answered {status})"
    except Exception as exc:  # noqa: BLE001 - the page works without it
        return f"(not available: {exc})"


def _ca_path() -> str:
    try:
        from ..control.devcert import dev_cert_dir

        return str(dev_cert_dir() / "ca.pem")
    except Exception:  # noqa: BLE001
        return "ca.pem in Bastion's data directory (bastion dev-cert)"


def render(flavour: str, seen: dict[str, str]) -> bytes:
    """A small page listing ``seen`` (scheme, client, root path, path, pid, port)."""
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>"
        for k, v in seen.items()
    )
    other = '<a href="/wsgi/">the WSGI app</a>' if flavour == "ASGI" else '<a href="/">the ASGI app</a>'
    scheme = _field(seen, "scheme")
    app = os.environ.get("BASTION_APP", "?")
    port = os.environ.get("BASTION_PORT", "?")
    tls = ", terminated TLS with the development certificate" if scheme == "https" else ""
    https_port = os.environ.get("BASTION_HTTPS_PORT", "8443")
    ca = _ca_path()
    e = html.escape
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bastion demo ({flavour})</title></head>
<body><h1>Bastion demo: {flavour} app</h1>
<p id="what">Bastion accepted your {e(scheme)} request{tls}, routed the path
<code>{e(_field(seen, "root_path") + _field(seen, "path"))}</code> to the app <code>{e(app)}</code>, which
it started itself on loopback port {e(port)}, and forwarded the request there with a pairing
token. The integration middleware in the app checked that token and restored your scheme, your
address <code>{e(_field(seen, "client"))}</code> and the path base
<code>{e(_field(seen, "root_path")) or "/"}</code>, so the app sees the request as you made it.</p>
<table>
{rows}
<tr><th>pid</th><td><code>{os.getpid()}</code></td></tr>
<tr><th>port</th><td><code>{e(port)}</code></td></tr>
</table>
<p>See also {other}.</p>
<h2><code>bastion status</code></h2>
<pre id="status">{e(_status())}</pre>
<h2>HTTPS without warnings</h2>
<p>The development CA is <code id="ca">{e(ca)}</code>:
<code>curl --cacert {e(ca)} https://127.0.0.1:{e(https_port)}/</code>, or import it into
your browser's trusted authorities (<code>bastion dev-cert</code> shows it again).</p>
</body></html>
""".encode()
