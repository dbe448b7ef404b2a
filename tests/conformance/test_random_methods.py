"""The random methods (dare_linear, dare_ties, della, della_linear), checked with mergebuild alone.

mergekit draws from torch's global RNG, so its output is not reproducible bit for
bit by design; mergebuild's draws are a pure function of (seed, expert tensor
digest, tensor name, element index) (DESIGN.md section 5). So here: the same seed
gives the same bytes whatever the block size and across fresh runs, another seed
gives other bytes, and the kept fraction is what the density says. Their
density-1 equality with mergekit's deterministic twins is in test_conformance.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conformance.compare import run_build
from tests.families import Family, load_tensors

RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
DENSITY = 0.4
EPSILON = 0.1


def _merge(
    family: Family,
    method: str,
    models: list[tuple[int, dict]],
    output: str,
    *,
    seed: int = 7,
    parameters: dict | None = None,
    block_size: str | None = None,
) -> dict:
    spec = {
        "method": method,
        "base": str(family.base),
        "models": [{"path": str(family.experts[i]), "parameters": p} for i, p in models],
        "parameters": parameters or {},
        "dtype": "float32",
        "seed": seed,
        "output": output,
    }
    if block_size is not None:
        spec["block_size"] = block_size
    return spec


def _experts(method: str) -> list[tuple[int, dict]]:
    extra = {"epsilon": EPSILON} if method.startswith("della") else {}
    return [(i, {"weight": w, "density": DENSITY, **extra}) for i, w in enumerate((1.0, 0.5, 0.8))]


def _targets(family: Family, block_size: str | None) -> dict[str, dict]:
    targets = {}
    for m in RANDOM_METHODS:
        targets[m] = _merge(family, m, _experts(m), f"out/{m}", block_size=block_size)
        targets[f"{m}-seed"] = _merge(family, m, _experts(m), f"out/{m}-seed", seed=8, block_size=block_size)
    for i in (0, 1):
        one = [(i, {"weight": 1.0, "density": 0.3})]
        targets[f"dare-kept-{i}"] = _merge(
            family, "dare_linear", one, f"out/dare-kept-{i}", parameters={"rescale": False}
        )
    one = [(0, {"weight": 1.0, "density": 0.3})]
    targets["dare-rescaled"] = _merge(family, "dare_linear", one, "out/dare-rescaled")
    one_della = [(0, {"weight": 1.0, "density": DENSITY, "epsilon": EPSILON})]
    targets["della-kept"] = _merge(
        family, "della_linear", one_della, "out/della-kept", parameters={"rescale": False}
    )
    return targets


#: Builds, each in its own directory with its own cache, so no result is reused
#: between them: the first build, one with 4 KiB blocks (which cut every matrix into
#: several blocks; rows are 64-128 floats), and a rerun of the first.
BUILDS = {"first": None, "small_blocks": "4KiB", "rerun": None}


@pytest.fixture(scope="module")
def runs(families: dict[str, Family], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build name -> its output root."""
    dirs = {}
    for name, block_size in BUILDS.items():
        where = tmp_path_factory.mktemp(name)
        spec = {"targets": _targets(families["llama32"], block_size)}
        proc = run_build(spec, where / "spec.json", where / "cache")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        dirs[name] = where / "out"
    return dirs


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two output directories hold the same tensors, bit for bit."""
    ta, tb = load_tensors(a), load_tensors(b)
    return set(ta) == set(tb) and all(
        ta[n].dtype == tb[n].dtype
        and ta[n].shape == tb[n].shape
        and ta[n].view(-1).view(torch.uint8).equal(tb[n].view(-1).view(torch.uint8))
        for n in ta
    )


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_block_size_does_not_change_bytes(method: str, runs: dict[str, Path]) -> None:
    for name in (method, f"{method}-seed"):
        assert _same_bytes(runs["first"] / name, runs["small_blocks"] / name), name


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_rerun_gives_identical_files(method: str, runs: dict[str, Path]) -> None:
    for name in (method, f"{method}-seed"):
        assert _shard_bytes(runs["first"] / name), name
        assert _shard_bytes(runs["first"] / name) == _shard_bytes(runs["rerun"] / name), name


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_seed_changes_output(method: str, runs: dict[str, Path]) -> None:
    a = load_tensors(runs["first"] / method)
    b = load_tensors(runs["first"] / f"{method}-seed")
    differing = [n for n in a if not torch.equal(a[n], b[n])]
    # Every tensor has thousands of independent draws, so every one must change.
    assert len(differing) == len(a)


def _kept(
    out: Path, family: Family, expert: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per tensor: the output's delta against the base, and the expert's delta."""
    base = load_tensors(family.base)
    tensors = load_tensors(family.experts[expert])
    merged = load_tensors(out)
    return (
        {n: merged[n] - base[n] for n in base},
        {n: tensors[n] - base[n] for n in base},
    )


