"""Incremental rebuilds (issue 3): a rebuild reads only what changed, and its output is
bit-identical to a build from an empty cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from mergebuild.build import BuildOptions, build, plan
from mergebuild.cache import Cache, Result
from mergebuild.lockfile import lock_path
from mergebuild.summary import TargetSummary
from tests.conftest import write_spec
from tests.families import Family, make_llama_family

SPARSIFYING = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "della"]
FROZEN = "embed_tokens"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 5 experts whose embeddings equal the base's, plus two variants of expert 0."""
    root = tmp_path_factory.mktemp("incremental")
    fam = make_llama_family(root, num_experts=5, unchanged=(FROZEN,), max_shard_size="200KB")
    _variant(fam.experts[0], root / "swap", lambda name, t: t if FROZEN in name else _nudge(t, 1))
    _variant(fam.experts[0], root / "partial", lambda name, t: _nudge(t, 2) if "self_attn" in name else t)
    return fam


def _nudge(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype)


def _variant(src: Path, dst: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """A copy of model `src` with each tensor passed through `change` (same files, same layout)."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({name: change(name, t).contiguous() for name, t in tensors.items()}, f, {"format": "pt"})


def _spec(
    path: Path,
    method: str,
    base: Path,
    experts: list[Path],
    weights: list[float] | None = None,
    **extra: object,
) -> Path:
    weights = weights or [1.0, 0.6, 0.4, 0.8, 0.5, 0.7][: len(experts)]
    params: dict[str, object] = {"density": 0.4} if method != "task_arithmetic" else {}
    if method == "della":
        params["epsilon"] = 0.1
    models = [
        {"path": str(p), "parameters": {"weight": w, **params}} for p, w in zip(experts, weights, strict=True)
    ]
    spec = {
        "method": method,
        "base": str(base),
        "models": models,
        "output": str(path.parent / "out"),
        **extra,
    }
    return write_spec(path, spec)


def _build(spec: Path, cache: Path) -> TargetSummary:
    summary = build(spec, BuildOptions(cache_dir=cache))
    assert len(summary.targets) == 1
    return summary.targets[0]


def _tensor_digests(spec: Path, target: str = "default") -> dict[str, str]:
    lock = json.loads(lock_path(spec).read_text())
    return {name: t["digest"] for name, t in lock["targets"][target]["tensors"].items()}


def _from_scratch(spec: Path, tmp_path: Path) -> dict[str, str]:
    """Output digests of the same spec built elsewhere with an empty cache."""
    clean = tmp_path / "clean"
    clean.mkdir()
    copy = clean / spec.name
    text = json.loads(spec.read_text())
    text["output"] = str(clean / "out")
    copy.write_text(json.dumps(text))
    _build(copy, clean / "cache")
    return _tensor_digests(copy)


def _nbytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def _tensor_bytes(model: Path, match: Callable[[str], bool] = lambda n: True) -> int:
    total = 0
    for f in model.glob("*.safetensors"):
        total += sum(t.numel() * t.element_size() for n, t in load_file(f).items() if match(n))
    return total


def test_first_build_reads_each_input_byte_once(tmp_path: Path, family: Family) -> None:
    spec = _spec(tmp_path / "s.json", "ties", family.base, list(family.experts[:3]))
    summary = _build(spec, tmp_path / "cache")
    inputs = [family.base, *family.experts[:3]]
    assert summary.bytes_read == sum(_tensor_bytes(m) for m in inputs)


def test_null_build_reads_nothing_and_is_up_to_date(tmp_path: Path, family: Family) -> None:
    spec = _spec(tmp_path / "s.json", "ties", family.base, list(family.experts[:3]))
    _build(spec, tmp_path / "cache")
    lock_before = lock_path(spec).read_text()
    again = _build(spec, tmp_path / "cache")
    assert again.up_to_date and again.bytes_read == 0 and again.bytes_written == 0
    assert lock_path(spec).read_text() == lock_before
    # The CLI answers an up-to-date build before importing torch.
    probe = (
        "import sys; from mergebuild.cli import main; sys.argv = ['mergebuild', 'build', sys.argv[1], "
        "'--cache-dir', sys.argv[2], '--json']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(spec), str(tmp_path / "cache")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"][0]["up_to_date"]


def test_touched_source_is_rehashed_not_rebuilt(tmp_path: Path, family: Family) -> None:
    models = tmp_path / "models"
    shutil.copytree(family.experts[1], models / "e1")
    spec = _spec(tmp_path / "s.json", "ties", family.base, [family.experts[0], models / "e1"])
    _build(spec, tmp_path / "cache")
    for f in (models / "e1").glob("*.safetensors"):
        f.touch()
    again = _build(spec, tmp_path / "cache")
    # The file had to be read to learn it is unchanged; nothing was recomputed.
    assert not again.up_to_date and again.tensors_merged == 0 and again.tensors_reused > 0
    assert again.bytes_read == _tensor_bytes(models / "e1")


@pytest.mark.parametrize("method", SPARSIFYING)
def test_swapping_one_expert_reuses_the_others_work(tmp_path: Path, family: Family, method: str) -> None:
    experts = list(family.experts[:4])
    spec = _spec(tmp_path / "s.json", method, family.base, experts)
    _build(spec, tmp_path / "cache")
    experts[0] = family.base.parent / "swap"
    _spec(spec, method, family.base, experts)
    rebuilt = _build(spec, tmp_path / "cache")
    # Reads: the new expert (whole, to hash it) and the base for the tensors that changed;
    # the other three experts' sparsified deltas come from the cache.
    changed = lambda name: FROZEN not in name  # noqa: E731
    assert rebuilt.expert_bytes_read == _tensor_bytes(experts[0])
    assert rebuilt.bytes_read == _tensor_bytes(experts[0]) + _tensor_bytes(family.base, changed)
    assert rebuilt.expert_work_reused >= 3 * rebuilt.tensors_merged
    assert _tensor_digests(spec) == _from_scratch(spec, tmp_path)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_expert_changed_in_some_tensors_recomputes_only_those(
    tmp_path: Path, family: Family, method: str
) -> None:
    experts = list(family.experts[:3])
    spec = _spec(tmp_path / "s.json", method, family.base, experts)
    first = _build(spec, tmp_path / "cache")
    experts[0] = family.base.parent / "partial"
    _spec(spec, method, family.base, experts)
    rebuilt = _build(spec, tmp_path / "cache")
    attention = lambda name: "self_attn" in name  # noqa: E731
    n_attention = sum(1 for f in experts[0].glob("*.safetensors") for n in load_file(f) if attention(n))
    assert rebuilt.tensors_merged == n_attention
    assert rebuilt.tensors_reused == first.tensors_merged + first.tensors_copied - n_attention
    # The new expert is read once (hashing it); the other inputs only for the changed tensors.
    others = [family.base, *experts[1:]] if method == "task_arithmetic" else [family.base]
    expected = _tensor_bytes(experts[0]) + sum(_tensor_bytes(m, attention) for m in others)
    assert rebuilt.bytes_read == expected
    assert _tensor_digests(spec) == _from_scratch(spec, tmp_path)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della"])
def test_coefficient_sweep_reads_no_expert_bytes(tmp_path: Path, family: Family, method: str) -> None:
    experts = list(family.experts[:3])
    spec = _spec(tmp_path / "s.json", method, family.base, experts)
    _build(spec, tmp_path / "cache")
    _spec(spec, method, family.base, experts, weights=[0.3, 0.9, 0.5], parameters={"lambda": 0.8})
    rebuilt = _build(spec, tmp_path / "cache")
    assert rebuilt.expert_bytes_read == 0 and rebuilt.expert_work_computed == 0
    assert rebuilt.bytes_read <= _tensor_bytes(family.base)
    assert _tensor_digests(spec) == _from_scratch(spec, tmp_path)


def test_adding_an_expert_reuses_the_others_work(tmp_path: Path, family: Family) -> None:
    experts = list(family.experts[:3])
    spec = _spec(tmp_path / "s.json", "ties", family.base, experts)
    _build(spec, tmp_path / "cache")
    _spec(spec, "ties", family.base, [*experts, family.experts[3]])
    rebuilt = _build(spec, tmp_path / "cache")
    assert rebuilt.expert_bytes_read == _tensor_bytes(family.experts[3])
    assert rebuilt.expert_work_reused >= 3 * rebuilt.tensors_merged
    assert _tensor_digests(spec) == _from_scratch(spec, tmp_path)


def test_sweep_targets_share_expert_work(tmp_path: Path, family: Family) -> None:
    experts = [str(p) for p in family.experts[:3]]
    targets = {
        f"w{i}": {
            "method": "ties",
            "base": str(family.base),
            "models": [{"path": p, "parameters": {"weight": w, "density": 0.4}} for p in experts],
            "output": str(tmp_path / f"out{i}"),
        }
        for i, w in enumerate((0.5, 1.0, 1.5))
    }
    spec = write_spec(tmp_path / "sweep.json", {"targets": targets})
    summary = build(spec, BuildOptions(cache_dir=tmp_path / "cache"))
    expert_bytes = sum(_tensor_bytes(Path(p)) for p in experts)
    assert sum(t.expert_bytes_read for t in summary.targets) == expert_bytes
    assert summary.targets[1].expert_work_computed == 0 and summary.targets[2].expert_work_computed == 0


def test_corrupt_blobs_are_misses_never_outputs(tmp_path: Path, family: Family) -> None:
    spec = _spec(tmp_path / "s.json", "ties", family.base, list(family.experts[:3]))
    cache_dir = tmp_path / "cache"
    _build(spec, cache_dir)
    expected = _tensor_digests(spec)
    blobs = [p for p in (cache_dir / "blobs").rglob("*") if p.is_file()]
    # Damage every blob: flip a byte in the largest (the adopted output shard), truncate
    # half of the others, delete the rest.
    blobs.sort(key=lambda p: (p.stat().st_size, p.name))
    data = bytearray(blobs[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    blobs[-1].unlink()  # a hard link to the published output: write a fresh inode
    blobs[-1].write_bytes(bytes(data))
    for i, blob in enumerate(blobs[:-1]):
        if i % 2:
            blob.write_bytes(blob.read_bytes()[:-3])
        else:
            blob.unlink()
    shutil.rmtree(tmp_path / "out")
    rebuilt = _build(spec, cache_dir)
    assert rebuilt.bad_blobs >= 2 and rebuilt.tensors_merged > 0
    assert _tensor_digests(spec) == expected


def test_a_blob_that_does_not_hash_as_recorded_is_a_miss(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    try:
        data = bytes(range(256)) * 64
        digest, _ = cache.write_blob([data])
        result = Result(digest, 16, 100, xxhash.xxh3_128_hexdigest(data[16:116]))
        cache.record_results([("k", result)])
        assert cache.read(result) == data[16:116]
        path = tmp_path / "cache" / "blobs" / digest[:2] / digest
        path.write_bytes(data[:50])  # truncated
        assert cache.read(result) is None and cache.events.bad_blobs == [digest]
        assert cache.result("k") is None and not path.exists()
        digest, _ = cache.write_blob([data])
        flipped = bytearray(data)
        flipped[20] ^= 1
        path.write_bytes(bytes(flipped))
        assert cache.read(result) is None and cache.result("k") is None
    finally:
        cache.close()


def test_gc_evicts_least_recently_used(tmp_path: Path, family: Family) -> None:
    spec = _spec(tmp_path / "s.json", "ties", family.base, list(family.experts[:3]))
    cache_dir = tmp_path / "cache"
    _build(spec, cache_dir)
    cache = Cache(cache_dir)
    try:
        total = cache.size()
        dry = cache.gc(total // 2, dry_run=True)
        assert dry.removed > 0 and cache.size() == total
        report = cache.gc(total // 2)
        assert report.kept_bytes <= total // 2 and cache.size() == report.kept_bytes
        on_disk = sum(f.stat().st_size for f in (cache_dir / "blobs").rglob("*") if f.is_file())
        assert on_disk == report.kept_bytes
    finally:
        cache.close()
    # The evicted work is recomputed, identically.
    shutil.rmtree(tmp_path / "out")
    _build(spec, cache_dir)
    assert _tensor_digests(spec) == _from_scratch(spec, tmp_path)


def test_plan_and_explain_say_what_changed(tmp_path: Path, family: Family) -> None:
    experts = list(family.experts[:3])
    spec = _spec(tmp_path / "s.json", "ties", family.base, experts)
    options = BuildOptions(cache_dir=tmp_path / "cache")
    [fresh] = plan(spec, options)
    assert fresh.stale == "no lockfile" and all(n.action == "compute" for n in fresh.plan.nodes)
    _build(spec, tmp_path / "cache")
    [done] = plan(spec, options)
    assert done.stale is None and done.plan.bytes_to_read == 0
    _spec(spec, "ties", family.base, experts, weights=[1.0, 0.2, 0.4])
    [changed] = plan(spec, options)
    node = changed.plan.node("model.layers.0.mlp.up_proj.weight")
    assert node.reasons == ("models.1 parameter weight: 0.6 -> 0.2",)
    assert node.expert_work_reused == 3
    assert {r.source for r in node.reads} == {os.path.relpath(family.base, tmp_path)}
