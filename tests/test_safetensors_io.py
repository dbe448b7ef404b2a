"""The safetensors reader: agrees with the reference library, refuses malformed files clearly."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

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


def test_truncated_data_is_reported_on_read(tmp_path: Path) -> None:
    save_file({"a": torch.randn(100)}, tmp_path / "t.safetensors")
    info = SafetensorsFile.open(tmp_path / "t.safetensors").tensors["a"]
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-40])
    with pytest.raises(InputError, match="truncated"):
        read_bytes(info, 0, info.nbytes)


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
