"""App output (module/output.py): bounded tail, log file, logrotate; free ports (module/ports.py)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from bastion.module.output import TAIL_BYTES, AppOutput
from bastion.module.ports import PORT_RANGE, pick_free_port, port_is_free


def test_tail_keeps_only_last_64_kib() -> None:
    out = AppOutput("shop", None)
    out.write(b"A" * TAIL_BYTES)
    out.write(b"B" * 1000)
    out.write(b"\nlast line\n")
    assert TAIL_BYTES == 64 * 1024
    assert len(out._tail) == TAIL_BYTES
    assert bytes(out._tail).endswith(b"B" * 1000 + b"\nlast line\n")
    assert bytes(out._tail).startswith(b"A")
    assert out.tail(1) == "last line"


def test_tail_returns_last_lines() -> None:
    out = AppOutput("shop", None)
    out.write(b"".join(f"line {i}\n".encode() for i in range(50)))
    assert out.tail(3) == "line 47\nline 48\nline 49"
    assert out.tail().splitlines()[0] == "line 30"


def test_tail_decodes_leniently() -> None:
    out = AppOutput("shop", None)
    out.write(b"ok \xff\xfe bytes\n")
    assert out.tail(1).startswith("ok ")


def test_tail_hides_marker_lines() -> None:
    out = AppOutput("shop", None)
    out.write(b"first\nsecond\n")
    out.mark("pid 12 exited with status 3")
    out.write(b"third\n")
    out.mark("started pid 13 port 3000")
    assert "=== bastion" not in out.tail(10)
    assert out.tail(10).splitlines() == ["first", "second", "third"]


def test_markers_take_no_room_in_the_tail() -> None:
    out = AppOutput("shop", None)
    out.write(b"a\nb\n")
    out.mark("pid 12 exited with status 3")
    out.write(b"c\n")
    assert out.tail(2) == "b\nc"


def test_marker_after_partial_line_keeps_the_line() -> None:
    out = AppOutput("shop", None)
    out.write(b"no newline at end")
    out.mark("pid 1 exited")
    assert out.tail(5) == "no newline at end"


def test_log_file_gets_data_and_markers(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "shop.log"  # directory created on demand
    out = AppOutput("shop", str(path))
    out.mark("started pid 12 port 3000")
    out.write(b"hello from the app\n")
    out.close()
    text = path.read_text()
    assert "hello from the app\n" in text
    assert "=== bastion " in text and "app shop: started pid 12 port 3000 ===" in text
    assert text.index("started pid 12") < text.index("hello from the app")


def test_log_file_is_appended_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "shop.log"
    path.write_bytes(b"old\n")
    out = AppOutput("shop", str(path))
    out.write(b"new\n")
    out.close()
    assert path.read_bytes() == b"old\nnew\n"


def test_reopen_after_rename_creates_new_file(tmp_path: Path) -> None:
    path = tmp_path / "shop.log"
    out = AppOutput("shop", str(path))
    out.write(b"before rotation\n")
    rotated = tmp_path / "shop.log.1"
    os.rename(path, rotated)
    out.write(b"still to the old inode\n")
    out.reopen()
    out.write(b"after rotation\n")
    out.close()
    assert rotated.read_bytes() == b"before rotation\nstill to the old inode\n"
    assert path.read_bytes() == b"after rotation\n"


def test_unwritable_path_logs_error_but_keeps_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = blocker / "shop.log"  # a "directory" that is a file: cannot be created
    with caplog.at_level(logging.ERROR, logger="bastion.module"):
        out = AppOutput("shop", str(path))
    assert any("cannot open stdout_log" in r.getMessage() for r in caplog.records)
    out.write(b"still kept\n")
    assert out.tail(1) == "still kept"
    assert not path.exists()


def test_no_log_file_when_path_is_none() -> None:
    out = AppOutput("shop", None)
    out.write(b"x\n")
    out.reopen()
    out.close()
    assert out.tail() == "x"


# -- ports ---------------------------------------------------------------------------


def test_pick_free_port_in_range_and_bindable() -> None:
    for _ in range(5):
        port = pick_free_port()
        assert PORT_RANGE[0] <= port <= PORT_RANGE[1]
        assert (PORT_RANGE[0], PORT_RANGE[1]) == (10000, 48000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_pick_free_port_avoids_given_ports() -> None:
    avoid = set(range(10000, 47000))  # 1001 candidates left: a miss in 5000 tries is ~1e-57
    port = pick_free_port(avoid=avoid, attempts=5000)
    assert port not in avoid


def test_port_is_free_false_for_bound_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
    assert port_is_free(pick_free_port())


def test_write_failure_is_reported_again_after_reopen(caplog: pytest.LogCaptureFixture) -> None:
    # /dev/full opens fine and fails every write with ENOSPC.
    with caplog.at_level(logging.ERROR, logger="bastion.module"):
        out = AppOutput("shop", "/dev/full")
        out.write(b"one\n")
        out.write(b"two\n")
        assert sum("writing /dev/full failed" in r.getMessage() for r in caplog.records) == 1
        out.reopen()  # SIGUSR1 after the operator fixed (or not) the disk
        out.write(b"three\n")
        out.close()
    assert sum("writing /dev/full failed" in r.getMessage() for r in caplog.records) == 2
    assert out.tail(3) == "one\ntwo\nthree"
