"""Compression and buffering without sockets: the choice (``proxy.edge.compress``), the
streaming encoder, the buffer budget (``proxy.edge.buffers``) and their configuration
keys (``pools.NAME.compression`` / ``buffering``, ``limits.buffer_memory``)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import brotli
import pytest

from bastion.proxy.config.dump import effective
from bastion.proxy.config.load import ConfigError, config_from_dict, load_config
from bastion.proxy.config.model import Buffering, Compression, Offload
from bastion.proxy.edge import compress
from bastion.proxy.edge.buffers import BufferBudget, Held

ON = Compression()
HTML = [(b"Content-Type", b"text/html; charset=utf-8")]
BOTH = (compress.BROTLI, compress.GZIP)


# -- Accept-Encoding ---------------------------------------------------------------------
@pytest.mark.parametrize(("header", "offered", "expected"), [
    (b"gzip", BOTH, "gzip"),
    (b"gzip, br", BOTH, "br"),  # equal q: ours, best first
    (b"br;q=0.5, gzip", BOTH, "gzip"),  # the higher q wins
    (b"br, gzip;q=0", BOTH, "br"),
    (b"gzip;q=0", BOTH, None),  # q=0 refuses
    (b"gzip;q=0, br;q=0", BOTH, None),
    (b"GZIP", BOTH, "gzip"),  # names are case-insensitive
    (b"x-gzip", BOTH, "gzip"),
    (b"*", BOTH, "br"),
    (b"*", (compress.GZIP,), "gzip"),  # without brotli
    (b"*;q=0", BOTH, None),
    (b"br;q=0, *", BOTH, "gzip"),  # * stands for the codings not named
    (b"deflate, compress", BOTH, None),
    (b"identity", BOTH, None),
    (b"", BOTH, None),
    (b"gzip;q=0.5, identity", BOTH, None),  # identity preferred
    (b"gzip, identity;q=0.5", BOTH, "gzip"),
    (b"gzip;q=bogus", BOTH, None),  # a malformed q counts as 0
    (b"gzip;q=2", BOTH, None),  # out of range
    (b"gzip ; q=0.8 , br ; q=0.9", BOTH, "br"),  # spaces
    (b"br", (compress.GZIP,), None),  # no brotli here
])
def test_accepted_coding(header: bytes, offered: tuple[str, ...], expected: str | None) -> None:
    assert compress.accepted_coding(header, offered) == expected


def test_no_accept_encoding_means_no_compression() -> None:
    # RFC 9110 would allow any coding; like nginx, only what the client names.
    assert compress.accepted_coding(None, BOTH) is None


# -- media types ---------------------------------------------------------------------------
@pytest.mark.parametrize(("content_type", "expected"), [
    (b"text/html", True),
    (b"text/html; charset=utf-8", True),
    (b"TEXT/CSS", True),
    (b"application/json", True),
    (b"application/json;charset=utf-8", True),
    (b"application/javascript", True),
    (b"image/svg+xml", True),
    (b"image/png", False),
    (b"application/octet-stream", False),
    (b"application/jsonx", False),
    (b"textual/html", False),
    (b"text/event-stream", False),  # not covered by text/*: events must go out at once
    (b"html", False),
    (b"", False),
])
def test_default_types(content_type: bytes, expected: bool) -> None:
    assert compress.type_matches(content_type, ON.types) is expected


def test_event_stream_when_named_and_star() -> None:
    assert compress.type_matches(b"text/event-stream", ("text/event-stream",))
    assert compress.type_matches(b"image/png", ("*/*",))
    assert not compress.type_matches(b"text/event-stream", ("*/*",))


# -- eligibility --------------------------------------------------------------------------
def choose(headers: list[tuple[bytes, bytes]], *, method: str = "GET", status: int = 200,
           length: int | None = 5000, accept: bytes | None = b"gzip",
           settings: Compression = ON) -> tuple[str | None, bool]:
    return compress.choose(method, accept, status, headers, length, settings,
                           offered=BOTH)


def test_compressed_when_everything_fits() -> None:
    assert choose(HTML) == ("gzip", True)


def test_unknown_length_is_compressed() -> None:
    assert choose(HTML, length=None) == ("gzip", True)


@pytest.mark.parametrize(("length", "expected"), [(1023, None), (1024, "gzip"), (0, None)])
def test_min_size(length: int, expected: str | None) -> None:
    assert choose(HTML, length=length)[0] == expected


@pytest.mark.parametrize("headers", [
    [*HTML, (b"Content-Encoding", b"gzip")],  # the app encoded it already
    [*HTML, (b"content-encoding", b"br")],
    [*HTML, (b"Cache-Control", b"public, no-transform")],
    [*HTML, (b"Cache-Control", b"max-age=60"), (b"Cache-Control", b"No-Transform")],
    [*HTML, (b"Content-Range", b"bytes 0-99/5000")],
    [(b"Content-Type", b"image/png")],
    [],  # no Content-Type
])
def test_not_compressed(headers: list[tuple[bytes, bytes]]) -> None:
    assert choose(headers) == (None, False)


def test_identity_content_encoding_is_no_encoding() -> None:
    assert choose([*HTML, (b"Content-Encoding", b"identity")]) == ("gzip", True)


@pytest.mark.parametrize(("method", "status"), [
    ("HEAD", 200), ("GET", 204), ("GET", 206), ("GET", 304), ("GET", 101)])
def test_no_body_no_range(method: str, status: int) -> None:
    assert choose(HTML, method=method, status=status) == (None, False)


def test_error_statuses_are_compressed_too() -> None:
    assert choose(HTML, status=404) == ("gzip", True)


def test_vary_even_when_this_client_does_not_accept() -> None:
    assert choose(HTML, accept=None) == (None, True)
    assert choose(HTML, accept=b"gzip;q=0") == (None, True)


def test_disabled() -> None:
    assert choose(HTML, settings=Compression(enabled=False)) == (None, False)


# -- head rewrite -------------------------------------------------------------------------
def test_encoded_headers() -> None:
    headers = [*HTML, (b"Content-Length", b"5000"), (b"ETag", b'"abc"'),
               (b"Accept-Ranges", b"bytes"), (b"X-Other", b"1")]
    out = compress.encoded_headers(headers, "gzip")
    names = [n.lower() for n, _ in out]
    assert b"content-length" not in names and b"accept-ranges" not in names
    assert (b"ETag", b'W/"abc"') in out  # weakened, as nginx does
    assert (b"Content-Encoding", b"gzip") in out
    assert (b"Vary", b"Accept-Encoding") in out
    assert (b"X-Other", b"1") in out


def test_weak_etag_stays() -> None:
    out = compress.encoded_headers([*HTML, (b"ETag", b'W/"x"')], "br")
    assert (b"ETag", b'W/"x"') in out


@pytest.mark.parametrize(("vary", "expected"), [
    ([(b"Vary", b"Cookie")], [(b"Vary", b"Cookie, Accept-Encoding")]),
    ([(b"Vary", b"accept-encoding")], [(b"Vary", b"accept-encoding")]),
    ([(b"Vary", b"Cookie, Accept-Encoding")], [(b"Vary", b"Cookie, Accept-Encoding")]),
    ([(b"Vary", b"*")], [(b"Vary", b"*")]),
    ([(b"Vary", b"")], [(b"Vary", b"Accept-Encoding")]),
    ([], [(b"Vary", b"Accept-Encoding")]),
])
def test_vary_merged(vary: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]) -> None:
    out = compress.with_vary([*HTML, *vary])
    assert [h for h in out if h[0].lower() == b"vary"] == expected


# -- the encoder --------------------------------------------------------------------------
PIECES = [b"<html>" + b"hello bastion " * 400, b"", b"<p>more</p>" * 300, b"x" * 70000]


def test_gzip_streams_round_trip() -> None:
    encoder = compress.Encoder("gzip", ON)
    out = [encoder.chunk(p) for p in PIECES]
    tail = encoder.finish()
    assert gzip.decompress(b"".join(out) + tail) == b"".join(PIECES)


def test_gzip_each_piece_decodes_at_once() -> None:
    # Z_SYNC_FLUSH: what was sent so far decodes completely before the end.
    encoder = compress.Encoder("gzip", ON)
    decoder = zlib.decompressobj(31)
    for piece in PIECES:
        assert decoder.decompress(encoder.chunk(piece)) == piece
    assert decoder.decompress(encoder.finish()) == b""
    assert decoder.eof


def br_all(decoder: brotli.Decompressor, data: bytes) -> bytes:
    """All the output ``data`` gives now (the decoder hands it out in parts)."""
    out = part = decoder.process(data)
    while part:
        part = decoder.process(b"")
        out += part
    return out


def test_brotli_each_piece_decodes_at_once() -> None:
    encoder = compress.Encoder("br", ON)
    decoder = brotli.Decompressor()
    for piece in PIECES:
        assert br_all(decoder, encoder.chunk(piece)) == piece
    br_all(decoder, encoder.finish())
    assert decoder.is_finished()


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_whole_body(coding: str) -> None:
    body = b"".join(PIECES)
    data = compress.Encoder(coding, ON).whole(body)
    assert len(data) < len(body) // 10
    assert (gzip.decompress(data) if coding == "gzip" else brotli.decompress(data)) == body


def test_level_is_used() -> None:
    body = bytes(range(256)) * 64 + b"abc" * 20000
    fast = compress.Encoder("gzip", Compression(level=1)).whole(body)
    best = compress.Encoder("gzip", Compression(level=9)).whole(body)
    assert len(best) < len(fast)


def test_unknown_coding_refused() -> None:
    with pytest.raises(ValueError):
        compress.Encoder("deflate", ON)


# -- the buffer budget --------------------------------------------------------------------
def test_budget() -> None:
    budget = BufferBudget(100)
    assert budget.acquire(60) and budget.acquire(40)
    assert not budget.acquire(1) and budget.refusals == 1
    budget.release(70)
    assert budget.used == 30 and budget.peak == 100
    held = Held(budget, 30)
    held.release()
    held.release()  # once only
    assert budget.used == 0


# -- configuration ------------------------------------------------------------------------
APPS = {"a": {"command": ["true"], "pool": "web"}}
LISTEN = [{"address": "127.0.0.1:8080"}]


def load(pool: dict[str, object], **top: object) -> Offload:
    config = config_from_dict({"listen": LISTEN, "apps": APPS, "pools": {"web": pool}, **top})
    return config.offload_of("a")


def test_defaults() -> None:
    config = config_from_dict({"listen": LISTEN, "apps": {"a": {"command": ["true"]}}})
    offload = config.offload_of("a")
    assert offload.buffering == Buffering(request=64 * 1024, response=1024 * 1024)
    assert offload.compression.enabled and offload.compression.min_size == 1024
    assert offload.compression.level == 4 and offload.compression.brotli_level == 2
    assert "text/*" in offload.compression.types
    assert config.limits.buffer_memory == 64 * 1024 * 1024


def test_keys_read() -> None:
    offload = load({"buffering": {"request": "1m", "response": "2m"},
                    "compression": {"min_size": "2k", "types": ["Text/HTML"], "level": 6,
                                    "brotli_level": 5}},
                   limits={"buffer_memory": "16m"})
    assert offload.buffering == Buffering(1024 * 1024, 2 * 1024 * 1024)
    assert offload.compression == Compression(min_size=2048, types=("text/html",), level=6,
                                              brotli_level=5)


@pytest.mark.parametrize("value", [False, "off"])
def test_switched_off(value: object) -> None:
    offload = load({"buffering": value, "compression": value})
    assert offload.buffering == Buffering(0, 0)
    assert not offload.compression.enabled


def test_effective_config_round_trips(tmp_path: Path) -> None:
    import yaml

    config = config_from_dict({"listen": LISTEN, "apps": APPS,
                               "pools": {"web": {"compression": {"level": 2}}}})
    data = effective(config)
    assert data["pools"]["web"]["compression"]["level"] == 2
    path = tmp_path / "effective.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(str(path), files=False).offload == config.offload


def test_not_on_an_app() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"listen": LISTEN,
                          "apps": {"a": {"command": ["true"], "compression": "off"}}})
    assert "apps.a.compression: compression is set per pool (pools.NAME.compression)" \
        in str(info.value)


def test_bad_values_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text("""\
listen: [{address: "127.0.0.1:8080"}]
limits:
  buffer_memory: lots
pools:
  web:
    buffering: {request: -1, respons: 1m}
    compression:
      level: 12
      types: [html, "text/*"]
      min_size: big
  other:
    compression: maybe
apps:
  a: {command: ["true"], pool: web}
""")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), files=False)
    text = str(info.value)
    for line, words in [(3, "limits.buffer_memory"), (6, "pools.web.buffering.request"),
                        (6, "did you mean 'response'"), (8, "pools.web.compression.level"),
                        (9, "'html' is not a media type"),
                        (10, "pools.web.compression.min_size"),
                        (12, "pools.other.compression must be off, on or a mapping")]:
        assert f"{path}:{line}: " in text and words in text, (line, words, text)
        assert any(p.line == line and words in p.message for p in info.value.problems), words
