"""Execute: build each output tensor from the cache or from its sources, and hand it to a writer.

Output tensors are processed one at a time, so memory holds what one tensor's
method needs (the task-arithmetic family: the base, one model and a few
accumulators, whatever the number of models), never a whole model. The one
overlap: a method that finishes a small tensor on a thread of its own lets the
next tensor start meanwhile (`Method.start_merge`).

For each tensor the executor first learns its inputs' digests: from this
build, from the catalog (by file stat), or by reading the tensor, which it then
keeps for the merge so the first build of a checkpoint reads each byte once.
With the digests it has the node key; a cached result for the key is copied
out (after its bytes hash as recorded), otherwise the method runs, and its
per-expert work (sparsified deltas) is itself looked up and cached by key.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import xxhash

from mergebuild import rng
from mergebuild.cache import BlobPiece, Cache
from mergebuild.catalog import BlockGrid, FileStat, TensorDigests, TensorHasher
from mergebuild.errors import ExecutionError, InputError
from mergebuild.graph import CompiledTarget, TensorNode, expert_work_key, node_key, node_record
from mergebuild.methods import sparse_delta
from mergebuild.methods.base import Scalar, finished
from mergebuild.methods.delta_stats import DeltaStats, block_stats
from mergebuild.methods.sparse_delta import SparseDelta
from mergebuild.plan import HOLD_BYTES, Blocks, NodePlan, TargetPlan
from mergebuild.safetensors_io import TensorInfo, bytes_to_tensor, read_bytes
from mergebuild.tensor_checks import all_finite

_CPU = torch.device("cpu")

#: Read-ahead kept in memory at most (tensors for the nodes after the current one), unless
#: $MERGEBUILD_READ_AHEAD says otherwise (e.g. '1GiB'): about half a second of disk.
READ_AHEAD_BYTES = 256 * 2**20


def read_ahead_bytes() -> int:
    """The read-ahead cap: $MERGEBUILD_READ_AHEAD or READ_AHEAD_BYTES."""
    from mergebuild.spec import env_size

    return env_size("MERGEBUILD_READ_AHEAD", READ_AHEAD_BYTES)


def compute_device(name: str) -> torch.device:
    """The torch device a build computes on: "cpu", or "cuda" / "cuda:N" where torch sees
    that GPU (InputError otherwise: asking for a GPU the machine lacks is a usage error)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch {torch.__version__} sees no CUDA device on this machine")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


