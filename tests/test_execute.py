"""The executor's settings and its read-ahead threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebuild import execute
from mergebuild.build import BuildOptions, build
from mergebuild.cache import Cache
from mergebuild.catalog import FileStat
from mergebuild.errors import InputError
from mergebuild.execute import (
    READ_AHEAD_BYTES,
    ReadAhead,
    ReadItem,
    ReadJob,
    _read_hashed,
    read_ahead_bytes,
)
from mergebuild.methods.base import TensorContext, finished
from mergebuild.methods.task_arithmetic import TaskArithmeticFamily, _Fold
from mergebuild.safetensors_io import SafetensorsFile, TensorInfo, bytes_to_tensor
from tests.conftest import write_spec
from tests.families import Family
from tests.test_build import load_dir, options, ties_spec


def test_read_ahead_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGEBUILD_READ_AHEAD", raising=False)
    assert read_ahead_bytes() == READ_AHEAD_BYTES
    monkeypatch.setenv("MERGEBUILD_READ_AHEAD", "64MiB")
    assert read_ahead_bytes() == 64 * 2**20
    monkeypatch.setenv("MERGEBUILD_READ_AHEAD", "lots")
    with pytest.raises(InputError, match="MERGEBUILD_READ_AHEAD: not a size"):
        read_ahead_bytes()


def _source(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    """`tensors` saved to one safetensors file; their infos in the given order."""
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    infos = SafetensorsFile.open(path).tensors
    return [infos[name] for name in tensors]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {f"t{k}": torch.randn(40 + 7 * k, 24, generator=g).to(torch.bfloat16) for k in range(7)}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("max_bytes", [1, 4096, 1 << 30])
def test_read_ahead_hands_over_every_read_in_any_order(tmp_path: Path, threads: int, max_bytes: int) -> None:
    tensors = _tensors()
    infos = _source(tmp_path, tensors)
    # Three nodes; within each the executor takes its reads in reverse plan order.
    jobs: list[list[ReadJob]] = [[(i, None) for i in infos[a:b]] for a, b in ((0, 3), (3, 4), (4, 7))]
    read_ahead = ReadAhead(jobs, 1024, max_bytes, threads=threads)
    try:
        for index, node_jobs in enumerate(jobs):
            for info, _ in reversed(node_jobs):
                item = read_ahead.take(index, info)
                assert item is not None
                buf, digests, before, after, finite = item
                assert torch.equal(bytes_to_tensor(buf, info.torch_dtype, info.shape), tensors[info.name])
                assert digests == _read_hashed(info, 1024)[1]
                assert before == after == FileStat.of(info.path)
                assert finite
                assert read_ahead.take(index, info) is None  # a second read of it is not planned
            read_ahead.done(index)
    finally:
        read_ahead.close()


def test_read_ahead_holds_no_more_than_its_cap_and_skips_finished_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    infos = _source(tmp_path, _tensors())
    started: list[str] = []
    real = execute._read_hashed

    def counted(info: TensorInfo, block_size: int) -> ReadItem:
        started.append(info.name)
        return real(info, block_size)

    monkeypatch.setattr(execute, "_read_hashed", counted)
    jobs: list[list[ReadJob]] = [[(infos[0], None)], [(infos[1], None), (infos[2], None)], [(infos[3], None)]]
    # A cap below one tensor: a read starts only when nothing is held.
    read_ahead = ReadAhead(jobs, 1024, 1, threads=3)
    try:
        time.sleep(0.2)  # room for the threads to overstep the cap, if they would
        assert started == ["t0"]
        assert read_ahead.take(0, infos[0]) is not None
        read_ahead.done(0)
        # Node 1 came from the cache: what was read for it is dropped, the rest is skipped.
        # (t1 may have started once t0 was taken; t2 cannot start while t1 is held.)
        read_ahead.done(1)
        assert read_ahead.take(2, infos[3]) is not None
        assert started in (["t0", "t3"], ["t0", "t1", "t3"])
    finally:
        read_ahead.close()


def test_a_failed_read_ahead_reaches_the_executor(tmp_path: Path) -> None:
    infos = _source(tmp_path, _tensors())
    gone = infos[2]
    gone.path.rename(tmp_path / "elsewhere.safetensors")
    read_ahead = ReadAhead([[(gone, None)], [(infos[3], None)]], 1024, 1 << 30, threads=2)
    try:
        with pytest.raises(InputError, match="cannot open"):
            read_ahead.take(1, infos[3])
    finally:
        read_ahead.close()


def test_the_next_tensor_starts_while_the_last_fold_finishes_the_previous(
    tmp_path: Path, llama: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ties finishes a tensor on the fold thread (`Method.start_merge`): the executor starts
    the next tensor meanwhile, and writes each one once it is done, as merging one tensor at a
    time would."""
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    next_started = threading.Event()
    overlapped: list[bool] = []
    first_tensor: list[str] = []
    add, weighted_delta = _Fold.add, TaskArithmeticFamily.weighted_delta

    def slow_last_fold(self: _Fold, group: object, finish: object = None) -> None:
        if finish is not None and not overlapped:
            # The first tensor's last fold waits until a later tensor's first delta is made.
            overlapped.append(next_started.wait(timeout=10))
        add(self, group, finish)  # type: ignore[arg-type]

    def watched(self: TaskArithmeticFamily, ctx: TensorContext, i: int, *args: object) -> object:
        if not first_tensor:
            first_tensor.append(ctx.name)
        elif ctx.name != first_tensor[0]:
            next_started.set()
        return weighted_delta(self, ctx, i, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_Fold, "add", slow_last_fold)
    monkeypatch.setattr(TaskArithmeticFamily, "weighted_delta", watched)
    build(spec, options(tmp_path))
    assert overlapped == [True]
    monkeypatch.undo()

    start_merge = TaskArithmeticFamily.start_merge

    def one_at_a_time(self: TaskArithmeticFamily, ctx: TensorContext) -> Future[torch.Tensor]:
        return finished(start_merge(self, ctx).result())

    monkeypatch.setattr(TaskArithmeticFamily, "start_merge", one_at_a_time)
    spec = write_spec(tmp_path / "t.json", ties_spec(llama, tmp_path / "sequential"))
    build(spec, BuildOptions(cache_dir=tmp_path / "cache2"))
    merged, sequential = load_dir(tmp_path / "out"), load_dir(tmp_path / "sequential")
    assert merged.keys() == sequential.keys()
    assert all(torch.equal(merged[name], sequential[name]) for name in merged)


