"""mergebuild/publish.py: the output writer streams shards from its own thread."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from mergebuild.catalog import BlockGrid, hash_bytes
from mergebuild.errors import ExecutionError, InputError
from mergebuild.publish import WRITE_BEHIND_BYTES, OutputWriter, tensor_bytes, write_behind_bytes
from mergebuild.safetensors_io import DTYPE_NAMES, TensorInfo


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        f"t{i:02d}": torch.randn(16 + i, 8, generator=gen).to(dtype)
        for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.float16] * 4)
    }


def _writer(directory: Path, tensors: dict[str, torch.Tensor], queue_bytes: int) -> OutputWriter:
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    return OutputWriter(directory, entries, 2000, 256, {"format": "pt"}, queue_bytes=queue_bytes)


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mergebuild-output-writer"]


@pytest.mark.parametrize("queue_bytes", [1, 1 << 30])
def test_shards_load_and_match_what_the_writer_reported(tmp_path: Path, queue_bytes: int) -> None:
    tensors = _tensors()
    writer = _writer(tmp_path, tensors, queue_bytes)
    digests = {name: writer.write(name, t) for name, t in tensors.items()}
    files = writer.finish()
    shards = [f for f in files if f.name.endswith(".safetensors")]
    assert len(shards) > 1 and any(f.name.endswith(".index.json") for f in files)
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        raw = (tmp_path / f.name).read_bytes()
        assert (len(raw), xxhash.xxh3_128_hexdigest(raw)) == (f.size, f.digest)
        if f.name.endswith(".safetensors"):
            loaded.update(load_file(tmp_path / f.name))
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
        shard, offset, length = writer.placements[name]
        data = bytes(tensor_bytes(t))
        assert (tmp_path / shard).read_bytes()[offset : offset + length] == data
        info = TensorInfo(name, Path(), DTYPE_NAMES[t.dtype], tuple(t.shape), 0, len(data))
        assert digests[name] == hash_bytes(info, BlockGrid.for_shape(tuple(t.shape), 256), data)
    assert not _writer_threads()


def test_a_write_failure_reaches_the_build(tmp_path: Path) -> None:
    tensors = _tensors()
    out = tmp_path / "out"
    out.mkdir()
    writer = _writer(out, tensors, 1)
    shutil.rmtree(out)  # the writer thread cannot create its first shard
    with pytest.raises(OSError):
        for name, t in tensors.items():
            writer.write(name, t)
        writer.finish()
    writer.abort()
    assert not _writer_threads()


def test_abort_stops_the_writer_thread(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = _writer(tmp_path, tensors, 1 << 30)
    for name, t in list(tensors.items())[:5]:
        writer.write(name, t)
    writer.abort()
    assert not _writer_threads()
    name, t = list(tensors.items())[5]
    with pytest.raises(ExecutionError, match="aborted"):
        writer.write(name, t)


def test_write_behind_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGEBUILD_WRITE_BEHIND", raising=False)
    assert write_behind_bytes() == WRITE_BEHIND_BYTES
    monkeypatch.setenv("MERGEBUILD_WRITE_BEHIND", "64MiB")
    assert write_behind_bytes() == 64 * 2**20
    monkeypatch.setenv("MERGEBUILD_WRITE_BEHIND", "lots")
    with pytest.raises(InputError, match="MERGEBUILD_WRITE_BEHIND"):
        write_behind_bytes()
