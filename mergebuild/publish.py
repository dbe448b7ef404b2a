"""Publish: write the output model into a staging directory, then rename it into place.

The output directory appears whole or not at all. It carries a marker file, and
an existing directory is only replaced if it has that marker (mergebuild made
it) or the user passes --force.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
import xxhash

from mergebuild.catalog import BlockGrid, TensorDigests, TensorHasher
from mergebuild.errors import ExecutionError, InputError
from mergebuild.freshness import MARKER, side_files
from mergebuild.safetensors_io import DTYPE_NAMES, TensorInfo, header_for

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    digest: str


def shard_layout(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most `shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    used = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class OutputWriter:
    """Streams tensors, in layout order, into safetensors shards in `directory`."""

    def __init__(
        self,
        directory: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_size: int,
        block_size: int,
        metadata: dict[str, str],
    ) -> None:
        self.directory = directory
        self._shards = shard_layout(entries, shard_size)
        self._names = shard_names(len(self._shards))
        self._order = [(i, e) for i, shard in enumerate(self._shards) for e in shard]
        self._next = 0
        self._block_size = block_size
        self._metadata = metadata
        self._file: BinaryIO | None = None
        self._file_hash = xxhash.xxh3_128()
        self._files: list[OutputFile] = []
        self._shard = -1
        #: Where each tensor's bytes sit: name -> (file name, offset in the file, length).
        self.placements: dict[str, tuple[str, int, int]] = {}

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        self._shard = index
        path = self.directory / self._names[index]
        self._file = open(path, "wb")  # noqa: SIM115 - closed in _close_shard
        self._file_hash = xxhash.xxh3_128()
        self._emit(header_for(self._shards[index], self._metadata))

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file_hash.update(data)

    def _close_shard(self) -> None:
        if self._file is None:
            return
        f = self._file
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
        f.close()
        self._files.append(OutputFile(self._names[self._shard], size, self._file_hash.hexdigest()))
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> TensorDigests:
        """Append the next tensor of the layout; return its digests."""
        shard, (expected, dtype, shape) = self._order[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"writer expected {expected} {dtype} {shape}, got {name} {tensor.dtype}")
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor_bytes(tensor)
        info = TensorInfo(name, Path(), DTYPE_NAMES[dtype], shape, 0, len(data))
        hasher = TensorHasher(info, BlockGrid.for_shape(shape, self._block_size))
        hasher.update(data)
        assert self._file is not None
        self.placements[name] = (self._names[shard], self._file.tell(), len(data))
        self._emit(data)
        self._next += 1
        return hasher.digests()

    def finish(self) -> list[OutputFile]:
        """Close the last shard and write the index when there are several."""
        if self._next != len(self._order):
            raise AssertionError("writer finished before every tensor was written")
        if not self._order:
            self._open_shard(0)
        self._close_shard()
        if len(self._names) > 1:
            weight_map = {name: self._names[i] for i, (name, _, _) in self._order}
            total = sum(math.prod(shape) * dtype.itemsize for _, (_, dtype, shape) in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            raw = (json.dumps(index, indent=2) + "\n").encode()
            write_file(self.directory / INDEX_FILE, raw)
            self._files.append(OutputFile(INDEX_FILE, len(raw), xxhash.xxh3_128_hexdigest(raw)))
        return sorted(self._files, key=lambda f: f.name)


def tensor_bytes(tensor: torch.Tensor) -> bytearray:
    """The tensor's bytes in safetensors (little-endian, C order) layout."""
    flat = tensor.contiguous().reshape(-1)
    out = bytearray(flat.numel() * flat.element_size())
    if out:
        torch.frombuffer(out, dtype=torch.uint8).copy_(flat.view(torch.uint8))
    return out


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync a small file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_output_path(output: Path, force: bool) -> None:
    """Refuse to replace a directory mergebuild did not make, unless forced."""
    if output.is_symlink():
        raise InputError(f"{output}: output path is a symbolic link; refusing to write through it")
    if output.exists() and not (output / MARKER).is_file() and not force:
        raise InputError(f"{output}: exists and was not made by mergebuild; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")


def staging_dir(output: Path) -> Path:
    """A fresh staging directory beside the output (same filesystem, so rename is atomic)."""
    sweep_debris(output)
    staging = output.parent / f".{output.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as e:
        raise InputError(f"{output}: cannot create the output directory: {e.strerror or e}") from e
    return staging


def sweep_debris(output: Path) -> None:
    """Remove staging and retired directories beside `output` left by builds that were killed.

    Their names carry the building process's id; one whose process is gone is debris
    (a killed build cannot clean up after itself). A live process's are left alone.
    """
    if not output.parent.is_dir():
        return
    for kind in ("staging", "old"):
        for path in output.parent.glob(f".{output.name}.{kind}-*"):
            pid = path.name.removeprefix(f".{output.name}.{kind}-").split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def copy_side_files(staging: Path, model_dir: Path | None, tokenizer_dir: Path | None) -> list[OutputFile]:
    """Copy config and tokenizer files into the staging directory."""
    copied: list[OutputFile] = []
    for name, src in side_files(model_dir, tokenizer_dir).items():
        data = src.read_bytes()
        write_file(staging / name, data)
        copied.append(OutputFile(name, len(data), xxhash.xxh3_128_hexdigest(data)))
    return copied


def publish(staging: Path, output: Path, force: bool) -> None:
    """Move a finished staging directory into place atomically, replacing a previous output."""
    write_file(staging / MARKER, b"made by mergebuild\n")
    _fsync_dir(staging)
    check_output_path(output, force)
    try:
        if output.exists():
            retired = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            os.rename(output, retired)
            os.rename(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, output)
        _fsync_dir(output.parent)
    except OSError as e:
        raise ExecutionError(f"{output}: cannot publish: {e.strerror}") from e


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
