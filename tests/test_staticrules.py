"""The pure rules of static files (``proxy.edge.staticrules``): paths below a root,
precompressed choice, conditional and range answers as nginx gives them, MIME types."""

from __future__ import annotations

import pytest

from bastion.proxy.edge import staticrules as rules
from bastion.proxy.edge.staticrules import Conditions, FileMeta, plan

META = FileMeta(size=1000, mtime=1_700_000_000)
ETAG = META.etag
LAST = META.last_modified


# -- paths ---------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "base", "segments", "slash"), [
    ("/static/a.css", "/static", ("a.css",), False),
    ("/static/css/a.css?v=3", "/static", ("css", "a.css"), False),
    ("/static/", "/static", (), True),
    ("/static", "/static", (), False),  # the location itself without its "/": a 301
    ("/static/dir/", "/static", ("dir",), True),
    ("/a%20b.txt", "/", ("a b.txt",), False),
    ("/static//css///a.css", "/static", ("css", "a.css"), False),
    ("/static/caf%C3%A9.txt", "/static", ("café.txt",), False),
    ("/static/.well-known/x", "/static", (".well-known", "x"), False),
])
def test_relative_path(target: str, base: str, segments: tuple[str, ...], slash: bool) -> None:
    found = rules.relative_path(target, base)
    assert found is not None
    assert found.segments == segments
    assert found.trailing_slash is slash


@pytest.mark.parametrize("target", [
    "/static/../etc/passwd", "/static/%2e%2e/etc/passwd", "/static/%2E%2E/x",
    "/static/a/../../x", "/static/./a.css", "/static/%2e/a.css", "/static/a%2fb",
    "/static/a%2F..%2Fb", "/static/a%5c..%5cb", "/static/a\\..\\b", "/static/a%00.txt",
    "/static/a\x00.txt", "/staticx/a.css", "/other/a.css", "/static/%252e%252e/x/..",
    "/static/..", "/static/.",
])
def test_relative_path_refused(target: str) -> None:
    assert rules.relative_path(target, "/static") is None


def test_double_encoding_is_decoded_once() -> None:
    # %252e is the literal name "%2e", not a dot segment: a file may be called that.
    found = rules.relative_path("/static/%252e%252e/x", "/static")
    assert found is not None and found.segments == ("%2e%2e", "x")


def test_inside() -> None:
    assert rules.inside("/srv/static", "/srv/static")
    assert rules.inside("/srv/static", "/srv/static/a/b.css")
    assert not rules.inside("/srv/static", "/srv/staticx/a.css")
    assert not rules.inside("/srv/static", "/etc/passwd")
    assert rules.inside("/", "/anything")


# -- encodings -----------------------------------------------------------------------
@pytest.mark.parametrize(("header", "expected"), [
    ("gzip, br", ["br", "gzip"]),
    ("gzip;q=1, br;q=0.5", ["gzip", "br"]),
    ("br;q=0", []),
    ("gzip, br;q=0", ["gzip"]),
    ("*", ["br", "gzip"]),
    ("*;q=0.3, gzip;q=0", ["br"]),
    ("identity", []),
    ("", []),
    (None, []),
    ("GZIP;Q=0.8", ["gzip"]),
    ("gzip;q=bogus, br", ["br"]),
    ("x-gzip", ["gzip"]),
])
def test_choose_encoding(header: str | None, expected: list[str]) -> None:
    assert [coding for coding, _ in rules.choose_encoding(header)] == expected


def test_content_type() -> None:
    assert rules.content_type("a.css") == "text/css"
    assert rules.content_type("index.html") == "text/html"
    assert rules.content_type("x.png") == "image/png"
    assert rules.content_type("noext") == "application/octet-stream"
    assert rules.content_type("archive.tar.gz") == "application/octet-stream"


def test_etag_is_nginx_style() -> None:
    assert FileMeta(size=6, mtime=0x6B110691).etag == '"6b110691-6"'
    assert LAST.endswith("GMT")


# -- conditions ----------------------------------------------------------------------
def test_plain_get() -> None:
    answer = plan(META, Conditions())
    assert answer.status == 200 and (answer.start, answer.length) == (0, 1000)
    assert ("Accept-Ranges", "bytes") in answer.headers
    assert ("ETag", ETAG) in answer.headers