@dataclass
class ReadCounters:
    """What a build read from sources."""

    bytes_read: int = 0
    tensors_read: int = 0
    stale_catalog_rows: int = 0
    #: Bytes read per source file.
    by_file: dict[str, int] = field(default_factory=dict)

    def add(self, path: Path, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.by_file[str(path)] = self.by_file.get(str(path), 0) + nbytes


#: One read the read-ahead does: a whole tensor (block None) or one block of it (a budget's).
ReadJob = tuple[TensorInfo, int | None]
#: What a read-ahead hands over: the bytes, their digests (whole tensors only), the file's
#: stat before and after the read, and (whole tensors only) whether every value is finite.
ReadItem = tuple[memoryview, TensorDigests | None, FileStat, FileStat, bool | None]
#: A read-ahead's read: node index, file, tensor name, block (None: the whole tensor).
_ReadKey = tuple[int, str, str, int | None]


#: Threads that read ahead. Two reads in flight keep the disk busy while a thread copies
#: from the page cache: the 630M x 8 family's inputs (11 GB, cold) read in 6.6 to 7.6 s
#: on two threads against 12.6 s on one, on the 2-core machine of BENCHMARKS.md.
READ_THREADS = 2


class ReadAhead:
    """Threads that read (and hash) the tensors and blocks the plan says the next nodes need.

    Reads release the GIL, so on two cores the disk and the arithmetic overlap.
    The threads claim the reads in plan order, and at most `max_bytes` of
    read-ahead (read, or being read) sit in memory; the executor takes each
    read when it needs it, and whatever a node did not use is dropped when it is
    done.
    """

    def __init__(
        self, jobs: list[list[ReadJob]], block_size: int, max_bytes: int, threads: int = READ_THREADS
    ) -> None:
        self._jobs = jobs
        self._queue = [(index, info, block) for index, reads in enumerate(jobs) for info, block in reads]
        self._next = 0
        self._block_size = block_size
        self._max_bytes = max_bytes
        self._ready: dict[_ReadKey, ReadItem] = {}
        self._reading: set[_ReadKey] = set()
        #: Bytes read and not yet taken, or being read.
        self._held_bytes = 0
        self._taken: set[_ReadKey] = set()
        self._done_through = -1
        self._error: BaseException | None = None
        self._stop = False
        #: The reads the executor waits for: while one is unclaimed, the cap yields, so a
        #: method's read order never deadlocks.
        self._wanted: set[_ReadKey] = set()
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, name=f"mergebuild-read-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _claim(self) -> tuple[_ReadKey, TensorInfo, int | None] | None:
        """The next read in plan order, once the cap has room for it; None when there is none."""
        with self._cond:
            while not self._stop and self._error is None and self._next < len(self._queue):
                index, info, block = self._queue[self._next]
                key = (index, str(info.path), info.name, block)
                if index <= self._done_through:
                    self._next += 1
                    continue
                nbytes = self._nbytes(info, block)
                wanted_unclaimed = any(k not in self._ready and k not in self._reading for k in self._wanted)
                if wanted_unclaimed or not self._held_bytes or self._held_bytes + nbytes <= self._max_bytes:
                    self._next += 1
                    self._held_bytes += nbytes
                    self._reading.add(key)
                    return key, info, block
                self._cond.wait()
            return None

    def _run(self) -> None:
        try:
            while (claimed := self._claim()) is not None:
                key, info, block = claimed
                if block is None:
                    item: ReadItem = _read_hashed(info, self._block_size)
                else:
                    before = FileStat.of(info.path)
                    buf = _read_block(info, BlockGrid.for_shape(info.shape, self._block_size), block)
                    item = (buf, None, before, FileStat.of(info.path), None)
                with self._cond:
                    self._reading.discard(key)
                    if self._stop or key[0] <= self._done_through:
                        self._held_bytes -= len(item[0])
                    else:
                        self._ready[key] = item
                    self._cond.notify_all()
        except BaseException as e:  # handed to the executor, which raises it
            with self._cond:
                self._error = self._error or e
                self._cond.notify_all()

    def _nbytes(self, info: TensorInfo, block: int | None) -> int:
        if block is None:
            return info.nbytes
        start, end = BlockGrid.for_shape(info.shape, self._block_size).ranges()[block]
        return (end - start) * info.row_bytes

    def take(self, index: int, info: TensorInfo, block: int | None = None) -> ReadItem | None:
        """The read-ahead of `info` (or its `block`) for node `index`, waiting for it; None if
        it was not planned."""
        key = (index, str(info.path), info.name, block)
        if (info, block) not in self._jobs[index] or key in self._taken:
            return None  # not planned, or a second read of one tensor (a model listed twice)
        with self._cond:
            self._wanted.add(key)
            self._cond.notify_all()
            while key not in self._ready and self._error is None:
                self._cond.wait()
            self._wanted.discard(key)
            if key not in self._ready:
                assert self._error is not None
                raise self._error
            item = self._ready.pop(key)
            self._taken.add(key)
            self._held_bytes -= len(item[0])
            self._cond.notify_all()
            return item

    def done(self, index: int) -> None:
        """Node `index` is finished: drop its unused read-ahead (and skip any not yet read)."""
        with self._cond:
            self._done_through = index
            for key in [k for k in self._ready if k[0] <= index]:
                buf = self._ready.pop(key)[0]
                self._held_bytes -= len(buf)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()


def _read_block(info: TensorInfo, grid: BlockGrid, block: int) -> memoryview:
    """The bytes of one block of a tensor, read without the kernel's readahead (a budget counts
    the bytes taken from disk, not just those asked for)."""
    start, end = grid.ranges()[block]
    return read_bytes(info, start * info.row_bytes, end * info.row_bytes, random_access=True)


def _read_hashed(info: TensorInfo, block_size: int) -> ReadItem:
    """A tensor's bytes and digests, with its file's stat before and after the read."""
    try:
        before = FileStat.of(info.path)
    except OSError as e:
        raise InputError(f"{info.path}: cannot open: {e.strerror}") from e
    hasher = TensorHasher(info, BlockGrid.for_shape(info.shape, block_size))
    try:
        buf = read_bytes(info, 0, info.nbytes, on_chunk=hasher.update)
    except InputError as e:
        # The header was checked against the file's size when it was opened: a file
        # that cannot be opened or is short now changed under the build.
        raise ExecutionError(f"{e} (changed during build?)") from e
    after = FileStat.of(info.path)
    # Checked here, on the read-ahead's thread as a rule: the merging thread need not.
    return (
        buf,
        hasher.digests(),
        before,
        after,
        all_finite(bytes_to_tensor(buf, info.torch_dtype, info.shape)),
    )


#: A blob's bytes as the blob writer takes them: its pieces, in order.
_Blob = Sequence[BlobPiece]


#: Bytes of results waiting for the blob writer at most (one result may be bigger).
BLOB_QUEUE_BYTES = 64 * 2**20


class BlobWriter:
    """A thread that encodes and writes per-expert blobs (and budgeted reads' blocks) while
    the executor goes on.

    numpy's coding passes and file writes release the GIL, so on two cores the coding
    overlaps the arithmetic. The results waiting in line hold whole tensors, so their
    bytes are capped (`max_bytes`, or one result); the executor records finished blobs
    in the catalog (`drain`), so SQLite is only ever used from its thread.
    """

    def __init__(self, cache: Cache, max_bytes: int = BLOB_QUEUE_BYTES) -> None:
        self._cache = cache
        self._max_bytes = max_bytes
        self._jobs: list[tuple[str, Callable[[], _Blob], int] | None] = []
        self._held = 0
        self._done: list[tuple[str, str, int]] = []
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mergebuild-blob-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.pop(0)
            if job is None:
                return
            key, encode, nbytes = job
            job = None
            try:
                if self._error is None:
                    digest, size = self._cache.write_blob(encode())
                    with self._cond:
                        self._done.append((key, digest, size))
            except BaseException as e:  # handed to the executor, which raises it
                self._error = e
            finally:
                encode = None  # the result's tensors may be freed now
                with self._cond:
                    self._held -= nbytes
                    self._cond.notify_all()

    def submit(self, key: str, encode: Callable[[], _Blob], nbytes: int) -> None:
        """Queue a blob for `key`; `nbytes` is about what `encode` holds until it has run."""
        self._raise()
        with self._cond:
            while self._error is None and self._held and self._held + nbytes > self._max_bytes:
                self._cond.wait()
            self._jobs.append((key, encode, nbytes))
            self._held += nbytes
            self._cond.notify_all()

    def drain(self) -> None:
        """Record the blobs written so far."""
        self._raise()
        with self._cond:
            done, self._done = self._done, []
        if done:
            self._cache.record_blobs(done)

    def close(self) -> None:
        """Finish every queued blob and record it."""
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join()
        self.drain()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class SourceReader:
    """Reads source tensors by byte range, hashing them as they stream in.

    Digests go to the catalog keyed by the file's stat, which is taken before
    and after each read: a file that changes while it is read is an error, so a
    build never mixes two versions of a source.
    """

    def __init__(self, cache: Cache, block_size: int) -> None:
        self.cache = cache
        self.block_size = block_size
        self.counters = ReadCounters()
        self._digests: dict[tuple[str, str], TensorDigests] = {}
        self._catalog_digests: dict[tuple[str, str], TensorDigests] = {}
        self._stats: dict[str, FileStat] = {}
        self._held: dict[tuple[str, str], memoryview] = {}
        #: Whether each tensor read whole in this build holds only finite values.
        self._finite: dict[tuple[str, str], bool] = {}
        #: Set by the executor: the read-ahead and blob-writer threads, and the node being built.
        self.read_ahead: ReadAhead | None = None
        self.blob_writer: BlobWriter | None = None
        self.node_index = 0

    def grid(self, info: TensorInfo) -> BlockGrid:
        return BlockGrid.for_shape(info.shape, self.block_size)

    def stat(self, info: TensorInfo) -> FileStat:
        """The stat of the tensor's file as first seen by this build."""
        return self.file_stat(info.path)

    def file_stat(self, path: Path) -> FileStat:
        """A source file's stat as first seen by this build."""
        key = str(path)
        if key not in self._stats:
            try:
                self._stats[key] = FileStat.of(path)
            except OSError as e:
                raise InputError(f"{path}: cannot stat: {e.strerror}") from e
        return self._stats[key]

    def known(self, info: TensorInfo) -> TensorDigests | None:
        """Digests of a tensor from this build or the catalog, without reading it."""
        key = (str(info.path), info.name)
        found = self._digests.get(key)
        if found is None:
            found = self.cache.catalog.lookup(info, self.grid(info), self.stat(info))
            if found is not None:
                self._digests[key] = found
                self._catalog_digests[key] = found
        return found

    def digests(self, info: TensorInfo) -> TensorDigests:
        """Digests of a tensor: known, or (last resort) read and kept for the merge."""
        return self.known(info) or self.hold(info)

    def hold(self, info: TensorInfo) -> TensorDigests:
        """Read and hash a tensor now, keeping its bytes for the next `read` of it."""
        buf, digests = self._read_bytes(info)
        self._held[(str(info.path), info.name)] = buf
        return digests

    def release(self) -> None:
        """Drop tensors held but not used (their node came from the cache)."""
        self._held.clear()

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The tensor in its stored dtype (held bytes if any, else a fresh read)."""
        buf = self._held.pop((str(info.path), info.name), None)
        if buf is None:
            buf, _ = self._read_bytes(info)
        return bytes_to_tensor(buf, info.torch_dtype, info.shape)

    def read_finite(self, info: TensorInfo) -> torch.Tensor:
        """`read`, refusing a tensor that holds NaN or Inf (InputError): a NaN or Inf would
        spread through every method silently. Every whole read was checked as it was read
        (`_read_hashed`, on the read-ahead's thread as a rule)."""
        tensor = self.read(info)
        if not self._finite[(str(info.path), info.name)]:
            raise _not_finite(info)
        return tensor

    def read_block(self, info: TensorInfo, block: int, keep: bool) -> torch.Tensor:
        """Rows of one block of a tensor whose digests the catalog holds (a budgeted read).

        The block comes from the cache when an earlier budgeted build kept it,
        else from the file; its bytes must hash to the catalog's block digest.
        With `keep`, a block read from the file is kept in the cache, so raising
        the budget later reads only the blocks it adds.
        """
        digests = self.known(info)
        assert digests is not None, "a budget is planned only over tensors the catalog knows"
        expected = digests.blocks[block].hex()
        start, end = self.grid(info).ranges()[block]
        shape = (end - start, *info.shape[1:])
        cached = self.cache.result(_block_key(digests.blocks[block]))
        data = self.cache.read(cached) if cached is not None else None
        if data is not None:
            return bytes_to_tensor(bytearray(data), info.torch_dtype, shape)
        first_seen = self.stat(info)
        item = self.read_ahead.take(self.node_index, info, block) if self.read_ahead is not None else None
        if item is not None:
            buf, _, before, after, _ = item
        else:
            before, buf = first_seen, _read_block(info, self.grid(info), block)
            after = FileStat.of(info.path)
        if before != first_seen or after != first_seen or xxhash.xxh3_128_hexdigest(buf) != expected:
            self.cache.catalog.forget_file(info.path)
            raise ExecutionError(
                f"{info.path}: tensor {info.name!r} differs from what the catalog recorded for this file; "
                "its entry was dropped: run `mergebuild index` again (or build without a budget)"
            )
        self.counters.add(info.path, len(buf))
        if keep:
            assert self.blob_writer is not None
            self.blob_writer.submit(_block_key(digests.blocks[block]), lambda: [buf], len(buf))
        return bytes_to_tensor(buf, info.torch_dtype, shape)

    def _read_bytes(self, info: TensorInfo) -> tuple[memoryview, TensorDigests]:
        first_seen = self.stat(info)
        item = self.read_ahead.take(self.node_index, info) if self.read_ahead is not None else None
        buf, digests, before, after, finite = (
            item if item is not None else _read_hashed(info, self.block_size)
        )
        assert digests is not None, "whole reads are hashed"
        if before != first_seen or after != first_seen:
            raise ExecutionError(
                f"{info.path}: changed while the build was reading it; nothing was published"
            )
        self.counters.add(info.path, info.nbytes)
        self.counters.tensors_read += 1
        self._remember(info, digests)
        assert finite is not None, "whole reads are checked"
        self._finite[(str(info.path), info.name)] = finite
        return buf, digests

    def _remember(self, info: TensorInfo, digests: TensorDigests) -> None:
        key = (str(info.path), info.name)
        from_catalog = self._catalog_digests.pop(key, None)
        previous = self._digests.get(key)
        if previous is not None and previous.content != digests.content:
            if from_catalog is None:
                raise ExecutionError(f"{info.path}: tensor {info.name!r} changed during the build")
            # The file's stat matched a catalog row that does not describe its bytes
            # (a corrupt row, or a file rewritten with its old mtime): trust the bytes.
            self.counters.stale_catalog_rows += 1
        self._digests[key] = digests
        self.cache.catalog.record(info, self.stat(info), digests)


Outcome = Literal["reused", "computed", "copied"]


@dataclass(frozen=True)
class TensorResult:
    """An output tensor as built: its key, its digests, and whether it came from the cache."""

    name: str
    key: str
    digests: TensorDigests
    outcome: Outcome


@dataclass
class ExecutionReport:
    results: list[TensorResult] = field(default_factory=list)
    expert_work_reused: int = 0
    expert_work_computed: int = 0
    seconds: float = 0.0

    def count(self, outcome: Outcome) -> int:
        return sum(r.outcome == outcome for r in self.results)


class _Context:
    """The TensorContext handed to a method for one node."""

    def __init__(
        self,
        node: TensorNode,
        reader: SourceReader,
        seed: int,
        report: ExecutionReport,
        allocation: tuple[Blocks, ...],
        with_stats: bool,
        rows: tuple[int, int] | None = None,
        stored_base: torch.Tensor | None = None,
        device: torch.device = _CPU,
    ) -> None:
        self.name = node.name
        #: Where the method's arithmetic runs: inputs are handed over there.
        self.device = device
        #: With `rows`, the context is that row range of the tensor (the rest is not computed).
        self._rows = rows
        self.shape = node.shape if rows is None else (rows[1] - rows[0], *node.shape[1:])
        self.num_models = len(node.models)
        self.has_base = node.base is not None
        self._node = node
        self._reader = reader
        self._seed = seed
        self._report = report
        self._shared = dict(node.shared)
        self._per_model = [dict(p) for p in node.per_model]
        self._by_block = bool(allocation)
        self._allocation = allocation or (None,) * len(node.models)
        self._with_stats = with_stats and node.base is not None and rows is None
        self._delta_stats: dict[int, DeltaStats] = {}
        self._base: torch.Tensor | None = None
        #: The whole base as stored: per-expert blobs are coded against its bit patterns.
        self._stored_base = stored_base
        self._streams: dict[int, int] = {}
        self._streams_lock = threading.Lock()

    def base(self) -> torch.Tensor:
        self._base = _to_device(self._base_as_stored(), self.device).to(torch.float32)
        if self._rows is None and self._base.device == _CPU:
            # The float32 base holds the stored values exactly, and blobs can be coded against
            # it (`_coding_base`): the stored copy need not stay alive beside it.
            self._stored_base = None
        return self._base

    def stored_base(self) -> torch.Tensor:
        stored = self._base_as_stored()
        if stored.element_size() != 2:
            return self.base()
        self._base = _to_device(stored, self.device)
        return self._base

    def _base_as_stored(self) -> torch.Tensor:
        """The base (its rows, for a row range) as stored, on the host, read once (and
        refused if it holds NaN or Inf)."""
        assert self._node.base is not None, "method asked for a base the spec does not have"
        if self._stored_base is None:
            self._stored_base = self._reader.read_finite(self._node.base)
        return self._stored_base if self._rows is None else self._stored_base[slice(*self._rows)]

    def model(self, i: int) -> torch.Tensor:
        return self.stored_model(i).to(torch.float32)

    def stored_model(self, i: int) -> torch.Tensor:
        info = self._node.models[i][1]
        blocks = self._allocation[i]
        if blocks is None and self._by_block:
            # Under a budget even a whole tensor goes block by block, through the block cache.
            blocks = tuple(range(len(self._reader.grid(info).ranges())))
        assert self._rows is None or blocks is not None, "a row range is read by blocks"
        if blocks is not None:
            return self._allocated(info, blocks)
        return _to_device(self._reader.read_finite(info), self.device)

    def omitted(self, i: int) -> bool:
        return self._by_block and self._allocation[i] == ()

    def delta_stats(self, i: int) -> DeltaStats | None:
        # Statistics describe the whole expert: not one a budget cut down.
        if not self._with_stats or self._allocation[i] is not None:
            return None
        assert self._node.base is not None
        info = self._node.models[i][1]
        if _has_stats(self._reader, self._node.base, info):
            return None
        self._delta_stats[i] = DeltaStats(self._reader.grid(info), math.prod(self.shape))
        return self._delta_stats[i]

    def record_stats(self) -> None:
        """Put the block statistics the method gathered into the catalog."""
        assert self._node.base is not None or not self._delta_stats
        for i, stats in self._delta_stats.items():
            _record_stats(self._reader, self._node.base, self._node.models[i][1], stats.result())
        self._delta_stats.clear()

    def _known_base(self) -> torch.Tensor:
        return self._base if self._base is not None else self.base()

    def _coding_base(self) -> torch.Tensor:
        """The whole base, on the host, that per-expert blobs are coded against: as stored, or
        its float32 copy (the same values; `sparse_delta` converts it a chunk at a time)."""
        base = self._known_base()
        return self._stored_base if self._stored_base is not None else base

    def _allocated(self, info: TensorInfo, blocks: tuple[int, ...]) -> torch.Tensor:
        """The expert's tensor as a budget sees it: its allocated blocks, the base's rows elsewhere."""
        base = self._known_base()
        first = self._rows[0] if self._rows is not None else 0
        ranges = self._reader.grid(info).ranges()
        whole = sum(ranges[b][1] - ranges[b][0] for b in blocks) == (base.shape[0] if base.dim() else 1)
        # Rows the blocks do not cover are the base's; when they cover all, nothing to copy.
        tensor = torch.empty_like(base, dtype=torch.float32) if whole else base.to(torch.float32, copy=True)
        rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() else tensor.reshape(1, 1)
        for b in blocks:
            start, end = ranges[b]
            block = _finite(_to_device(self._reader.read_block(info, b, keep=True), self.device), info)
            rows[start - first : end - first].copy_(block.reshape(end - start, -1))
        return tensor

    def param(self, name: str) -> Scalar:
        return self._shared[name]

    def model_param(self, i: int, name: str) -> Scalar:
        return self._per_model[i][name]

    def draws(self, i: int) -> rng.Draws:
        return rng.Draws(self._stream(i), self._flat_range()[0])

    def keep_mask(self, i: int, density: float) -> torch.Tensor:
        mask = rng.keep_mask(self._stream(i), *self._flat_range(), density).reshape(self.shape)
        return _to_device(mask, self.device)

    def _flat_range(self) -> tuple[int, int]:
        """(first flat index, count) of the elements this context covers."""
        numel = math.prod(self.shape)
        if self._rows is None:
            return 0, numel
        return self._rows[0] * math.prod(self.shape[1:]), numel

    def _stream(self, i: int) -> int:
        # Methods ask for draws from several threads at once (`parallel`): the digest is
        # looked up once, under a lock.
        with self._streams_lock:
            if i not in self._streams:
                info = self._node.models[i][1]
                self._streams[i] = rng.stream_key(self._seed, self._reader.digests(info).content, self.name)
            return self._streams[i]

    def expert_work(
        self, i: int, recipe: Mapping[str, Scalar | str], compute: Callable[[], SparseDelta]
    ) -> SparseDelta:
        assert self._node.base is not None, "per-expert work is a delta against the base"
        assert self._rows is None, "per-expert work covers whole tensors"
        info = self._node.models[i][1]
        cache = self._reader.cache
        blocks = self._allocation[i]
        expert = self._reader.known(info)
        base = self._reader.known(self._node.base)
        key = None
        if expert is not None and base is not None:
            key = expert_work_key(recipe, self._seed, expert.content, base.content, self.shape, blocks)
            cached = cache.result(key)
            data = cache.read(cached) if cached is not None else None
            if data is not None:
                self._report.expert_work_reused += 1
                cached_delta = sparse_delta.decode(data, self._coding_base())
                return SparseDelta(
                    _to_device(cached_delta.mask, self.device),
                    _to_device(cached_delta.expert, self.device),
                    cached_delta.factor,
                )
        sparse = compute()
        self._report.expert_work_computed += 1
        if key is None:
            expert, base = self._reader.digests(info), self._reader.digests(self._node.base)
            key = expert_work_key(recipe, self._seed, expert.content, base.content, self.shape, blocks)
        base_tensor, dtype = self._coding_base(), info.torch_dtype
        # What waits to be coded holds the expert as stored (half of float32 for 16-bit dtypes),
        # in host memory: the blob writer codes it with numpy.
        factor = sparse.factor.cpu() if sparse.factor is not None else None
        stored = SparseDelta(sparse.mask.cpu(), sparse.expert.to(device=_CPU, dtype=dtype), factor)
        assert self._reader.blob_writer is not None
        self._reader.blob_writer.submit(
            key,
            lambda: sparse_delta.encode(stored, base_tensor, dtype),
            stored.mask.numel() + stored.expert.nbytes,
        )
        return sparse


def execute(
    target: CompiledTarget,
    plan: TargetPlan,
    reader: SourceReader,
    write: Callable[[str, torch.Tensor], TensorDigests],
    on_tensor: Callable[[TensorNode], None] | None = None,
    device: torch.device = _CPU,
) -> ExecutionReport:
    """Build every node of `target` in order (with `plan`'s allocation), passing each result to
    `write` (in host memory); methods compute on `device`."""
    report = ExecutionReport()
    started = time.perf_counter()
    blocks_seen: set[bytes] = set()
    jobs = [
        _read_jobs(node, p, reader, blocks_seen) for node, p in zip(target.nodes, plan.nodes, strict=True)
    ]
    reader.read_ahead = ReadAhead(jobs, reader.block_size, read_ahead_bytes())
    reader.blob_writer = BlobWriter(reader.cache)
    failed = True
    try:
        _execute_nodes(target, plan, reader, write, on_tensor, report, device)
        failed = False
    finally:
        try:
            reader.blob_writer.close()
        except BaseException:
            if not failed:
                raise  # otherwise the build's own error is the one to report
        reader.read_ahead.close()
        reader.read_ahead = None
        reader.blob_writer = None
    report.seconds = time.perf_counter() - started
    return report


def _read_jobs(
    node: TensorNode, node_plan: NodePlan, reader: SourceReader, blocks_seen: set[bytes]
) -> list[ReadJob]:
    """What the read-ahead reads for one node: its whole inputs, and a budget's blocks that
    neither the cache nor an earlier node's read (`blocks_seen`, by digest) provides."""
    jobs: list[ReadJob] = []
    for read in node_plan.reads:
        info = node.inputs[read.position]
        if read.whole:
            jobs.append((info, None))
            continue
        blocks = node_plan.allocation[read.position - (node.base is not None)]
        digests = reader.known(info)
        assert digests is not None, "a budget is planned only over tensors the catalog knows"
        for b in range(len(digests.blocks)) if blocks is None else blocks:
            digest = digests.blocks[b]
            if digest not in blocks_seen and reader.cache.result(_block_key(digest)) is None:
                blocks_seen.add(digest)
                jobs.append((info, b))
    return list(dict.fromkeys(jobs))


def _block_key(digest: bytes) -> str:
    """The cache key of a source block kept by a budgeted build."""
    return f"block:{digest.hex()}"


def _execute_nodes(
    target: CompiledTarget,
    plan: TargetPlan,
    reader: SourceReader,
    write: Callable[[str, torch.Tensor], TensorDigests],
    on_tensor: Callable[[TensorNode], None] | None,
    report: ExecutionReport,
    device: torch.device,
) -> None:
    # A method may still be finishing a node on a thread of its own (`Method.start_merge`)
    # when the next node starts: the node is written as soon as it is done, at the latest once
    # the next node's merge has started.
    unwritten: _Unwritten | None = None
    try:
        for index, (node, node_plan) in enumerate(zip(target.nodes, plan.nodes, strict=True)):
            if unwritten is not None and unwritten.merging.done():
                _write(unwritten, write, report, on_tensor)
                unwritten = None
            reader.node_index = index
            started = _start_node(node, node_plan.allocation, target, reader, report, device)
            assert reader.read_ahead is not None and reader.blob_writer is not None
            reader.read_ahead.done(index)
            if unwritten is not None:
                _write(unwritten, write, report, on_tensor)
            unwritten = started
            del started  # only `unwritten` holds the node's tensor: it is freed once written
            reader.blob_writer.drain()
        if unwritten is not None:
            _write(unwritten, write, report, on_tensor)
            unwritten = None
    finally:
        if unwritten is not None:
            # The build failed: still let the node's merge end before its inputs are let go.
            futures.wait([unwritten.merging.merged])


def _start_node(
    node: TensorNode,
    allocation: tuple[Blocks, ...],
    target: CompiledTarget,
    reader: SourceReader,
    report: ExecutionReport,
    device: torch.device,
) -> _Unwritten:
    """The node's tensor from the cache, or its merge started; its key recorded."""
    early_key = _key_before_compute(node, target, reader, allocation)
    tensor = _from_cache(node, reader.cache, early_key) if early_key is not None else None
    if tensor is not None:
        merging, outcome = _Merging.of(tensor), "reused"
    else:
        merging = _compute(node, target, reader, report, allocation, device)
        outcome = "copied" if node.action == "copy" else "computed"
    reader.release()
    inputs = _input_digests(node, reader)
    record = node_record(node, target.method, target.spec.seed, inputs, allocation)
    key = xxhash.xxh3_128_hexdigest(record.encode())
    reader.cache.catalog.record_key(key, record)
    return _Unwritten(node, key, merging, outcome)


@dataclass(frozen=True)
class _Merging:
    """A node's tensor as a method makes it: `merged` is done when the method is, and `finish`
    then turns its result into the output tensor (host memory, output dtype)."""

    merged: Future[torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Merging:
        """A tensor that is already the output tensor."""
        return cls(finished(tensor), _itself)

    def done(self) -> bool:
        return self.merged.done()

    def result(self) -> torch.Tensor:
        """The output tensor, once the method is done (raising what the method raised)."""
        return self.finish(self.merged.result())


@dataclass(frozen=True)
class _Unwritten:
    """A node built (or being finished) and not yet written."""

    node: TensorNode
    key: str
    merging: _Merging
    outcome: Outcome


def _write(
    unwritten: _Unwritten,
    write: Callable[[str, torch.Tensor], TensorDigests],
    report: ExecutionReport,
    on_tensor: Callable[[TensorNode], None] | None,
) -> None:
    node = unwritten.node
    digests = write(node.name, unwritten.merging.result())
    report.results.append(TensorResult(node.name, unwritten.key, digests, unwritten.outcome))
    if on_tensor is not None:
        on_tensor(node)


def _itself(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _input_digests(node: TensorNode, reader: SourceReader) -> tuple[bytes, ...]:
    return tuple(reader.digests(info).content for info in node.inputs)


def _key_before_compute(
    node: TensorNode, target: CompiledTarget, reader: SourceReader, allocation: tuple[Blocks, ...]
) -> str | None:
    """The node's key if its inputs' digests can be had without reading more than HOLD_BYTES."""
    unknown = [info for info in node.inputs if reader.known(info) is None]
    if sum(info.nbytes for info in unknown) > HOLD_BYTES:
        return None
    for info in unknown:
        reader.hold(info)
    return node_key(node, target.method, target.spec.seed, _input_digests(node, reader), allocation)


def _from_cache(node: TensorNode, cache: Cache, key: str) -> torch.Tensor | None:
    """The node's cached output tensor, if its bytes are there and hash as recorded."""
    found = cache.result(key)
    data = cache.read(found) if found is not None else None
    if data is None:
        return None
    expected = math.prod(node.shape) * node.dtype.itemsize
    if len(data) != expected:
        raise AssertionError(f"cached result for {node.name} has {len(data)} bytes, expected {expected}")
    return bytes_to_tensor(bytearray(data), node.dtype, node.shape)


def _compute(
    node: TensorNode,
    target: CompiledTarget,
    reader: SourceReader,
    report: ExecutionReport,
    allocation: tuple[Blocks, ...],
    device: torch.device,
) -> _Merging:
    # Under a budget, a tensor with no expert block taken has a zero delta: it is the base.
    if node.action == "copy" or (allocation and all(blocks == () for blocks in allocation)):
        assert node.base is not None
        tensor = reader.read(node.base)
        return _Merging.of(tensor.to(node.dtype) if node.dtype != tensor.dtype else tensor)
    runs = _allocated_runs(node, target, reader, allocation)
    if runs is not None:
        return _Merging.of(_compute_runs(node, target, reader, report, allocation, runs, device))
    ctx = _Context(node, reader, target.spec.seed, report, allocation, target.method.budgeted, device=device)
    return _start_merge(target, ctx, node.dtype)


def _start_merge(target: CompiledTarget, ctx: _Context, dtype: torch.dtype) -> _Merging:
    """Start the method on `ctx`. Its result is checked, the block statistics gathered on the
    way recorded, and the tensor put in host memory as `dtype` once it is done."""

    def finish(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape != ctx.shape:
            raise AssertionError(f"{target.method.name} returned shape {tuple(tensor.shape)} for {ctx.name}")
        ctx.record_stats()
        return tensor.to(device=_CPU, dtype=dtype)

    return _Merging(target.method.start_merge(ctx), finish)


def _allocated_runs(
    node: TensorNode, target: CompiledTarget, reader: SourceReader, allocation: tuple[Blocks, ...]
) -> list[tuple[int, int]] | None:
    """Under a budget that leaves some blocks of the tensor to no model, and for a method
    whose rows are independent: the runs of blocks [first, end) some model has."""
    if not allocation or any(blocks is None for blocks in allocation) or node.base is None:
        return None
    model_params = [dict(p).__getitem__ for p in node.per_model]
    if not target.method.rows_independent(dict(node.shared).__getitem__, model_params):
        return None
    covered = sorted({b for blocks in allocation for b in blocks})
    if len(covered) == len(reader.grid(node.base).ranges()):
        return None
    runs: list[tuple[int, int]] = []
    for b in covered:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def _compute_runs(
    node: TensorNode,
    target: CompiledTarget,
    reader: SourceReader,
    report: ExecutionReport,
    allocation: tuple[Blocks, ...],
    runs: list[tuple[int, int]],
    device: torch.device,
) -> torch.Tensor:
    """The tensor merged only on the rows of `runs` (blocks some model has): elsewhere every
    delta is zero by the budget, and the result is the base's bits."""
    assert node.base is not None
    stored_base = reader.read_finite(node.base)
    # Each run reads only its own rows of the base, so the result may overwrite them in place.
    merged = stored_base.to(node.dtype)
    out_rows = merged.reshape(merged.shape[0], -1)
    ranges = reader.grid(node.base).ranges()
    for first, end in runs:
        rows = (ranges[first][0], ranges[end - 1][1])
        in_run = tuple(tuple(b for b in blocks or () if first <= b < end) for blocks in allocation)
        ctx = _Context(
            node,
            reader,
            target.spec.seed,
            report,
            in_run,
            False,
            rows=rows,
            stored_base=stored_base,
            device=device,
        )
        run_rows = _start_merge(target, ctx, node.dtype).result()
        out_rows[rows[0] : rows[1]] = run_rows.reshape(rows[1] - rows[0], -1)
    return merged


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` (itself, not a copy, when it is already there)."""
    return tensor if tensor.device == device else tensor.to(device)


def _finite(tensor: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    # A NaN or Inf would spread through every method silently: refuse it.
    if not all_finite(tensor):
        raise _not_finite(info)
    return tensor


def _not_finite(info: TensorInfo) -> InputError:
    return InputError(f"{info.path}: tensor {info.name!r} holds NaN or Inf values")


def _record_stats(
    reader: SourceReader, base_info: TensorInfo, info: TensorInfo, stats: list[tuple[float, float]]
) -> None:
    """Record per-block delta statistics (L2 norm, max |delta|) of `info` against `base_info`
    for budgets (the merge gathers them from the delta it makes anyway, so only the first
    build of an expert pays for them)."""
    expert_digests, base_digests = reader.digests(info), reader.digests(base_info)
    pairs = list(zip(expert_digests.blocks, base_digests.blocks, strict=True))
    reader.cache.catalog.record_block_stats(
        [(e, b, l2, mx) for (e, b), (l2, mx) in zip(pairs, stats, strict=True)]
    )


def index_target(target: CompiledTarget, reader: SourceReader) -> None:
    """Hash every input tensor the catalog does not know and record delta statistics for budgets.

    Reads each unknown (or un-profiled) tensor once; `reader.counters` say how much.
    """
    for node in target.nodes:
        missing = [info for info in node.inputs if reader.known(info) is None]
        if node.action != "merge" or node.base is None or not target.method.budgeted:
            for info in missing:
                reader.hold(info)
            reader.release()
            continue
        base: torch.Tensor | None = None
        for _, info in node.models:
            if info in missing or not _has_stats(reader, node.base, info):
                if base is None:
                    base = reader.read_finite(node.base).to(torch.float32)
                model = reader.read_finite(info).to(torch.float32)
                _record_stats(reader, node.base, info, block_stats(model - base, reader.grid(info)))
        if reader.known(node.base) is None:
            reader.hold(node.base)
        reader.release()


def _has_stats(reader: SourceReader, base_info: TensorInfo, info: TensorInfo) -> bool:
    """Whether the catalog holds statistics for every block of `info` against `base_info`."""
    expert, base = reader.known(info), reader.known(base_info)
    if expert is None or base is None:
        return False
    return all(
        reader.cache.catalog.block_stats(e, b) is not None
        for e, b in zip(expert.blocks, base.blocks, strict=True)
    )