@pytest.mark.parametrize("expert", [0, 1])
def test_dare_keeps_density_fraction(expert: int, runs: dict[str, Path], families: dict[str, Family]) -> None:
    out, delta = _kept(runs["first"] / f"dare-kept-{expert}", families["llama32"], expert)
    kept = sum(int((out[n] != 0).sum()) for n in out)
    total = sum(int((delta[n] != 0).sum()) for n in delta)
    # ~165k Bernoulli(0.3) draws: the standard deviation of the fraction is ~0.0011.
    assert abs(kept / total - 0.3) < 0.006
    for n in out:
        # Without rescale the kept entries are the expert's delta itself (up to the
        # float32 round trip through base + delta).
        mask = out[n] != 0
        assert torch.allclose(out[n][mask], delta[n][mask], rtol=1e-5, atol=1e-7), n


def test_experts_draw_independent_masks(runs: dict[str, Path], families: dict[str, Family]) -> None:
    """The draws are keyed by the expert tensor's digest: two experts do not share a mask."""
    out0, _ = _kept(runs["first"] / "dare-kept-0", families["llama32"], 0)
    out1, _ = _kept(runs["first"] / "dare-kept-1", families["llama32"], 1)
    both = sum(int(((out0[n] != 0) & (out1[n] != 0)).sum()) for n in out0)
    total = sum(out0[n].numel() for n in out0)
    # Independent masks overlap on density^2 = 9 % of elements (identical ones on 30 %).
    assert abs(both / total - 0.09) < 0.005


def test_dare_rescale_keeps_l1_norm(runs: dict[str, Path], families: dict[str, Family]) -> None:
    out, delta = _kept(runs["first"] / "dare-rescaled", families["llama32"])
    for n in out:
        before = float(delta[n].abs().sum())
        after = float(out[n].abs().sum())
        assert after == pytest.approx(before, rel=1e-3), n


def test_della_keep_probability_follows_magnitude_rank(
    runs: dict[str, Path], families: dict[str, Family]
) -> None:
    out, delta = _kept(runs["first"] / "della-kept", families["llama32"])
    kept_total = elems = 0
    top_kept = top = bottom_kept = bottom = 0
    for n in out:
        d = delta[n] if delta[n].dim() >= 2 else delta[n].unsqueeze(0)
        o = out[n] if out[n].dim() >= 2 else out[n].unsqueeze(0)
        kept = o != 0
        kept_total += int(kept.sum())
        elems += kept.numel()
        # Rank within each row (dim 1), as DELLA does: upper half vs lower half by |delta|.
        ranks = d.abs().argsort(dim=1).argsort(dim=1)
        upper = ranks >= d.shape[1] // 2
        top_kept += int((kept & upper).sum())
        top += int(upper.sum())
        bottom_kept += int((kept & ~upper).sum())
        bottom += int((~upper).sum())
    # Keep probability runs linearly from density - eps to density + eps over the ranks,
    # so the mean is the density and the halves average density +- eps/2.
    assert abs(kept_total / elems - DENSITY) < 0.01
    assert abs(top_kept / top - (DENSITY + EPSILON / 2)) < 0.015
    assert abs(bottom_kept / bottom - (DENSITY - EPSILON / 2)) < 0.015
