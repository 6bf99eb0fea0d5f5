"""A tiny raw-socket HTTP/1.1 app for edge tests: counts what reaches it, shows the exact
bytes it got, and answers with chosen malformations.

Runs on ``$PORT`` (asyncio streams, no framework, so nothing is normalised on its side).

  /__count          {"count": N}: requests that reached the app (the /__ ones excluded)
  /__events         {"events": [...]}: e.g. "disconnect /hang" when a client went away
  /__reset          clears both
  /hang             never answers; records the disconnect when Bastion closes
  /bad/KIND         a malformed response (see BAD), then the connection closes
  /close-next       200 keep-alive, then closes this connection on its next request
  anything else     200 JSON: method, target, head (raw), body, raw_body (as framed)
"""

from __future__ import annotations

import asyncio
import json
import os

STATE: dict[str, list[str] | int] = {"count": 0, "events": []}

BAD = {
    "cl-conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "status-line": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
    "nul-header": b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "no-colon": b"HTTP/1.1 200 OK\r\nBadHeader\r\nContent-Length: 2\r\n\r\nok",
    "space-name": b"HTTP/1.1 200 OK\r\nX-Bad : 1\r\nContent-Length: 2\r\n\r\nok",
    "cl-sign": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "te-and-cl": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
                  b"2\r\nok\r\n0\r\n\r\n"),
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "empty": b"",
    "truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this much",
    "truncated-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}


def _json(status: int, data: object, close: bool = False) -> bytes:
    body = json.dumps(data).encode()
    head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


async def _read_body(reader: asyncio.StreamReader, head: dict[str, str]) -> tuple[bytes, bytes]:
    """(body, raw framed bytes)."""
    if head.get("transfer-encoding", "").lower() == "chunked":
        body, raw = b"", b""
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:
                    trailer = await reader.readuntil(b"\r\n")
                    raw += trailer
                    if trailer == b"\r\n":
                        return body, raw
            data = await reader.readexactly(size + 2)
            raw += data
            body += data[:-2]
    length = int(head.get("content-length", "0") or 0)
    data = await reader.readexactly(length) if length else b""
    return data, data


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    close_next = False
    try:
        while True:
            try:
                raw_head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = raw_head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            head: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    head[name.strip().lower()] = value.strip()
            if close_next:
                return
            if target.startswith("/__"):
                if target == "/__reset":
                    STATE["count"] = 0
                    STATE["events"] = []
                writer.write(_json(200, {"count": STATE["count"], "events": STATE["events"]}))
                await writer.drain()
                continue
            STATE["count"] = int(STATE["count"]) + 1  # type: ignore[call-overload]
            if target == "/hang":
                try:
                    while await reader.read(65536):
                        pass
                finally:
                    events = STATE["events"]
                    assert isinstance(events, list)
                    events.append("disconnect /hang")
                return
            body, raw = await _read_body(reader, head)
            if target.startswith("/bad/"):
                writer.write(BAD[target[5:]])
                await writer.drain()
                return
            if target == "/close-next":
                close_next = True
            writer.write(_json(200, {
                "method": method, "target": target, "head": raw_head.decode("latin-1"),
                "headers": head, "body": body.decode("latin-1"),
                "raw_body": raw.decode("latin-1"), "pid": os.getpid(),
            }))
            await writer.drain()
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", int(os.environ["PORT"]))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
