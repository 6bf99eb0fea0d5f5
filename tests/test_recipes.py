"""The recipes of docs/recipes.md, run as they are written: ``examples/<name>/bastion.yaml``
with real servers (uvicorn, hypercorn, gunicorn, aiohttp's own) behind a real Bastion over
TLS, each app mounted at ``/prefix``.

Each recipe gets one Bastion (module scope, started with ``proxy.pytest_plugin.start_bastion``,
which rewrites the listeners to free loopback ports with a trusted test certificate; the
example's ``uvicorn`` / ``gunicorn`` / ``python`` are found on a PATH that starts with this
interpreter's directory). Clients connect from 127.0.0.2 so "the app saw the client's address"
cannot be confused with "the app saw Bastion's own loopback address" (127.0.0.1).

What the *framework* reports is checked, not what the middleware put in the environ:
``request.is_secure()`` / ``request.url.scheme``, the client address, absolute URLs built by
the framework (``url_for(_external=True)``, ``build_absolute_uri``, ``request.url_for``),
where the framework's own redirect lands, WebSockets (ASGI recipes), and that a direct hit on
the app's port without the pairing token is refused with 400.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from bastion.proxy.pytest_plugin import BastionHandle, start_bastion

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLIENT = "127.0.0.2"
PREFIX = "/prefix"

WITH_MIDDLEWARE = ["fastapi-uvicorn", "starlette-hypercorn", "django-gunicorn",
                   "django-uvicorn", "flask-gunicorn", "aiohttp"]
# The same apps in process (docs/hosting-models.md): no server, no port, no token.
IN_PROCESS = ["fastapi-inprocess", "django-inprocess", "flask-inprocess"]
ALL = [*WITH_MIDDLEWARE, "flask-proxyfix", *IN_PROCESS]
WEBSOCKETS = ["fastapi-uvicorn", "starlette-hypercorn", "fastapi-inprocess"]


@dataclass
class Recipe:
    name: str
    bastion: BastionHandle
    app: str

    def get(self, path: str, **kw: Any) -> Any:
        return self.bastion.get(path, source_address=(CLIENT, 0), **kw)


@pytest.fixture(scope="module")
def recipe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Recipe]:
    name: str = request.param
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    handle = start_bastion(tmp_path_factory.mktemp(name), EXAMPLES / name / "bastion.yaml",
                           env=env, warmup=f"{PREFIX}/", start_timeout=60)
    try:
        (app,) = handle.apps
        assert handle.apps[app]["path"] == PREFIX
        yield Recipe(name, handle, app)
    finally:
        problems = handle.close()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def info(recipe: Recipe) -> dict[str, Any]:
    response = recipe.get(f"{PREFIX}/info")
    assert response.status == 200, f"{response.status} {response.text}\n{recipe.bastion.log()}"
    data: dict[str, Any] = response.json()
    return data


@pytest.mark.parametrize("recipe", ALL, indirect=True)
def test_the_framework_reports_https_and_the_client_address(recipe: Recipe) -> None:
    seen = info(recipe)
    assert seen["scheme"] == "https"
    assert seen["secure"] is True
    assert seen["client"] == CLIENT
    assert seen["path"] in (f"{PREFIX}/info", "/info")  # request.path: with or without base


@pytest.mark.parametrize("recipe", ALL, indirect=True)
def test_plain_http_is_reported_as_http(recipe: Recipe) -> None:
    response = recipe.get(f"{PREFIX}/info", https=False)
    assert response.status == 200, response.text
    seen = response.json()
    assert seen["scheme"] == "http"
    assert seen["secure"] is False
    assert seen["url"] == f"{recipe.bastion.http_url}{PREFIX}/info"


@pytest.mark.parametrize("recipe", ALL, indirect=True)
def test_absolute_urls_carry_https_the_host_and_the_prefix(recipe: Recipe) -> None:
    assert info(recipe)["url"] == f"{recipe.bastion.https_url}{PREFIX}/info"


@pytest.mark.parametrize("recipe", ALL, indirect=True)
def test_a_redirect_by_the_framework_lands_under_the_prefix(recipe: Recipe) -> None:
    response = recipe.get(f"{PREFIX}/go")
    assert response.status in (301, 302, 303, 307, 308), response.text
    base = f"{recipe.bastion.https_url}{PREFIX}/go"
    target = urljoin(base, response.headers["location"])
    assert target == f"{recipe.bastion.https_url}{PREFIX}/info"
    followed = recipe.get(urlsplit(target).path)
    assert followed.status == 200
    assert followed.json()["url"] == target


@pytest.mark.parametrize("recipe", WITH_MIDDLEWARE, indirect=True)
def test_a_direct_hit_on_the_app_port_without_the_token_is_400(recipe: Recipe) -> None:
    (port,) = recipe.bastion.ports(recipe.app)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", f"{PREFIX}/info", headers={
            "Host": "127.0.0.1", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9",
            "X-Bastion-Token": "guessed"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 400, body
    assert b"not paired with Bastion" in body


@pytest.mark.parametrize("recipe", ["flask-proxyfix"], indirect=True)
def test_proxyfix_trusts_whoever_reaches_the_app_port(recipe: Recipe) -> None:
    """The trade-off of the ProxyFix recipe (docs/recipes.md): no pairing token, so a local
    process hitting the app's port directly can claim any client address and scheme."""
    (port,) = recipe.bastion.ports(recipe.app)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", f"{PREFIX}/info", headers={
            "Host": "127.0.0.1", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Prefix": PREFIX})
        response = conn.getresponse()
        seen = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200
    assert seen["client"] == "203.0.113.9"
    assert seen["secure"] is True


async def _websocket(recipe: Recipe) -> tuple[dict[str, Any], str]:
    import aiohttp

    url = f"wss://127.0.0.1:{recipe.bastion.https_port}{PREFIX}/ws"
    connector = aiohttp.TCPConnector(local_addr=(CLIENT, 0), ssl=recipe.bastion.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws:
            hello = await ws.receive_json(timeout=10)
            await ws.send_str("ping")
            echo = await ws.receive_str(timeout=10)
            await ws.close()
    return hello, echo


@pytest.mark.parametrize("recipe", WEBSOCKETS, indirect=True)
def test_a_websocket_works_through_bastion(recipe: Recipe) -> None:
    hello, echo = asyncio.run(_websocket(recipe))
    assert echo == "echo: ping"
    assert hello["scheme"] == "wss"
    assert hello["client"] == CLIENT
    assert hello["url"] == f"wss://127.0.0.1:{recipe.bastion.https_port}{PREFIX}/ws"
