"""WebSockets through Bastion to a real Starlette app under uvicorn (tests/apps/ws_starlette.py),
with aiohttp's client: text and binary frames both ways, close codes kept, the
handshake headers the app sees, a refused handshake, and the same over TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from conftest import tls_config
from harness import BastionProcess, app_command, simple_config


@pytest.fixture(scope="module")
def bastion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp("ws")
    ca = trustme.CA()
    config = simple_config(
        {"ws": {"command": app_command("uvicorn", "ws_starlette:app")},
         "nows": {"command": app_command("uvicorn", "ws_starlette:app"),
                  "hosts": ["nows.test"], "websockets": False}},
        tls=tls_config(ca, tmp / "tls"),
    )
    with BastionProcess(tmp, config, tls_ca=ca) as proc:
        assert proc.get("/plain").body == b"plain"
        yield proc


def _urls(bastion: BastionProcess) -> list[tuple[str, ssl.SSLContext | None]]:
    context = ssl.create_default_context()
    bastion.tls_ca.configure_trust(context)
    return [(f"ws://127.0.0.1:{bastion.port(0)}", None),
            (f"wss://127.0.0.1:{bastion.port(1)}", context)]


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_echo_text_and_binary(bastion: BastionProcess, tls: bool) -> None:
    base, context = _urls(bastion)[tls]

    async def go() -> None:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{base}/ws", ssl=context or False) as ws:
            for i in range(20):
                await ws.send_str(f"hello {i}")
                assert await ws.receive_str() == f"hello {i}"
            blob = bytes(range(256)) * 1024  # 256 KiB in one frame
            await ws.send_bytes(blob)
            assert await ws.receive_bytes() == blob
            await ws.send_str("é✓ unicode")
            assert await ws.receive_str() == "é✓ unicode"
            await ws.close(code=4001)
            assert ws.close_code == 4001

    run(go())


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_app_close_code_kept(bastion: BastionProcess, tls: bool) -> None:
    base, context = _urls(bastion)[tls]

    async def go() -> None:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{base}/ws", ssl=context or False) as ws:
            await ws.send_str("close:4321")
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert message.data == 4321
            assert message.extra == "bye"

    run(go())


def test_handshake_headers_and_subprotocol(bastion: BastionProcess) -> None:
    base, _ = _urls(bastion)[0]

    async def go() -> None:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{base}/ws-info", protocols=("chat",),
                                   headers={"X-Bastion-Token": "forged"}) as ws:
            assert ws.protocol == "chat"
            seen = await ws.receive_json()
            headers = seen["headers"]
            assert headers["upgrade"].lower() == "websocket"
            assert "upgrade" in headers["connection"].lower()
            assert headers["x-forwarded-proto"] == "http"
            assert headers["x-forwarded-for"] == "127.0.0.1"
            assert "x-bastion-token" not in headers  # checked and removed by the middleware
            assert seen["path"] == "/ws-info"
            await ws.send_str("again")
            assert await ws.receive_str() == "again"

    run(go())


def test_refused_handshake_is_relayed(bastion: BastionProcess) -> None:
    base, _ = _urls(bastion)[0]

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"{base}/reject")
            assert info.value.status == 403

    run(go())
    assert bastion.get("/plain").body == b"plain"  # the listener is fine afterwards


def test_many_sockets_at_once(bastion: BastionProcess) -> None:
    base, _ = _urls(bastion)[0]

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        async with session.ws_connect(f"{base}/ws") as ws:
            for i in range(5):
                await ws.send_str(f"{n}-{i}")
                assert await ws.receive_str() == f"{n}-{i}"

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(session, n) for n in range(30)))

    run(go())


def test_client_vanishing_closes_upstream(bastion: BastionProcess, tmp_path: Path) -> None:
    base, _ = _urls(bastion)[0]

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{base}/ws")
            await ws.send_str("x")
            assert await ws.receive_str() == "x"
            # Drop the TCP connection without a close frame.
            assert ws._response.connection is not None
            ws._response.connection.transport.abort()  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{base}/ws") as ws:
            await ws.send_str("still")
            assert await ws.receive_str() == "still"

    run(go())


def test_app_without_websockets_gets_a_plain_request(bastion: BastionProcess) -> None:
    """``websockets: false``: the upgrade is not tunnelled; the app sees a plain GET
    (Upgrade is hop-by-hop) and answers it as such, so the handshake fails."""
    base, _ = _urls(bastion)[False]
    assert bastion.get("/plain", host="nows.test").body == b"plain"

    async def go() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"{base}/ws", headers={"Host": "nows.test"}):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    status = run(go())
    assert status != 101 and isinstance(status, int) and status >= 400, status
