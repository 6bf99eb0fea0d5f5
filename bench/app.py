"""The benchmark's upstream: a tiny aiohttp "hello" app on 127.0.0.1.

    python bench/app.py --port 18080

It answers every request with 200 and a 13-byte text body, keeps connections alive,
and stops on SIGTERM/SIGINT. ``GET /big?size=N`` streams N bytes (Content-Length N, in
256 KiB writes of one preallocated buffer) for the download benchmark. Every response
carries ``X-App-Pid`` so the crash-recovery measurement can tell a new process from the
old one. ``GET /page`` is the 100 KiB HTML page of the gzip cell (``wsgi_app.page``).
It uses aiohttp's low-level server (compiled HTTP parser)
and uvloop when installed, so that the proxy in front of it, not the app, is what the
benchmark measures as far as one Python process allows. Bastion launches the same file
with ``{port}`` substituted; the BASTION_* environment it gets is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from aiohttp import web
from wsgi_app import PAGE  # the gzip cell's 100 KiB HTML page (same folder)

BODY = b"Hello, world\n"
CHUNK = b"x" * (256 * 1024)
HEADERS = {"X-App-Pid": str(os.getpid())}


async def big(request: web.BaseRequest) -> web.StreamResponse:
    try:
        size = max(0, int(request.query.get("size", "0")))
    except ValueError:
        return web.Response(status=400, text="size must be an integer\n")
    response = web.StreamResponse(headers=HEADERS)
    response.content_type = "application/octet-stream"
    response.content_length = size
    await response.prepare(request)
    view = memoryview(CHUNK)
    left = size
    while left > 0:
        n = min(left, len(CHUNK))
        await response.write(view[:n])
        left -= n
    await response.write_eof()
    return response


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.body_exists:
        await request.read()
    if request.path == "/big":
        return await big(request)
    if request.path == "/page":
        return web.Response(body=PAGE, content_type="text/html", charset="utf-8",
                            headers=HEADERS)
    return web.Response(body=BODY, content_type="text/plain", headers=HEADERS)


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