def test_a_failed_fold_of_a_tensor_being_finished_fails_the_build(
    tmp_path: Path, llama: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    finishes: list[int] = []
    add = _Fold.add

    def failing_finish(self: _Fold, group: object, finish: object = None) -> None:
        if finish is not None:
            finishes.append(len(finishes))
            if len(finishes) == 3:
                raise RuntimeError("the third tensor's last fold failed")
        add(self, group, finish)  # type: ignore[arg-type]

    monkeypatch.setattr(_Fold, "add", failing_finish)
    with pytest.raises(RuntimeError, match="third tensor's last fold failed"):
        build(spec, options(tmp_path))
    assert not (tmp_path / "out").exists()


def test_the_read_ahead_checks_values_are_finite_and_the_merge_trusts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = _tensors()
    tensors["t1"][3, 4] = float("inf")
    infos = _source(tmp_path, tensors)
    assert [_read_hashed(info, 1024)[4] for info in infos[:3]] == [True, False, True]
    # The read-ahead checked both tensors; the thread that merges checks neither again.
    checked: list[str] = []
    real = execute.all_finite

    def counted(tensor: torch.Tensor) -> bool:
        checked.append(threading.current_thread().name)
        return real(tensor)

    monkeypatch.setattr(execute, "all_finite", counted)
    reader = execute.SourceReader(Cache(tmp_path / "cache"), 1024)
    reader.read_ahead = ReadAhead([[(infos[0], None), (infos[1], None)]], 1024, 1 << 30)
    try:
        assert torch.equal(reader.read_finite(infos[0]), tensors["t0"])
        with pytest.raises(InputError, match="tensor 't1' holds NaN or Inf"):
            reader.read_finite(infos[1])
    finally:
        reader.read_ahead.close()
    assert len(checked) == 2 and "MainThread" not in checked
