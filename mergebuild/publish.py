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
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from mergebuild.catalog import BlockGrid, TensorDigests, hash_bytes
from mergebuild.direct_io import SequentialFile
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


#: Output bytes waiting for the writer thread at most (besides the tensor being written),
#: unless $MERGEBUILD_WRITE_BEHIND says otherwise.
WRITE_BEHIND_BYTES = 256 * 2**20


def write_behind_bytes() -> int:
    """The write-behind cap: $MERGEBUILD_WRITE_BEHIND or WRITE_BEHIND_BYTES."""
    from mergebuild.spec import env_size

    return env_size("MERGEBUILD_WRITE_BEHIND", WRITE_BEHIND_BYTES)


class OutputWriter:
    """Streams tensors, in layout order, into safetensors shards in `directory`.

    A thread does the file writes (past the page cache where the file system allows,
    see `direct_io`), which wait for the device, so the build goes on with the next
    tensor meanwhile; at most `queue_bytes` of finished tensors wait for it. Tensor
    digests are computed on the caller's thread (they are its return value), file
    digests on the writer's.
    """

    def __init__(
        self,
        directory: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_size: int,
        block_size: int,
        metadata: dict[str, str],
        queue_bytes: int = WRITE_BEHIND_BYTES,
    ) -> None:
        self.directory = directory
        self._shards = shard_layout(entries, shard_size)
        self._names = shard_names(len(self._shards))
        self._headers = [header_for(shard, metadata) for shard in self._shards]
        self._order = [(i, e) for i, shard in enumerate(self._shards) for e in shard]
        self._next = 0
        self._offset = 0
        self._block_size = block_size
        self._files: list[OutputFile] = []
        #: Where each tensor's bytes sit: name -> (file name, offset in the file, length).
        self.placements: dict[str, tuple[str, int, int]] = {}
        self._queue_bytes = queue_bytes
        self._queued: list[tuple[int, memoryview] | None] = []
        self._held = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mergebuild-output-writer", daemon=True)
        self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> TensorDigests:
        """Append the next tensor of the layout; return its digests."""
        shard, (expected, dtype, shape) = self._order[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"writer expected {expected} {dtype} {shape}, got {name} {tensor.dtype}")
        if self._next == 0 or shard != self._order[self._next - 1][0]:
            self._offset = len(self._headers[shard])
        data = tensor_bytes(tensor)
        info = TensorInfo(name, Path(), DTYPE_NAMES[dtype], shape, 0, len(data))
        digests = hash_bytes(info, BlockGrid.for_shape(shape, self._block_size), data)
        self.placements[name] = (self._names[shard], self._offset, len(data))
        self._offset += len(data)
        self._next += 1
        with self._cond:
            while self._error is None and self._held and self._held + len(data) > self._queue_bytes:
                self._cond.wait()
            self._raise()
            self._queued.append((shard, data))
            self._held += len(data)
            self._cond.notify_all()
        return digests

    def finish(self) -> list[OutputFile]:
        """Write what is queued, close the last shard and write the index when there are several."""
        if self._next != len(self._order):
            raise AssertionError("writer finished before every tensor was written")
        self._stop()
        self._raise()
        if len(self._names) > 1:
            weight_map = {name: self._names[i] for i, (name, _, _) in self._order}
            total = sum(math.prod(shape) * dtype.itemsize for _, (_, dtype, shape) in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            raw = (json.dumps(index, indent=2) + "\n").encode()
            write_file(self.directory / INDEX_FILE, raw)
            self._files.append(OutputFile(INDEX_FILE, len(raw), xxhash.xxh3_128_hexdigest(raw)))
        return sorted(self._files, key=lambda f: f.name)

    def abort(self) -> None:
        """Stop writing (the build failed): drop what is queued and close the open shard."""
        with self._cond:
            self._queued.clear()
            self._error = self._error or ExecutionError("output writer aborted")
            self._cond.notify_all()
        self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._queued.append(None)
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        file: SequentialFile | None = None
        file_hash = xxhash.xxh3_128()
        shard = -1
        try:
            while True:
                with self._cond:
                    while not self._queued:
                        self._cond.wait()
                    job = self._queued.pop(0)
                if job is None or self._error is not None:
                    break
                index, data = job
                if index != shard:
                    self._close_shard(file, shard, file_hash)
                    shard, file_hash = index, xxhash.xxh3_128()
                    file = SequentialFile(self.directory / self._names[index])
                    _emit(file, file_hash, self._headers[index])
                assert file is not None
                _emit(file, file_hash, data)
                written = len(data)
                job = data = None  # the tensor may be freed while the writer waits for the next
                with self._cond:
                    self._held -= written
                    self._cond.notify_all()
            if self._error is None:
                if shard < 0:  # no tensors: one empty shard still makes a loadable model
                    shard, file = 0, SequentialFile(self.directory / self._names[0])
                    _emit(file, file_hash, self._headers[0])
                self._close_shard(file, shard, file_hash)
                file = None
        except BaseException as e:  # handed to the build, which raises it
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            if file is not None:
                file.abandon()

    def _close_shard(self, file: SequentialFile | None, shard: int, file_hash: xxhash.xxh3_128) -> None:
        if file is None:
            return
        size = file.close(sync=True)
        self._files.append(OutputFile(self._names[shard], size, file_hash.hexdigest()))


def _emit(file: SequentialFile, file_hash: xxhash.xxh3_128, data: bytes | memoryview) -> None:
    file.write(data)
    file_hash.update(data)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in safetensors (little-endian, C order) layout: a view of its
    memory when it is contiguous (no copy of a tensor the size of the output's largest)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


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
