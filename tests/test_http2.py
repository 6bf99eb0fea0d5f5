"""HTTP/2 at the edge: a real Bastion over TLS (trustme), clients built on ``h2`` and raw
``hyperframe`` frames, curl and nghttp; every test runs against both HTTP/2 engines
(``ng2``, libnghttp2, and ``h2``, the fallback: ``BASTION_H2_ENGINE=h2``).

Well-formed traffic: GET, POST with a body, many concurrent streams, a large download
under flow control, error pages, HTTP/1.1 still served on the same listener. Then more
than 30 malformed inputs and floods, each expecting a RST_STREAM on its stream or a
GOAWAY (or the connection closed), and each followed by a request on a new connection to
show the proxy still serves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
import trustme
from conftest import ca_pem_path, tls_config
from harness import BastionProcess, app_command, free_port
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_TIMEOUT = 2


def tls_socket(port: int, ca: trustme.CA, alpn: list[str]) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


class H2Client:
    """A blocking HTTP/2 client on the ``h2`` state machine."""

    def __init__(self, port: int, ca: trustme.CA) -> None:
        self.port = port
        self.sock = tls_socket(port, ca, ["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 * 1024 * 1024)
        self.flush()
        self.responses: dict[int, dict[str, Any]] = {}
        self.events: list[h2.events.Event] = []
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
              end: bool = True, authority: str | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "https"), (":path", path),
                  (":authority", authority or f"127.0.0.1:{self.port}"), *(headers or [])]
        self.conn.send_headers(sid, fields, end_stream=end)
        self.responses[sid] = {"status": None, "headers": [], "body": bytearray(),
                               "done": False, "reset": None}
        self.flush()
        return sid

    def pump(self, timeout: float = 10.0) -> None:
        """Read once and handle the events."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            raise ConnectionError("closed")
        for event in self.conn.receive_data(data):
            self.events.append(event)
            sid = getattr(event, "stream_id", None)
            slot = self.responses.get(sid) if sid else None
            if isinstance(event, h2.events.ResponseReceived) and slot is not None:
                head = dict(event.headers)
                slot["status"] = int(head[b":status"])
                slot["headers"] = event.headers
            elif isinstance(event, h2.events.DataReceived):
                if slot is not None:
                    slot["body"] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded) and slot is not None:
                slot["done"] = True
            elif isinstance(event, h2.events.StreamReset) and slot is not None:
                slot["reset"] = event.error_code
                slot["done"] = True
        self.flush()

    def send_body(self, sid: int, body: bytes) -> None:
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self.pump()
                continue
            self.conn.send_data(sid, view[:window].tobytes())
            view = view[window:]
            self.flush()
        self.conn.end_stream(sid)
        self.flush()

    def wait(self, *sids: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not all(self.responses[s]["done"] for s in sids):
            assert time.monotonic() < deadline, "timed out"
            self.pump()
        return [self.responses[s] for s in sids]

    def get(self, path: str, **kw: Any) -> dict[str, Any]:
        return self.wait(self.start("GET", path, **kw))[0]

    def close(self) -> None:
        self.sock.close()


class RawClient:
    """Raw frames over TLS with ALPN h2: for inputs ``h2`` would refuse to send."""

    def __init__(self, port: int, ca: trustme.CA, preface: bool = True) -> None:
        self.sock = tls_socket(port, ca, ["h2"])
        self.encoder = hpack.Encoder()
        self.buffer = b""
        if preface:
            self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def send(self, *frames: Frame) -> None:
        try:
            self.sock.sendall(b"".join(f.serialize() for f in frames))
        except OSError:
            pass

    def headers(self, sid: int, fields: list[tuple[str, str]], end_stream: bool = True,
                end_headers: bool = True) -> HeadersFrame:
        frame = HeadersFrame(sid)
        frame.data = self.encoder.encode(fields)
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    def frames(self, timeout: float) -> Iterator[Frame | None]:
        """Frames from the server; None once the connection is closed."""
        deadline = time.monotonic() + timeout
        while True:
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9:9 + length]))
                self.buffer = self.buffer[9 + length:]
                yield frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the server")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                yield None
                return
            self.buffer += data

    def outcome(self, sid: int | None = None, timeout: float = 10.0) -> tuple[str, int | None]:
        """("rst", code) for a reset of ``sid``, ("goaway", code), or ("closed", None)."""
        for frame in self.frames(timeout):
            if frame is None:
                return "closed", None
            if isinstance(frame, GoAwayFrame):
                return "goaway", frame.error_code
            if isinstance(frame, RstStreamFrame) and (sid is None or frame.stream_id == sid):
                return "rst", frame.error_code
        return "closed", None  # pragma: no cover

    def close(self) -> None:
        self.sock.close()


