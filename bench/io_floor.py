"""The I/O floor of a merge: read every input once, write one output of the merged size.

Usage: ``python bench/io_floor.py [--direct] --out FILE --size BYTES INPUT...``

No merge tool can do less disk work than this (without skipping input bytes):
each input file is read once, sequentially, into one reusable buffer, and one
output file of ``--size`` bytes is written from that buffer and fsync'ed. The
benchmark scripts run it as a child of ``bench/measure.py`` with the page cache
of the inputs evicted first (``common.measure_io_floor``), exactly like the
tools they compare, so its wall time, bytes read and peak RSS are measured the
same way. It prints what it did as one JSON line and deletes nothing.

With ``--direct`` the inputs are read with O_DIRECT (into a page-aligned
buffer), as mergebuild reads ranges that are not in the page cache: no page
cache to fill and no copy out of it, so it is the floor for a reader that works
that way. Where the file system refuses O_DIRECT the read is buffered, and the
JSON line says ``"direct": false``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time

BUFFER_BYTES = 16 << 20


def read_all(paths: list[str], buf: bytearray) -> int:
    """Read each file sequentially into ``buf``; return the bytes read."""
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def read_all_direct(paths: list[str], buf: mmap.mmap) -> tuple[int, bool]:
    """Read each file sequentially with O_DIRECT into page-aligned ``buf``; return the bytes
    read and whether every file was read with O_DIRECT."""
    total, direct = 0, True
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd, direct = os.open(path, os.O_RDONLY), False
        try:
            while n := os.readv(fd, [buf]):
                total += n
                if n < len(buf):
                    break  # the end of the file (O_DIRECT refuses the unaligned offset after it)
        finally:
            os.close(fd)
    return total, direct


def write_size(path: str, size: int, buf: bytearray | mmap.mmap) -> None:
    """Write ``size`` bytes from ``buf`` (repeated) to ``path`` and fsync it."""
    view = memoryview(buf)
    with open(path, "wb", buffering=0) as f:
        left = size
        while left:
            left -= f.write(view[: min(left, len(view))])
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output file to write (overwritten)")
    parser.add_argument("--size", type=int, required=True, help="bytes to write")
    parser.add_argument("--buffer", type=int, default=BUFFER_BYTES, help="buffer bytes")
    parser.add_argument("--direct", action="store_true", help="read the inputs with O_DIRECT")
    parser.add_argument("inputs", nargs="+", help="input files, read in this order")
    args = parser.parse_args(argv)
    buf = mmap.mmap(-1, args.buffer) if args.direct else bytearray(args.buffer)
    start = time.perf_counter()
    if isinstance(buf, mmap.mmap):
        read, direct = read_all_direct(args.inputs, buf)
    else:
        read, direct = read_all(args.inputs, buf), False
    mid = time.perf_counter()
    write_size(args.out, args.size, buf)
    end = time.perf_counter()
    timings = {"read_s": mid - start, "write_s": end - mid}
    print(json.dumps({"read": read, "written": args.size, "direct": direct, **timings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
