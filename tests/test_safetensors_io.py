"""The safetensors reader: agrees with the reference library, refuses malformed files clearly."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergebuild import safetensors_io
from mergebuild.errors import InputError
from mergebuild.safetensors_io import SafetensorsFile, bytes_to_tensor, header_for, read_bytes


def raw_file(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def test_reads_what_the_reference_library_writes(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(5, 3).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.tensor(2.5),
        "d": torch.zeros(0, 4),
        "e": torch.randn(2, 2, 2, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile.open(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt"}
    for name, expected in tensors.items():
        info = f.tensors[name]
        assert info.shape == tuple(expected.shape)
        data = read_bytes(info, 0, info.nbytes)
        assert torch.equal(bytes_to_tensor(data, info.torch_dtype, info.shape), expected)
    # A row range costs exactly its bytes.
    a = f.tensors["a"]
    rows = read_bytes(a, 2 * a.row_bytes, 4 * a.row_bytes)
    assert torch.equal(bytes_to_tensor(rows, a.torch_dtype, (2, 3)), tensors["a"][2:4])


def test_header_for_round_trips_through_the_reference_library(tmp_path: Path) -> None:
    t = {"w": torch.randn(3, 4), "v": torch.arange(3, dtype=torch.int32)}
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in t.items()]
    data = b"".join(v.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for v in t.values())
    (tmp_path / "y.safetensors").write_bytes(header_for(entries, {"k": "v"}) + data)
    loaded = load_file(tmp_path / "y.safetensors")
    assert torch.equal(loaded["w"], t["w"]) and torch.equal(loaded["v"], t["v"])


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "out of range"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None, "unsupported dtype 'Q4'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "out of range"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"", None, "exactly dtype, shape and data_offsets"),
        ({"a": 1}, b"", None, "exactly dtype"),
        ([1, 2], b"", None, "not a JSON object"),
        (b"{not json", b"", None, "not valid JSON"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
        ({}, b"", 10**6, "larger than the file"),
        ({}, b"", 2**40, "exceeds"),
    ],
)
def test_malformed_files_are_refused_clearly(
    tmp_path: Path, header: object, data: bytes, length: int | None, message: str
) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(InputError, match=message):
        SafetensorsFile.open(path)


def test_short_file(tmp_path: Path) -> None:
    (tmp_path / "s.safetensors").write_bytes(b"\1\2")
    with pytest.raises(InputError, match="shorter than 8 bytes"):
        SafetensorsFile.open(tmp_path / "s.safetensors")


@pytest.mark.parametrize("direct", [False, True])
def test_truncated_data_is_reported_on_read(tmp_path: Path, direct: bool) -> None:
    save_file({"a": torch.randn(5000)}, tmp_path / "t.safetensors")
    info = SafetensorsFile.open(tmp_path / "t.safetensors").tensors["a"]
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-40])
    with pytest.raises(InputError, match="truncated"):
        read_bytes(info, 0, info.nbytes, direct=direct)


def _direct_reads_work(path: Path) -> None:
    """Skip where the file system has no O_DIRECT (tmpfs): reads there are buffered only."""
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")


def _unaligned_file(tmp_path: Path) -> Path:
    # A header of odd length puts the tensors at offsets that are not multiples of 4 KiB.
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(1000, 37), "c": torch.arange(9, dtype=torch.int16)}
    path = tmp_path / "u.safetensors"
    save_file(tensors, path, metadata={"pad": "x" * 1237})
    return path


def test_direct_reads_give_the_buffered_bytes_and_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _unaligned_file(tmp_path)
    _direct_reads_work(path)
    monkeypatch.setattr(safetensors_io, "READ_CHUNK", 3 * safetensors_io.DIRECT_ALIGN)
    f = SafetensorsFile.open(path)
    assert any(info.start % safetensors_io.DIRECT_ALIGN for info in f.tensors.values())
    for info in f.tensors.values():
        for start, end in [(0, info.nbytes), (info.row_bytes, info.nbytes - info.row_bytes), (2, 2)]:
            chunks: list[bytes] = []
            data = read_bytes(
                info, start, end, on_chunk=lambda c, into=chunks: into.append(bytes(c)), direct=True
            )
            buffered = read_bytes(info, start, end, direct=False)
            assert bytes(data) == bytes(buffered) == path.read_bytes()[info.start + start : info.start + end]
            assert b"".join(chunks) == bytes(data)
            if end - start > 2 * safetensors_io.READ_CHUNK:
                assert len(chunks) > 2


def test_a_refused_direct_read_goes_on_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _unaligned_file(tmp_path)
    _direct_reads_work(path)
    monkeypatch.setattr(safetensors_io, "READ_CHUNK", safetensors_io.DIRECT_ALIGN)
    real_preadv, calls = os.preadv, []

    def refusing(fd: int, buffers: list[memoryview], offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        calls.append(direct)
        if direct and len(calls) > 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refusing)
    info = SafetensorsFile.open(path).tensors["b"]
    data = read_bytes(info, 0, info.nbytes, direct=True)
    assert bytes(data) == path.read_bytes()[info.start : info.end]
    assert calls[:3] == [True, True, True] and not any(calls[3:])


def test_ranges_out_of_the_page_cache_are_read_direct(tmp_path: Path) -> None:
    path = _unaligned_file(tmp_path)
    info = SafetensorsFile.open(path).tensors["b"]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert safetensors_io.cached_share(fd, info.start, info.nbytes) == 1.0  # just written
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        share = safetensors_io.cached_share(fd, info.start, info.nbytes)
        if share == 1.0:
            pytest.skip("this file system keeps the file in memory (tmpfs)")
        assert share < safetensors_io.DIRECT_BELOW_CACHED_SHARE
        # Read with O_DIRECT, the file stays out of the page cache; a buffered read brings it in.
        assert bytes(read_bytes(info, 0, info.nbytes)) == path.read_bytes()[info.start : info.end]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        read_bytes(info, 0, info.nbytes)
        assert safetensors_io.cached_share(fd, info.start, info.nbytes) < 0.5
        read_bytes(info, 0, info.nbytes, direct=False)
        assert safetensors_io.cached_share(fd, info.start, info.nbytes) == 1.0
    finally:
        os.close(fd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=300), claimed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_garbage_gives_only_input_errors(tmp_path: Path, garbage: bytes, claimed: int | None) -> None:
    path = tmp_path / "g.safetensors"
    length = len(garbage) if claimed is None else claimed
    path.write_bytes(struct.pack("<Q", length) + garbage)
    with contextlib.suppress(InputError):
        SafetensorsFile.open(path)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.dictionaries(
        st.text(max_size=8),
        st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "X"]) | json_values,
                               "shape": json_values | st.lists(st.integers(-2, 5), max_size=3),
                               "data_offsets": json_values | st.lists(st.integers(-2, 40), max_size=3)})
        | json_values,
        max_size=4,
    ),
    data=st.binary(max_size=40),
)  # fmt: skip
def test_structured_garbage_gives_only_input_errors(tmp_path: Path, header: dict, data: bytes) -> None:
    path = raw_file(tmp_path / "h.safetensors", header, data)
    try:
        f = SafetensorsFile.open(path)
    except InputError:
        return
    for info in f.tensors.values():
        assert info.path == path and 0 <= info.start <= info.end <= path.stat().st_size