# -- the server ------------------------------------------------------------------------

ENGINES = ["ng2", "h2"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The HTTP/2 engine under test (the native one skips when it is not built)."""
    name: str = request.param
    if name == "ng2" and importlib.util.find_spec("bastion.proxy.edge._ng2") is None:
        pytest.skip("the native HTTP/2 engine is not built here (no compiler or "
                    "libnghttp2-dev at set-up)")
    return name


def engine_env(engine: str) -> dict[str, str]:
    return {"BASTION_H2_ENGINE": engine}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def bastion(engine: str, ca: trustme.CA,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionProcess]:
    tmp = tmp_path_factory.mktemp(f"h2-{engine}")
    tls = {**tls_config(ca, tmp / "tls"), "hsts": 600}
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}", "tls": tls}],
        "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app"),
                          "hosts": ["127.0.0.1", "localhost"]}},
        "limits": {"header_timeout": HEADER_TIMEOUT, "max_header_size": "16k"},
    }
    with BastionProcess(tmp, config, env=engine_env(engine), tls_ca=ca) as proc:
        proc.ca_file = ca_pem_path(ca, tmp)  # type: ignore[attr-defined]
        client = H2Client(proc.port(), ca)
        assert client.get("/info")["status"] == 200  # the app is started
        client.close()
        yield proc


def test_engine_in_use(bastion: BastionProcess, engine: str) -> None:
    assert f"HTTP/2 engine: {engine} (" in bastion.log()


@pytest.fixture
def h2c(bastion: BastionProcess, ca: trustme.CA) -> Iterator[H2Client]:
    client = H2Client(bastion.port(), ca)
    yield client
    client.close()


def still_serves(bastion: BastionProcess, ca: trustme.CA) -> None:
    client = H2Client(bastion.port(), ca)
    try:
        assert client.get("/info")["status"] == 200
    finally:
        client.close()


# -- well-formed traffic -------------------------------------------------------------------


def test_get(h2c: H2Client, bastion: BastionProcess) -> None:
    resp = h2c.get("/info?x=1", headers=[("cookie", "a=1"), ("cookie", "b=2"),
                                         ("user-agent", "h2-test"), ("x-tab", "a\tb")])
    assert resp["status"] == 200
    heads = dict(resp["headers"])
    assert heads[b"strict-transport-security"] == b"max-age=600"
    # The app's own Server (uvicorn sends one) is replaced, as over HTTP/1.1.
    assert [v for n, v in resp["headers"] if n == b"server"] == [b"bastion"]
    seen = json.loads(resp["body"])
    got = {k: v for k, v in seen["headers"]}
    assert seen["query"] == "x=1"
    assert seen["scheme"] == "https"
    assert got["host"] == f"127.0.0.1:{bastion.port()}"
    assert got["cookie"] == "a=1; b=2"
    assert got["x-tab"] == "a\tb"  # HTAB is the one control allowed in a value
    assert got["x-forwarded-proto"] == "https"
    assert "x-bastion-token" not in got


def test_head_keeps_length(h2c: H2Client) -> None:
    resp = h2c.wait(h2c.start("HEAD", "/download?size=1234"))[0]
    assert resp["status"] == 200
    assert dict(resp["headers"])[b"content-length"] == b"1234"
    assert resp["body"] == b""


def test_post_with_body(h2c: H2Client) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: more than the windows
    sid = h2c.start("POST", "/upload", headers=[("content-length", str(len(body)))], end=False)
    h2c.send_body(sid, body)
    resp = h2c.wait(sid)[0]
    assert resp["status"] == 200
    assert json.loads(resp["body"]) == {"size": len(body),
                                        "sha256": hashlib.sha256(body).hexdigest()}


def test_post_without_length(h2c: H2Client) -> None:
    body = b"y" * 200_000
    sid = h2c.start("POST", "/upload", end=False)
    h2c.send_body(sid, body)
    assert json.loads(h2c.wait(sid)[0]["body"])["size"] == len(body)


def test_many_concurrent_streams(h2c: H2Client) -> None:
    sids = [h2c.start("GET", f"/info?n={i}") for i in range(90)]
    responses = h2c.wait(*sids)
    assert [r["status"] for r in responses] == [200] * 90
    assert {json.loads(r["body"])["query"] for r in responses} == {f"n={i}" for i in range(90)}


def test_large_download_flow_control(h2c: H2Client) -> None:
    size = 20 * 1024 * 1024
    sids = [h2c.start("GET", f"/download?size={size}") for _ in range(2)]
    for resp in h2c.wait(*sids, timeout=60):
        assert resp["status"] == 200
        assert len(resp["body"]) == size


def test_slow_reader_gets_everything(bastion: BastionProcess, ca: trustme.CA) -> None:
    """The client opens its window only as it reads: Bastion waits for WINDOW_UPDATE."""
    client = H2Client(bastion.port(), ca)
    try:
        sid = client.start("GET", "/download?size=600000")
        got = 0
        while not client.responses[sid]["done"]:
            client.pump()
            got = len(client.responses[sid]["body"])
            time.sleep(0.001)
        assert got == 600000
    finally:
        client.close()


def test_error_page_over_h2(h2c: H2Client) -> None:
    resp = h2c.get("/x", authority="nothing.example")
    assert resp["status"] == 404
    assert b"404" in resp["body"]
    assert dict(resp["headers"])[b"strict-transport-security"] == b"max-age=600"
    assert dict(resp["headers"])[b"cache-control"] == b"no-store"


def test_body_too_large(h2c: H2Client) -> None:
    sid = h2c.start("POST", "/upload", headers=[("content-length", str(31 * 1024 * 1024))],
                    end=False)
    resp = h2c.wait(sid)[0]
    assert resp["status"] == 413 or resp["reset"] is not None


def test_http1_still_served_on_tls(bastion: BastionProcess) -> None:
    resp = bastion.get("/info")
    assert resp.status == 200
    assert resp.headers["strict-transport-security"] == "max-age=600"


def test_curl_http2(bastion: BastionProcess) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    if "HTTP2" not in subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout:
        pytest.skip("curl has no HTTP/2")
    url = f"https://127.0.0.1:{bastion.port()}"
    ca_file = str(bastion.ca_file)  # type: ignore[attr-defined]
    out = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", ca_file, "-o", "/dev/null", "-w",
         "%{http_version} %{http_code} %{size_download}", f"{url}/download?size=3000000"],
        capture_output=True, text=True, timeout=30)
    assert out.stdout == "2 200 3000000", out.stderr
    body = Path(bastion.tmp) / "upload.bin"
    body.write_bytes(b"z" * 500_000)
    out = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", ca_file, "--data-binary", f"@{body}",
         f"{url}/upload"], capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["size"] == 500_000, out.stderr


def test_nghttp(bastion: BastionProcess) -> None:
    if shutil.which("nghttp") is None:
        pytest.skip("nghttp is not installed (apt-get install nghttp2-client)")
    url = f"https://127.0.0.1:{bastion.port()}"
    out = subprocess.run(["nghttp", "-n", "-s", "-m", "20", f"{url}/info"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(["nghttp", "-v", f"{url}/info"], capture_output=True, text=True,
                         timeout=30)
    assert ":status: 200" in out.stdout


# -- malformed input and floods -----------------------------------------------------------

BASE = [(":method", "GET"), (":scheme", "https"), (":path", "/info"),
        (":authority", "127.0.0.1")]


def fields(**change: str | None) -> list[tuple[str, str]]:
    out = []
    for name, value in BASE:
        key = name[1:]
        if key in change:
            if change[key] is not None:
                out.append((name, change[key]))
            continue
        out.append((name, value))
    return out


BAD_HEADERS: dict[str, list[tuple[str, str]]] = {
    "uppercase name": [*BASE, ("X-Upper", "1")],
    "connection header": [*BASE, ("connection", "keep-alive")],
    "transfer-encoding": [*BASE, ("transfer-encoding", "chunked")],
    "upgrade header": [*BASE, ("upgrade", "h2c")],
    "te gzip": [*BASE, ("te", "gzip")],
    "no method": fields(method=None),
    "no path": fields(path=None),
    "no scheme": fields(scheme=None),
    "scheme http": fields(scheme="http"),
    "path not origin-form": fields(path="info"),
    "path with space": fields(path="/a b"),
    "path with fragment": fields(path="/a#b"),
    "authority with userinfo": fields(authority="u@127.0.0.1"),
    "no authority nor host": fields(authority=None),
    "repeated method": [(":method", "GET"), *BASE],
    "pseudo after regular": [BASE[0], ("x-a", "1"), *BASE[1:]],
    "status in request": [*BASE[:2], (":status", "200"), *BASE[2:]],
    "unknown pseudo": [(":foo", "bar"), *BASE],
    "connect": fields(method="CONNECT"),
    "host differs": [*BASE, ("host", "other.example")],
    "value with newline": [*BASE, ("x-a", "a\nb")],
    "value with a control character": [*BASE, ("x-a", "a\x01b")],
    "value with DEL": [*BASE, ("x-a", "a\x7fb")],
    "method not a token": fields(method="G(E)T"),
}


@pytest.mark.parametrize("head", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_malformed_headers(head: list[tuple[str, str]], bastion: BastionProcess,
                           ca: trustme.CA) -> None:
    raw = RawClient(bastion.port(), ca)
    raw.send(raw.headers(1, head))
    kind, code = raw.outcome(1)
    raw.close()
    assert kind in ("rst", "goaway"), kind
    assert code != 0
    still_serves(bastion, ca)


def _content_length_short(raw: RawClient) -> int:
    data = DataFrame(1, b"12345")
    data.flags.add("END_STREAM")
    raw.send(raw.headers(1, [(":method", "POST"), *BASE[1:], ("content-length", "10")],
                         end_stream=False), data)  # one write: see _empty_data_flood
    return 1


def _content_length_long(raw: RawClient) -> int:
    raw.send(raw.headers(1, [(":method", "POST"), *BASE[1:], ("content-length", "2")],
                         end_stream=False), DataFrame(1, b"12345"))
    return 1


def _data_on_closed_stream(raw: RawClient) -> int:
    raw.send(raw.headers(1, BASE))
    time.sleep(0.3)
    raw.send(DataFrame(1, b"late"))
    return 1


def _data_on_idle_stream(raw: RawClient) -> int:
    raw.send(DataFrame(3, b"nobody"))
    return 3


def _even_stream(raw: RawClient) -> int:
    raw.send(raw.headers(2, BASE))
    return 2


def _decreasing_stream(raw: RawClient) -> int:
    raw.send(raw.headers(5, BASE), raw.headers(3, BASE))
    return 3


def _headers_on_stream_zero(raw: RawClient) -> int:
    frame = HeadersFrame(1)
    frame.stream_id = 0
    frame.data = raw.encoder.encode(BASE)
    frame.flags.add("END_HEADERS")
    body = frame.serialize()
    raw.sock.sendall(body[:5] + b"\x00\x00\x00\x00" + body[9:])
    return 0


def _naked_continuation(raw: RawClient) -> int:
    frame = ContinuationFrame(1)
    frame.data = raw.encoder.encode(BASE)
    frame.flags.add("END_HEADERS")
    raw.send(frame)
    return 1


def _continuation_flood(raw: RawClient) -> int:
    raw.send(raw.headers(1, BASE, end_headers=False))
    for _ in range(200):
        frame = ContinuationFrame(1)
        frame.data = b"\x40\x01a\x01b" * 10  # literal "a: b" fields, never ending
        raw.send(frame)
    return 1


def _header_list_too_large(raw: RawClient) -> int:
    raw.send(raw.headers(1, [*BASE, *[(f"x-h{i}", "v" * 1000) for i in range(40)]]))
    return 1


def _rapid_reset(raw: RawClient) -> int:
    frames: list[Frame] = []
    for i in range(600):
        sid = 1 + 2 * i
        frames.append(raw.headers(sid, BASE))
        frames.append(RstStreamFrame(sid, error_code=8))
    raw.send(*frames)
    return 0


def _ping_flood(raw: RawClient) -> int:
    raw.send(*[PingFrame(0, opaque_data=i.to_bytes(8, "big")) for i in range(5000)])
    return 0


def _settings_flood(raw: RawClient) -> int:
    raw.send(*[SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 16384})
               for _ in range(3000)])
    return 0


def _priority_flood(raw: RawClient) -> int:
    raw.send(*[PriorityFrame(1 + 2 * i, depends_on=0, stream_weight=16)
               for i in range(3000)])
    return 0


def _empty_data_flood(raw: RawClient) -> int:
    # One write: the flood is seen before the app could answer (and an answered stream
    # may be reset with NO_ERROR instead, RFC 9113 8.1).
    raw.send(raw.headers(1, [(":method", "POST"), *BASE[1:]], end_stream=False),
             *[DataFrame(1, b"") for _ in range(1000)])
    return 1


def _too_many_streams(raw: RawClient) -> int:
    raw.send(*[raw.headers(1 + 2 * i, [(":method", "POST"), *BASE[1:]], end_stream=False)
               for i in range(120)])
    return 0


def _window_overflow(raw: RawClient) -> int:
    raw.send(WindowUpdateFrame(0, window_increment=2**31 - 1),
             WindowUpdateFrame(0, window_increment=2**31 - 1))
    return 0


def _window_update_zero(raw: RawClient) -> int:
    raw.send(WindowUpdateFrame(0, window_increment=0))
    return 0


def _flow_control_violation(raw: RawClient) -> int:
    raw.send(raw.headers(1, [(":method", "POST"), *BASE[1:]], end_stream=False),
             *[DataFrame(1, b"x" * 16384) for _ in range(6)])  # 98304 > 65535
    return 1


def _frame_too_large(raw: RawClient) -> int:
    raw.send(raw.headers(1, [(":method", "POST"), *BASE[1:]], end_stream=False),
             DataFrame(1, b"x" * 20000))
    return 1


def _bad_hpack(raw: RawClient) -> int:
    frame = HeadersFrame(1)
    frame.data = b"\xff\xff\xff\xff\xff\xff"
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    raw.send(frame)
    return 1


def _push_promise_from_client(raw: RawClient) -> int:
    raw.send(raw.headers(1, BASE, end_stream=False))
    frame = PushPromiseFrame(1, promised_stream_id=2)
    frame.data = raw.encoder.encode(BASE)
    frame.flags.add("END_HEADERS")
    raw.send(frame)
    return 1


def _bad_setting(raw: RawClient) -> int:
    raw.send(SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 2}))
    return 0


def _bad_initial_window(raw: RawClient) -> int:
    raw.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31}))
    return 0


def _headers_after_end_stream(raw: RawClient) -> int:
    data = DataFrame(1, b"")
    data.flags.add("END_STREAM")
    # One write: the violation is seen before any answer could complete the stream
    # (a stream answered first may be reset with NO_ERROR, RFC 9113 8.1).
    raw.send(raw.headers(1, [(":method", "GET"), *BASE[1:]], end_stream=False), data,
             raw.headers(1, [("x-trailer", "1")]))
    return 1


ATTACKS = {
    "content-length larger than data": _content_length_short,
    "content-length smaller than data": _content_length_long,
    "DATA on closed stream": _data_on_closed_stream,
    "DATA on idle stream": _data_on_idle_stream,
    "even stream id": _even_stream,
    "decreasing stream id": _decreasing_stream,
    "HEADERS on stream 0": _headers_on_stream_zero,
    "CONTINUATION without HEADERS": _naked_continuation,
    "CONTINUATION flood": _continuation_flood,
    "header list too large": _header_list_too_large,
    "rapid reset": _rapid_reset,
    "PING flood": _ping_flood,
    "SETTINGS flood": _settings_flood,
    "PRIORITY flood": _priority_flood,
    "empty DATA flood": _empty_data_flood,
    "too many streams": _too_many_streams,
    "connection window overflow": _window_overflow,
    "WINDOW_UPDATE of zero": _window_update_zero,
    "DATA beyond the window": _flow_control_violation,
    "frame larger than MAX_FRAME_SIZE": _frame_too_large,
    "undecodable HPACK": _bad_hpack,
    "PUSH_PROMISE from a client": _push_promise_from_client,
    "ENABLE_PUSH=2": _bad_setting,
    "INITIAL_WINDOW_SIZE too large": _bad_initial_window,
    "HEADERS after END_STREAM": _headers_after_end_stream,
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_attack(attack: Any, bastion: BastionProcess, ca: trustme.CA) -> None:
    raw = RawClient(bastion.port(), ca)
    sid = attack(raw)
    kind, code = raw.outcome(sid or None, timeout=15)
    raw.close()
    assert kind in ("rst", "goaway", "closed")
    if kind != "closed":
        assert code != 0, kind
    still_serves(bastion, ca)


@pytest.mark.parametrize("attack", ["rapid reset", "PING flood", "SETTINGS flood",
                                    "empty DATA flood"])
def test_floods_get_enhance_your_calm(attack: str, bastion: BastionProcess,
                                      ca: trustme.CA) -> None:
    raw = RawClient(bastion.port(), ca)
    ATTACKS[attack](raw)
    assert raw.outcome(None, timeout=15) == ("goaway", 11)  # ENHANCE_YOUR_CALM
    raw.close()


def test_bad_preface(bastion: BastionProcess, ca: trustme.CA) -> None:
    raw = RawClient(bastion.port(), ca, preface=False)
    raw.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    kind, _ = raw.outcome(None)
    assert kind in ("goaway", "closed")
    raw.close()
    still_serves(bastion, ca)


def test_slow_continuation_is_cut(bastion: BastionProcess, ca: trustme.CA) -> None:
    raw = RawClient(bastion.port(), ca)
    raw.send(raw.headers(1, BASE, end_headers=False))
    started = time.monotonic()
    kind, _ = raw.outcome(None, timeout=HEADER_TIMEOUT + 10)
    assert kind in ("goaway", "closed")
    assert time.monotonic() - started < HEADER_TIMEOUT + 5
    raw.close()
    still_serves(bastion, ca)


def test_client_reset_mid_download_frees_the_stream(h2c: H2Client) -> None:
    sid = h2c.start("GET", "/download?size=50000000")
    while not h2c.responses[sid]["body"]:
        h2c.pump()
    h2c.conn.reset_stream(sid, 8)
    h2c.flush()
    assert h2c.get("/info")["status"] == 200


# -- graceful stop ---------------------------------------------------------------------------


def test_goaway_on_graceful_stop(engine: str, ca: trustme.CA, tmp_path: Path) -> None:
    config = {
        "listen": [{"address": f"127.0.0.1:{free_port()}", "tls": tls_config(ca, tmp_path)}],
        "apps": {"echo": {"command": app_command("uvicorn", "echo_asgi:app")}},
    }
    proc = BastionProcess(tmp_path, config, env=engine_env(engine), tls_ca=ca).start()
    try:
        client = H2Client(proc.port(), ca)
        assert client.get("/info")["status"] == 200  # the app is up
        client.close()
        raw = RawClient(proc.port(), ca)
        raw.send(raw.headers(1, [(":method", "GET"), (":scheme", "https"),
                                 (":path", "/slow?s=1"), (":authority", "127.0.0.1")]))
        time.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        seen: list[str] = []
        for frame in raw.frames(15):
            if frame is None:
                seen.append("closed")
                break
            if isinstance(frame, GoAwayFrame):
                assert frame.error_code == 0
                seen.append("goaway")
            elif isinstance(frame, HeadersFrame) and frame.stream_id == 1:
                seen.append("headers")
            elif isinstance(frame, DataFrame) and frame.stream_id == 1 \
                    and "END_STREAM" in frame.flags:
                seen.append("end")
        assert seen == ["goaway", "headers", "end", "closed"]
        raw.close()
    finally:
        assert proc.stop() == 0
