"""CPU per MiB against ratio for each gzip level, on the HTML page the bench serves.

    python bench/gzip_levels.py [--size 102400] [--rounds 20]

The page is ``bench/wsgi_app.page`` (a product list, as a shop's pages are; the page
of the ``gzip`` bench cell),
compressed the way Bastion compresses a streamed answer (``zlib`` with the gzip header,
flushed with ``Z_SYNC_FLUSH`` after every 64 KiB read from the app). For each level the
best of ``rounds`` runs of process CPU time is reported, as ms per MiB of input, with the
compressed size as a share of the input. ``compression.level``'s default comes from this
table (docs/offload.md). With the ``brotli`` package installed, the same for brotli's
qualities 0-11 (``compression.brotli_level``), flushed the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsgi_app import page  # noqa: E402

PIECE = 64 * 1024


def compress(text: bytes, level: int) -> int:
    encoder = zlib.compressobj(level, zlib.DEFLATED, 31, 8)
    size = 0
    for start in range(0, len(text), PIECE):
        size += len(encoder.compress(text[start:start + PIECE]))
        size += len(encoder.flush(zlib.Z_SYNC_FLUSH))
    return size + len(encoder.flush(zlib.Z_FINISH))


def compress_br(text: bytes, quality: int) -> int:
    import brotli

    encoder = brotli.Compressor(quality=quality)
    size = 0
    for start in range(0, len(text), PIECE):
        size += len(encoder.process(text[start:start + PIECE])) + len(encoder.flush())
    return size + len(encoder.finish())


def table(name: str, levels: range, run: Callable[[bytes, int], int], text: bytes,
          rounds: int) -> None:
    repeat = max(1, (8 * 1024 * 1024) // len(text))  # about 8 MiB of input per round
    print(f"\n{name}: page {len(text)} bytes, {repeat} pages per round, best of {rounds}")
    print(f"| {name} level | CPU ms per MiB | compressed size |")
    print("|---|---|---|")
    for level in levels:
        best = float("inf")
        size = 0
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(repeat):
                size = run(text, level)
            best = min(best, time.process_time() - started)
        per_mib = best * 1000 / (repeat * len(text) / (1024 * 1024))
        print(f"| {level} | {per_mib:.2f} | {100 * size / len(text):.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100 * 1024)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    text = page(args.size)
    table("gzip", range(1, 10), compress, text, args.rounds)
    try:
        import brotli  # noqa: F401
    except ImportError:
        print("\n(no brotli package: brotli not measured)")
        return
    table("brotli", range(0, 12), compress_br, text, max(1, args.rounds // 4))


if __name__ == "__main__":
    main()
