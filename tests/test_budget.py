"""Budgeted merges (issue 4): read only the most valuable expert blocks, never more than the budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergebuild.build import BuildOptions, build, index, plan
from mergebuild.cache import Cache
from mergebuild.catalog import BlockGrid
from mergebuild.errors import InputError
from mergebuild.lockfile import lock_path
from mergebuild.methods.delta_stats import block_stats
from mergebuild.sources import ModelSource
from tests.conftest import write_spec
from tests.families import Family, make_llama_family

BLOCK = "4KiB"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_llama_family(tmp_path_factory.mktemp("budget"), num_experts=3, hidden_size=128, num_layers=3)


def _spec(path: Path, family: Family, method: str, budget: dict | None, dtype: str = "bfloat16") -> Path:
    params = {"density": 0.5} if method != "task_arithmetic" else {}
    spec: dict = {
        "method": method,
        "base": str(family.base),
        "models": [
            {"path": str(p), "parameters": {"weight": w, **params}}
            for p, w in zip(family.experts, (1.0, 0.5, 0.8), strict=True)
        ],
        "block_size": BLOCK,
        "dtype": dtype,
        "output": str(path.parent / f"out-{path.stem}"),
    }
    if budget is not None:
        spec["budget"] = budget
    return write_spec(path, spec)


def _digests(spec: Path) -> dict[str, str]:
    lock = json.loads(lock_path(spec).read_text())
    return {n: t["digest"] for n, t in lock["targets"]["default"]["tensors"].items()}


def _load(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture()
def indexed(tmp_path: Path, family: Family) -> Path:
    """A cache whose catalog knows the family (digests and delta statistics) from a full build."""
    cache = tmp_path / "cache"
    build(
        _spec(tmp_path / "full.json", family, "task_arithmetic", None, "float32"),
        BuildOptions(cache_dir=cache),
    )
    return cache


def test_catalog_keeps_block_delta_statistics(tmp_path: Path, family: Family, indexed: Path) -> None:
    base = ModelSource.open(family.base)
    expert = ModelSource.open(family.experts[1])
    name = "model.layers.1.mlp.down_proj.weight"
    b_info, e_info = base.tensors[name], expert.tensors[name]
    grid = BlockGrid.for_shape(e_info.shape, 4096)
    delta = load_file(e_info.path)[name].float() - load_file(b_info.path)[name].float()
    expected = block_stats(delta, grid)
    cache = Cache(indexed)
    try:
        [status] = plan(_spec(tmp_path / "b.json", family, "task_arithmetic", {"fraction": 0.5}),
                        BuildOptions(cache_dir=indexed))  # fmt: skip
        assert status.plan.budget is not None and status.plan.budget.blocks_without_stats == 0
        from mergebuild.plan import DigestLookup

        known = DigestLookup(cache, 4096)
        e_digests, b_digests = known(e_info), known(b_info)
        assert e_digests is not None and b_digests is not None and len(expected) > 1
        for i, (l2, max_abs) in enumerate(expected):
            got = cache.catalog.block_stats(e_digests.blocks[i], b_digests.blocks[i])
            assert got is not None
            assert got[0] == pytest.approx(l2, rel=1e-5) and got[1] == pytest.approx(max_abs, rel=1e-6)
    finally:
        cache.close()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_full_budget_is_the_unbudgeted_build(
    tmp_path: Path, family: Family, indexed: Path, method: str
) -> None:
    full = _spec(tmp_path / "full.json", family, method, None)
    budgeted = _spec(tmp_path / "all.json", family, method, {"fraction": 1.0})
    build(full, BuildOptions(cache_dir=indexed))
    summary = build(budgeted, BuildOptions(cache_dir=tmp_path / "other-cache-would-not-know"))
    assert _digests(full) == _digests(budgeted)
    # A budget that fits everything needs no statistics: the full read, nothing omitted.
    assert summary.targets[0].bound == 0.0


def test_budget_bound_covers_the_measured_deviation(tmp_path: Path, family: Family, indexed: Path) -> None:
    full = _spec(tmp_path / "full.json", family, "task_arithmetic", None, "float32")
    build(full, BuildOptions(cache_dir=indexed))
    reference = _load(tmp_path / "out-full")
    base = _load(family.base)
    previous = 0.0
    for fraction in (0.75, 0.5, 0.25, 0.1):
        spec = _spec(
            tmp_path / f"b{int(fraction * 100)}.json",
            family,
            "task_arithmetic",
            {"fraction": fraction},
            "float32",
        )
        target = build(spec, BuildOptions(cache_dir=indexed)).targets[0]
        assert target.bound is not None and target.allocated_bytes is not None
        assert target.allocated_bytes <= target.budget_bytes
        out = _load(tmp_path / f"out-{spec.stem}")
        deviation = torch.sqrt(sum(((out[n].double() - reference[n].double()) ** 2).sum() for n in out))
        update = torch.sqrt(sum(((reference[n].double() - base[n].double()) ** 2).sum() for n in out))
        # Triangle inequality: the omitted update is at most the sum of omitted block norms.
        assert float(deviation) <= target.bound * (1 + 1e-4) + 1e-6
        assert 0 < float(deviation) / float(update) < 1
        assert target.bound >= previous  # a smaller budget omits more
        previous = target.bound


def _allocated(spec: Path, cache: Path, family: Family) -> dict[tuple[int, str, int], int]:
    """(model, tensor, block) -> bytes, for every expert block the plan of `spec` reads."""
    [status] = plan(spec, BuildOptions(cache_dir=cache))
    experts = [ModelSource.open(p) for p in family.experts]
    blocks = {}
    for node in status.plan.nodes:
        for m, chosen in enumerate(node.allocation):
            info = experts[m].tensors[node.name]
            ranges = BlockGrid.for_shape(info.shape, 4096).ranges()
            for b in range(len(ranges)) if chosen is None else chosen:
                blocks[(m, node.name, b)] = (ranges[b][1] - ranges[b][0]) * info.row_bytes
    return blocks


def test_raising_the_budget_reads_only_new_blocks(tmp_path: Path, family: Family, indexed: Path) -> None:
    spec = _spec(tmp_path / "b.json", family, "ties", {"fraction": 0.25})
    low = _allocated(spec, indexed, family)
    first = build(spec, BuildOptions(cache_dir=indexed)).targets[0]
    assert first.expert_bytes_read == sum(low.values()) and 0 < first.expert_bytes_read <= first.budget_bytes
    _spec(spec, family, "ties", {"fraction": 0.5})
    high = _allocated(spec, indexed, family)
    second = build(spec, BuildOptions(cache_dir=indexed)).targets[0]
    # Blocks the first build read come from the cache: only the new ones are read from disk.
    assert second.expert_bytes_read == sum(n for key, n in high.items() if key not in low)
    assert 0 < second.expert_bytes_read < sum(high.values())


def test_locked_replays_the_allocation(tmp_path: Path, family: Family, indexed: Path) -> None:
    spec = _spec(tmp_path / "b.json", family, "ties", {"fraction": 0.3})
    build(spec, BuildOptions(cache_dir=indexed))
    expected = _digests(spec)
    lock = json.loads(lock_path(spec).read_text())
    allocation = lock["targets"]["default"]["plan"]["allocation"]
    assert len(allocation) == 3 and all(":" in v for v in allocation.values())
    # Statistics gone (another machine's catalog): a fresh plan would differ; --locked replays.
    cache = Cache(indexed)
    with cache.catalog.transaction() as db:
        db.execute("DELETE FROM stats")
        db.execute("DELETE FROM results")
    cache.close()
    (tmp_path / "out-b" / "model.safetensors").unlink(missing_ok=True)
    for f in (tmp_path / "out-b").glob("*.safetensors"):
        f.unlink()
    build(spec, BuildOptions(cache_dir=indexed, locked=True))
    assert _digests(spec) == expected


def test_budget_sweep_targets_share_reads(tmp_path: Path, family: Family, indexed: Path) -> None:
    targets = {}
    for fraction in (0.2, 0.4):
        one = json.loads(
            _spec(tmp_path / f"t{fraction}.json", family, "ties", {"fraction": fraction}).read_text()
        )
        targets[f"f{fraction}"] = one
    spec = write_spec(tmp_path / "sweep.json", {"targets": targets})
    summary = build(spec, BuildOptions(cache_dir=indexed))
    small, large = summary.targets
    assert small.budget_bytes is not None and small.expert_bytes_read <= small.budget_bytes
    # The larger budget re-reads nothing the smaller one read: together they read each block once.
    union = _allocated(tmp_path / "t0.2.json", indexed, family) | _allocated(
        tmp_path / "t0.4.json", indexed, family
    )
    assert small.expert_bytes_read + large.expert_bytes_read == sum(union.values())


def test_unknown_experts_need_an_index(tmp_path: Path, family: Family) -> None:
    spec = _spec(tmp_path / "b.json", family, "ties", {"fraction": 0.5})
    with pytest.raises(InputError, match="mergebuild index"):
        build(spec, BuildOptions(cache_dir=tmp_path / "empty"))
    assert index(spec, BuildOptions(cache_dir=tmp_path / "empty")) > 0
    assert index(spec, BuildOptions(cache_dir=tmp_path / "empty")) == 0
    target = build(spec, BuildOptions(cache_dir=tmp_path / "empty")).targets[0]
    assert target.bound is not None and target.expert_bytes_read <= target.budget_bytes


def test_budgeted_rows_are_the_allocated_deltas_or_the_base(
    tmp_path: Path, family: Family, indexed: Path
) -> None:
    """task_arithmetic under a budget: each expert stands for the base outside its allocated
    blocks, and rows no model's block covers are the base's bits (they are not computed)."""
    base, experts = _load(family.base), [_load(p) for p in family.experts]
    partly_covered = 0
    for fraction in (0.1, 0.2, 0.3, 0.45, 0.6):
        spec = _spec(tmp_path / "b.json", family, "task_arithmetic", {"fraction": fraction}, "float32")
        allocated = _allocated(spec, indexed, family)
        build(spec, BuildOptions(cache_dir=indexed))
        partly_covered += _check_budgeted_rows(_load(tmp_path / "out-b"), base, experts, allocated)
    assert partly_covered > 0


def _check_budgeted_rows(
    out: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    allocated: dict[tuple[int, str, int], int],
) -> int:
    """Assert the budgeted task_arithmetic result block by block; return how many tensors
    had some blocks covered and some not."""
    weights = [torch.tensor(w) for w in (1.0, 0.5, 0.8)]
    partly_covered = 0
    for name, merged in out.items():
        ranges = BlockGrid.for_shape(tuple(merged.shape), 4096).ranges()
        b = base[name].float()
        rows = merged.reshape(len(merged) if merged.dim() else 1, -1)
        covered = [any((m, name, i) in allocated for m in range(3)) for i in range(len(ranges))]
        partly_covered += any(covered) and not all(covered)
        for i, (start, end) in enumerate(ranges):
            base_rows = b.reshape(rows.shape)[start:end]
            if not covered[i]:
                assert torch.equal(rows[start:end], base_rows), (name, i)
                continue
            acc = torch.zeros_like(base_rows)
            for m, expert in enumerate(experts):
                if (m, name, i) in allocated:
                    acc += (expert[name].float().reshape(rows.shape)[start:end] - base_rows) * weights[m]
            assert torch.equal(rows[start:end], acc + base_rows), (name, i)
    return partly_covered
