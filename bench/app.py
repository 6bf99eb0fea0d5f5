"""The benchmark's upstream: a tiny aiohttp "hello" app on 127.0.0.1.

    python bench/app.py --port 18080

It answers every request with 200 and a 13-byte text body, keeps connections alive,
and stops on SIGTERM/SIGINT. It uses aiohttp's low-level server (compiled HTTP parser)
and uvloop when installed, so that the proxy in front of it, not the app, is what the
benchmark measures as far as one Python process allows. Bastion launches the same file
with ``{port}`` substituted; the BASTION_* environment it gets is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

BODY = b"Hello, world\n"


async def handle(request: web.BaseRequest) -> web.Response:
    if request.body_exists:
        await request.read()
    return web.Response(body=BODY, content_type="text/plain")


async def main(host: str, port: int) -> None:
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.host, args.port))
