"""SequentialFile: the bytes written are the file's, with O_DIRECT or without."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

from mergebuild import direct_io
from mergebuild.direct_io import DIRECT_ALIGN, SequentialFile


def _pieces(sizes: list[int]) -> list[bytes]:
    rng = np.random.default_rng(sum(sizes))
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]


@pytest.fixture
def small_staging(monkeypatch: pytest.MonkeyPatch) -> int:
    """Three alignment units of staging, so that a few KB cross several flushes."""
    monkeypatch.setattr(direct_io, "STAGING_BYTES", 3 * DIRECT_ALIGN)
    monkeypatch.setattr(direct_io, "_spare", [])
    return 3 * DIRECT_ALIGN


@pytest.mark.parametrize(
    "sizes",
    [[], [1], [DIRECT_ALIGN], [3 * DIRECT_ALIGN], [5000, 7000, 1, 13000], [3 * DIRECT_ALIGN + 1, 2]],
)
def test_file_holds_exactly_what_was_written(tmp_path: Path, small_staging: int, sizes: list[int]) -> None:
    pieces = _pieces(sizes)
    path = tmp_path / "f"
    f = SequentialFile(path)
    for piece in pieces:
        f.write(piece)
    assert f.size == sum(sizes)
    assert f.close(sync=True) == sum(sizes)
    assert path.read_bytes() == b"".join(pieces)


def test_writes_any_contiguous_buffer(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    with SequentialFile(tmp_path / "f") as f:
        f.write(memoryview(values))
        f.write(bytearray(b"end"))
    assert (tmp_path / "f").read_bytes() == values.tobytes() + b"end"


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 50_000)
    with SequentialFile(path) as f:
        f.write(b"short")
    assert path.read_bytes() == b"short"


def _direct_open_works(directory: Path) -> bool:
    if not direct_io._O_DIRECT:
        return False
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | direct_io._O_DIRECT))
    except OSError:
        return False
    return True


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & direct_io._O_DIRECT)


def test_bypasses_the_page_cache_where_the_file_system_allows(tmp_path: Path) -> None:
    if not _direct_open_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    f = SequentialFile(tmp_path / "f")
    assert f.direct and _is_direct(f._fd)
    f.write(b"a" * (DIRECT_ALIGN + 10))
    f.close()
    assert (tmp_path / "f").read_bytes() == b"a" * (DIRECT_ALIGN + 10)


def test_a_file_system_without_o_direct_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path: Path, flags: int, mode: int = 0o777) -> int:
        if flags & direct_io._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, mode)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    pieces = _pieces([5000, 9000])
    with SequentialFile(tmp_path / "f") as f:
        for piece in pieces:
            f.write(piece)
        assert not f.direct
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_a_refused_direct_write_goes_through_the_page_cache(
    tmp_path: Path, small_staging: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system may take O_DIRECT at open and refuse the transfer (EINVAL): the file
    is switched to buffered writes and every byte still lands."""
    if not _direct_open_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real_pwrite = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if _is_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    pieces = _pieces([5000, 9000])
    f = SequentialFile(tmp_path / "f")
    assert f.direct
    for piece in pieces:
        f.write(piece)
    f.close()
    assert not f.direct and refused == [0]
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_abandon_leaves_staged_bytes_unwritten(tmp_path: Path) -> None:
    f = SequentialFile(tmp_path / "f")
    f.write(b"staged")
    f.abandon()
    assert (tmp_path / "f").read_bytes() == b""
    with pytest.raises(ValueError), SequentialFile(tmp_path / "g") as g:
        g.write(b"staged")
        raise ValueError
    assert (tmp_path / "g").read_bytes() == b""


def test_staging_buffers_are_reused(tmp_path: Path, small_staging: int) -> None:
    for name in "ab":
        with SequentialFile(tmp_path / name) as f:
            f.write(b"x")
    assert len(direct_io._spare) == 1
