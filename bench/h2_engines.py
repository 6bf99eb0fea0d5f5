"""CPU per request of the two HTTP/2 engines alone: framing, HPACK, stream state.

    python bench/h2_engines.py [--json] [REQUESTS]   (default 20000 per engine and variant)

``--json`` prints ``[[variant, µs], ...]`` (``bench/matrix.py`` runs it for the report).

No sockets, no app: a client's bytes (made once by an ``h2`` client: HEADERS with
HPACK's dynamic table in use, as a browser or h2load sends them, ten streams per read
as ``h2load -m10``) go into a server-side session, which answers each stream with a
response head and a 13-byte body; the bytes out are collected once per read, as
``proxy/edge/h2native.py`` does. Measured with ``time.process_time()`` (CPU of this
process), so other work on the machine changes the figures less than a wall-clock rate.

Variants:

* ``h2``: the ``h2`` library's ``H2Connection``, with its own header validation and
  normalisation on (as Bastion used it before) and off (as ``h2server.py`` uses it now:
  Bastion validates);
* ``ng2``: libnghttp2 through ``proxy/edge/_ng2.c`` (skipped when it is not built);
* ``+ checks``: the same with what Bastion does per request on either engine: the
  request head checked and translated (``h2translate.request_from_h2``), the response
  head built (``h2translate.response_to_h2``).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events

from bastion.proxy.edge.h2translate import request_from_h2, response_to_h2

BATCH = 10  # streams per read (h2load -m10)
PER_CONNECTION = 2000  # requests per connection (the client's windows are never exhausted)
BODY = b"Hello, World!"
RESPONSE_FIELDS = [("content-type", "text/plain"), ("date", "Thu, 03 Dec 2026 06:00:00 GMT"),
                   ("server", "bastion")]


def client_reads(count: int) -> list[bytes]:
    """The bytes an h2 client sends for ``count`` GET requests, one item per read."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.increment_flow_control_window(2**30)
    reads = [conn.data_to_send()]
    for start in range(0, count, BATCH):
        for _ in range(min(BATCH, count - start)):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"),
                                    (":path", f"/items/{sid}?q=1"),
                                    (":authority", "bench.example"),
                                    ("user-agent", "h2load nghttp2/1.52.0"),
                                    ("accept", "*/*"), ("accept-encoding", "gzip, br"),
                                    ("cookie", "session=abcdef0123456789")],
                              end_stream=True)
        reads.append(conn.data_to_send())
    return reads


def serve_h2(reads: list[bytes], validate: bool, checks: bool) -> int:
    """One connection through ``h2``; returns the bytes written."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=validate,
        normalize_inbound_headers=False, validate_outbound_headers=validate,
        normalize_outbound_headers=validate))
    conn.initiate_connection()
    written = len(conn.data_to_send())
    for data in reads:
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                sid = event.stream_id
                assert sid is not None
                if checks:
                    request_from_h2(event.headers or [], "https")
                    head = response_to_h2(200, RESPONSE_FIELDS, len(BODY))
                else:
                    head = [(b":status", b"200"), (b"content-length", b"13"),
                            *((n.encode(), v.encode()) for n, v in RESPONSE_FIELDS)]
                conn.send_headers(sid, head)
                conn.send_data(sid, BODY, end_stream=True)
        written += len(conn.data_to_send())
    return written


def serve_ng2(reads: list[bytes], checks: bool) -> int:
    """One connection through ``_ng2``; returns the bytes written."""
    ng2 = importlib.import_module("bastion.proxy.edge._ng2")
    session = ng2.Session(max_streams=100, max_header_list=65536, initial_window=65535,
                          connection_window=4 * 1024 * 1024)
    written = len(session.send(1 << 20))
    request = ng2.EV_REQUEST
    for data in reads:
        for event in session.receive(data) or ():
            if event[0] == request:
                sid = event[1]
                if checks:
                    request_from_h2(event[2], "https")
                    head = response_to_h2(200, RESPONSE_FIELDS, len(BODY))
                else:
                    head = [(b":status", b"200"), (b"content-length", b"13"),
                            *((n.encode(), v.encode()) for n, v in RESPONSE_FIELDS)]
                session.respond(sid, head, True)
                session.write(sid, [BODY], True)
        written += len(session.send(1 << 20))
        session.events()
    return written


def measure(serve: Callable[[list[bytes]], int], total: int) -> float:
    """CPU microseconds per request over ``total`` requests."""
    reads = client_reads(PER_CONNECTION)
    serve(reads)  # warm-up (imports, caches)
    connections = max(1, total // PER_CONNECTION)
    started = time.process_time()
    for _ in range(connections):
        assert serve(reads) > 0
    return (time.process_time() - started) / (connections * PER_CONNECTION) * 1e6


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--json"]
    as_json = "--json" in sys.argv[1:]
    total = int(args[0]) if args else 20000
    variants: list[tuple[str, Callable[[list[bytes]], int]]] = [
        ("h2, its validation on", lambda r: serve_h2(r, True, False)),
        ("h2, its validation off", lambda r: serve_h2(r, False, False)),
        ("h2, validation off + Bastion's checks", lambda r: serve_h2(r, False, True)),
    ]
    try:
        importlib.import_module("bastion.proxy.edge._ng2")
    except ImportError:
        if not as_json:
            print("(ng2 is not built: python -m bastion.proxy.edge.native builds it)")
    else:
        variants += [("ng2 (libnghttp2)", lambda r: serve_ng2(r, False)),
                     ("ng2 + Bastion's checks", lambda r: serve_ng2(r, True))]
    if as_json:
        print(json.dumps([[name, round(measure(serve, total), 2)] for name, serve in variants]))
        return
    print(f"CPU µs per request (framing + HPACK + stream state; {total} requests, "
          f"{BATCH} streams per read)")
    for name, serve in variants:
        print(f"  {name:40s} {measure(serve, total):7.1f}")


if __name__ == "__main__":
    main()
