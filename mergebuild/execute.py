"""Execute: read source tensors (hashing them on the way), merge, hand results to a writer.

Output tensors are processed one at a time, so memory holds what one tensor's
method needs (the task-arithmetic family: the base, one model and a few
accumulators, whatever the number of models), never a whole model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mergebuild import rng
from mergebuild.catalog import BlockGrid, Catalog, FileStat, TensorDigests, TensorHasher
from mergebuild.errors import ExecutionError, InputError
from mergebuild.graph import CompiledTarget, TensorNode, node_key
from mergebuild.methods.base import Scalar
from mergebuild.safetensors_io import TensorInfo, bytes_to_tensor, read_bytes


@dataclass
class ReadCounters:
    """What a build read from sources."""

    bytes_read: int = 0
    tensors_read: int = 0


class SourceReader:
    """Reads source tensors by byte range, hashing them as they stream in.

    Digests go to the catalog keyed by the file's stat, which is taken before
    and after each read: a file that changes while it is read is an error, so a
    build never mixes two versions of a source.
    """

    def __init__(self, catalog: Catalog, block_size: int) -> None:
        self.catalog = catalog
        self.block_size = block_size
        self.counters = ReadCounters()
        self._digests: dict[tuple[str, str], TensorDigests] = {}
        self._stats: dict[str, FileStat] = {}

    def grid(self, info: TensorInfo) -> BlockGrid:
        return BlockGrid.for_shape(info.shape, self.block_size)

    def stat(self, info: TensorInfo) -> FileStat:
        """The file's stat as first seen by this build."""
        key = str(info.path)
        if key not in self._stats:
            try:
                self._stats[key] = FileStat.of(info.path)
            except OSError as e:
                raise InputError(f"{info.path}: cannot stat: {e.strerror}") from e
        return self._stats[key]

    def read(self, info: TensorInfo) -> tuple[torch.Tensor, TensorDigests]:
        """The tensor in its stored dtype, and its digests."""
        before = self.stat(info)
        hasher = TensorHasher(info, self.grid(info))
        try:
            fd = os.open(info.path, os.O_RDONLY)
        except OSError as e:
            raise InputError(f"{info.path}: cannot open: {e.strerror}") from e
        try:
            buf = read_bytes(info, 0, info.nbytes, fd=fd, on_chunk=hasher.update)
        except InputError as e:
            # The header was checked against the file's size when it was opened:
            # a short read now means the file changed under the build.
            raise ExecutionError(f"{e} (changed during build?)") from e
        finally:
            os.close(fd)
        if FileStat.of(info.path) != before:
            raise ExecutionError(
                f"{info.path}: changed while the build was reading it; nothing was published"
            )
        digests = hasher.digests()
        self.counters.bytes_read += info.nbytes
        self.counters.tensors_read += 1
        self._remember(info, digests)
        return bytes_to_tensor(buf, info.torch_dtype, info.shape), digests

    def digests(self, info: TensorInfo) -> TensorDigests:
        """Digests of a tensor: from this build, the catalog, or (last resort) a read."""
        known = self._digests.get((str(info.path), info.name))
        if known is not None:
            return known
        cached = self.catalog.lookup(info, self.grid(info), self.stat(info))
        if cached is not None:
            self._digests[(str(info.path), info.name)] = cached
            return cached
        return self.read(info)[1]

    def _remember(self, info: TensorInfo, digests: TensorDigests) -> None:
        key = (str(info.path), info.name)
        previous = self._digests.get(key)
        if previous is not None and previous.content != digests.content:
            raise ExecutionError(f"{info.path}: tensor {info.name!r} changed during the build")
        self._digests[key] = digests
        self.catalog.record(info, self.stat(info), digests)


class _Context:
    """The TensorContext handed to a method for one node."""

    def __init__(self, node: TensorNode, reader: SourceReader, seed: int) -> None:
        self.name = node.name
        self.shape = node.shape
        self.num_models = len(node.models)
        self.has_base = node.base is not None
        self._node = node
        self._reader = reader
        self._seed = seed
        self._shared = dict(node.shared)
        self._per_model = [dict(p) for p in node.per_model]

    def base(self) -> torch.Tensor:
        assert self._node.base is not None, "method asked for a base the spec does not have"
        return self._float(self._node.base)

    def model(self, i: int) -> torch.Tensor:
        return self._float(self._node.models[i][1])

    def _float(self, info: TensorInfo) -> torch.Tensor:
        tensor = self._reader.read(info)[0].to(torch.float32)
        # A NaN or Inf would spread through every method silently: refuse it.
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{info.path}: tensor {info.name!r} holds NaN or Inf values")
        return tensor

    def param(self, name: str) -> Scalar:
        return self._shared[name]

    def model_param(self, i: int, name: str) -> Scalar:
        return self._per_model[i][name]

    def uniform(self, i: int) -> torch.Tensor:
        info = self._node.models[i][1]
        key = rng.stream_key(self._seed, self._reader.digests(info).content, self.name)
        return rng.uniform(key, 0, info.numel).reshape(self.shape)


@dataclass(frozen=True)
class TensorResult:
    """An output tensor as built: its key, and the digests of its inputs and of itself."""

    name: str
    key: str
    digests: TensorDigests


@dataclass
class ExecutionReport:
    results: list[TensorResult] = field(default_factory=list)
    merged: int = 0
    copied: int = 0
    seconds: float = 0.0


def execute(
    target: CompiledTarget,
    reader: SourceReader,
    write: Callable[[str, torch.Tensor], TensorDigests],
    on_tensor: Callable[[TensorNode], None] | None = None,
) -> ExecutionReport:
    """Build every node of `target` in order, passing each result to `write`."""
    report = ExecutionReport()
    started = time.perf_counter()
    for node in target.nodes:
        if node.action == "copy":
            assert node.base is not None
            tensor = reader.read(node.base)[0]
            if node.dtype != tensor.dtype:
                tensor = tensor.to(node.dtype)
            report.copied += 1
        else:
            ctx = _Context(node, reader, target.spec.seed)
            merged = target.method.merge(ctx)
            if merged.shape != node.shape:
                raise AssertionError(
                    f"{target.method.name} returned shape {tuple(merged.shape)} for {node.name}"
                )
            tensor = merged.to(node.dtype)
            report.merged += 1
        input_digests = tuple(reader.digests(info).content for info in node.inputs)
        key = node_key(node, target.method, target.spec.seed, input_digests)
        report.results.append(TensorResult(node.name, key, write(node.name, tensor)))
        if on_tensor is not None:
            on_tensor(node)
    report.seconds = time.perf_counter() - started
    return report