@pytest.mark.parametrize(("conditions", "status"), [
    (Conditions(if_none_match=ETAG), 304),
    (Conditions(if_none_match=f'"other", {ETAG}'), 304),
    (Conditions(if_none_match=f"W/{ETAG}"), 304),
    (Conditions(if_none_match="*"), 304),
    (Conditions(if_none_match='"other"'), 200),
    (Conditions(if_modified_since=LAST), 304),
    (Conditions(if_modified_since="Thu, 01 Jan 2026 00:00:00 GMT"), 200),  # exact only
    (Conditions(if_modified_since="garbage"), 200),
    (Conditions(if_modified_since=LAST, if_none_match='"other"'), 200),
    (Conditions(if_modified_since="Mon, 01 Jan 2001 00:00:00 GMT", if_none_match=ETAG), 200),
    (Conditions(if_match=ETAG), 200),
    (Conditions(if_match='"other"'), 412),
    (Conditions(if_match=f"W/{ETAG}"), 412),
    (Conditions(if_match="*"), 200),
    (Conditions(if_unmodified_since=LAST), 200),
    (Conditions(if_unmodified_since="Mon, 01 Jan 2001 00:00:00 GMT"), 412),
    (Conditions(if_unmodified_since="garbage"), 412),
    (Conditions(if_none_match=ETAG, range="bytes=0-1"), 304),
    (Conditions(if_match='"x"', if_none_match=ETAG), 412),
])
def test_conditions(conditions: Conditions, status: int) -> None:
    assert plan(META, conditions).status == status


def test_not_modified_keeps_validators() -> None:
    answer = plan(META, Conditions(if_none_match=ETAG))
    assert dict(answer.headers) == {"ETag": ETAG, "Last-Modified": LAST}


# -- ranges --------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "status", "start", "length"), [
    ("bytes=0-99", 206, 0, 100),
    ("bytes=900-", 206, 900, 100),
    ("bytes=-100", 206, 900, 100),
    ("bytes=-5000", 206, 0, 1000),  # the whole file, as a range (nginx)
    ("bytes=990-5000", 206, 990, 10),
    ("bytes=0-", 206, 0, 1000),
    ("bytes=1000-", 416, 0, 0),
    ("bytes=-0", 416, 0, 0),
    ("bytes=5-3", 416, 0, 0),
    ("bytes=0-1,5-9", 200, 0, 1000),  # several ranges: the whole file
    ("bytes=abc", 416, 0, 0),
    ("items=0-1", 200, 0, 1000),
    ("Bytes=1-2", 206, 1, 2),
    ("bytes= 1 - 2 ", 206, 1, 2),
    ("bytes=5-3,10-19", 206, 10, 10),
])
def test_ranges(header: str, status: int, start: int, length: int) -> None:
    answer = plan(META, Conditions(range=header))
    assert answer.status == status
    if status == 206:
        assert (answer.start, answer.length) == (start, length)
        assert ("Content-Range", f"bytes {start}-{start + length - 1}/1000") in answer.headers
    if status == 416:
        assert answer.headers == [("Content-Range", "bytes */1000")]


@pytest.mark.parametrize(("if_range", "status"), [
    (ETAG, 206), ('"other"', 200), (LAST, 206), ("Mon, 01 Jan 2001 00:00:00 GMT", 200),
])
def test_if_range(if_range: str, status: int) -> None:
    assert plan(META, Conditions(range="bytes=0-9", if_range=if_range)).status == status


def test_conditions_from_headers() -> None:
    found = Conditions.from_headers([(b"If-None-Match", b'"a"'), (b"Range", b"bytes=0-1"),
                                     (b"if-none-match", b'"b"'), (b"Host", b"x")])
    assert found == Conditions(if_none_match='"a"', range="bytes=0-1")


def test_redirect_to_directory() -> None:
    assert rules.redirect_to_directory("/static/dir?x=1") == "/static/dir/?x=1"
    assert rules.redirect_to_directory("/static/dir") == "/static/dir/"
