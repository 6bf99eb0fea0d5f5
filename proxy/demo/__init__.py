"""The built-in demo: ``bastion serve`` with no configuration.

Two apps in one pool, each showing what it received through Bastion: an ASGI app at
``/`` and a WSGI app at ``/wsgi/``, over http://127.0.0.1:8080 and https://127.0.0.1:8443
(with the development certificate, made on first use).
"""

from __future__ import annotations

import sys

from bastion.module.spec import AppSpec, PoolSettings

from ..config.model import CertificatePair, Config, Listener, Route, TLSSettings
from ..control.devcert import dev_cert_dir, ensure_dev_cert

HTTP_PORT = 8080
HTTPS_PORT = 8443


def demo_config() -> Config:
    """The configuration of the demo."""
    cert = ensure_dev_cert()
    pool = PoolSettings(startup_time_limit=30.0, request_timeout=30.0)
    apps = (
        AppSpec(
            name="demo-asgi",
            command=(sys.executable, "-m", "bastion.proxy.demo.asgi_host", "--port", "{port}"),
            pool="demo",
            settings=pool,
            path_base="",
            https_port=HTTPS_PORT,
        ),
        AppSpec(
            name="demo-wsgi",
            command=(sys.executable, "-m", "bastion.proxy.demo.wsgi_app", "--port", "{port}"),
            pool="demo",
            settings=pool,
            path_base="/wsgi",
            https_port=HTTPS_PORT,
        ),
    )
    return Config(
        listeners=(
            Listener("127.0.0.1", HTTP_PORT),
            Listener(
                "127.0.0.1",
                HTTPS_PORT,
                tls=TLSSettings(certificates=(CertificatePair(str(cert.cert_path), str(cert.key_path)),)),
            ),
        ),
        apps=apps,
        routes=(Route("demo-asgi", (), "/"), Route("demo-wsgi", (), "/wsgi")),
        pools={"default": PoolSettings(), "demo": pool},
        admin_socket=str(dev_cert_dir() / "admin.sock"),
        access_log="-",
        workers=1,
        source="<built-in demo>",
    )
