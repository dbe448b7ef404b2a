"""The generalized task-arithmetic family against an independent statement of DESIGN.md section 5
and against mergekit 0.1.5 itself (with its Bernoulli draws replaced by ours for DARE/DELLA)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from mergebuild import rng
from mergebuild.catalog import BlockGrid
from mergebuild.methods import delta_stats, get_method, task_arithmetic
from mergebuild.methods.base import Scalar
from mergebuild.methods.delta_stats import block_stats
from mergebuild.methods.task_arithmetic import _Finish, _Fold, _Whole

from .conftest import (
    NAME,
    STATS_BLOCK_BYTES,
    FakeContext,
    assert_ulps,
    digest,
    family,
    mergekit_merge,
    run,
    scale_of,
)

#: (consensus, sparsifier, default normalize, default rescale), from DESIGN.md's table.
TABLE = {
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_linear": (False, "random", False, True),
    "dare_ties": (True, "random", False, True),
    "breadcrumbs": (False, "magnitude_outliers", False, False),
    "breadcrumbs_ties": (True, "magnitude_outliers", False, False),
    "della": (True, "della", True, True),
    "della_linear": (False, "della", False, True),
}
DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


def uniforms(i: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The uniforms FakeContext hands to model i."""
    key = rng.stream_key(seed, digest(i), NAME)
    return rng.uniform(key, 0, math.prod(shape)).reshape(shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the max(1, int(density n)) largest |delta|, lowest flat index first among equals."""
    flat = delta.abs().reshape(-1).tolist()
    k = max(1, int(density * len(flat)))
    order = sorted(range(len(flat)), key=lambda j: (-flat[j], j))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the int(gamma n) largest and enough of the smallest to keep int(density n)."""
    flat = delta.abs().reshape(-1).tolist()
    n = len(flat)
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = sorted(range(n), key=lambda j: (flat[j], j))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom : bottom + target]] = True
    return mask.reshape(delta.shape)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability by ascending |delta| rank along dimension 1 (a vector is one row)."""
    mags = delta.abs().double()
    rows = mags.reshape(1, -1) if mags.dim() < 2 else mags
    ranks = rows.argsort(dim=1, stable=True).argsort(dim=1).double()
    length = rows.shape[1]
    spread = ranks / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(delta.shape)


@dataclass
class Case:
    """One merge: per-model weights and densities, and method-wide overrides."""

    weights: list[float]
    densities: list[float]
    shared: dict[str, Scalar] = field(default_factory=dict)
    extra: list[dict[str, Scalar]] | None = None

    def per_model(self) -> list[dict[str, Scalar]]:
        extra = self.extra or [{} for _ in self.weights]
        return [
            {"weight": w, "density": d, **x}
            for w, d, x in zip(self.weights, self.densities, extra, strict=True)
        ]


def reference(method: str, base: torch.Tensor, models: list[torch.Tensor], case: Case) -> torch.Tensor:
    """DESIGN.md section 5, steps 1 to 6, in float64."""
    consensus, sparsifier, normalize, rescale = TABLE[method]
    normalize = bool(case.shared.get("normalize", normalize))
    rescale = bool(case.shared.get("rescale", rescale))
    lam = float(case.shared.get("lambda", 1.0))
    b = base.double()
    weighted = []
    for i, (model, values) in enumerate(zip(models, case.per_model(), strict=True)):
        delta = model.double() - b
        density = float(values["density"])
        if sparsifier is not None and density < 1:
            if sparsifier == "magnitude":
                mask = magnitude_mask(delta, density)
            elif sparsifier == "magnitude_outliers":
                mask = outlier_mask(delta, density, float(values.get("gamma", 0.01)))
            elif sparsifier == "random":
                mask = uniforms(i, tuple(base.shape)) < density
            else:
                probs = della_probabilities(delta, density, float(values.get("epsilon", 0.15)))
                mask = uniforms(i, tuple(base.shape)) < probs
            kept = delta * mask
            before, after = float(delta.abs().sum()), float(kept.abs().sum())
            if rescale and before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
            delta = kept
        weighted.append(delta * float(values["weight"]))
    stacked = torch.stack(weighted)
    weights = torch.tensor([float(v["weight"]) for v in case.per_model()], dtype=torch.float64)
    weights = weights.reshape(-1, *([1] * base.dim()))
    if consensus:
        elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).double()
        agree = stacked.sign() == elected
        mixed = (stacked * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = stacked.sum(dim=0)
        total = float(weights.sum())
        divisor = torch.tensor(total if abs(total) >= 1e-8 else 1.0, dtype=torch.float64)
    if normalize:
        mixed = mixed / divisor
    return b + mixed * lam


CASES = [
    Case([1.0, 0.5, 0.8], [0.5, 0.3, 0.7]),
    Case([1.0, -0.5], [0.2, 0.35], {"normalize": True, "rescale": False, "lambda": 0.6}),
    Case([0.7], [0.4], {"normalize": False, "rescale": True, "lambda": 1.3}),
    Case(
        [0.6, 0.9],
        [0.6, 0.45],
        {"lambda": 0.8},
        [{"gamma": 0.1, "epsilon": 0.1}, {"gamma": 0.0, "epsilon": 0.3}],
    ),
]


def case_params(method: str, case: Case) -> tuple[dict[str, Scalar], list[dict[str, Scalar]]]:
    """The case's parameters, keeping only those `method` declares."""
    from mergebuild.methods import get_method

    known = {p.name for p in get_method(method).params}
    per_model = [{k: v for k, v in p.items() if k in known} for p in case.per_model()]
    return dict(case.shared), per_model


def mergekit_params(method: str, case: Case) -> dict[str, object]:
    """The same parameters in mergekit's form (per-input lists in model order)."""
    shared, per_model = case_params(method, case)
    params: dict[str, object] = dict(shared)
    for key in per_model[0]:
        params[key] = [p[key] for p in per_model]
    return params


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("method", sorted(TABLE))
def test_matches_design_formula(shape: tuple[int, ...], method: str, case: int) -> None:
    base, models = family(shape, len(CASES[case].weights), seed=case)
    shared, per_model = case_params(method, CASES[case])
    out = run(method, base, models, shared, per_model)
    expected = reference(method, base, models, CASES[case])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_matches_mergekit(shape: tuple[int, ...], method: str, case: int) -> None:
    base, models = family(shape, len(CASES[case].weights), seed=case)
    shared, per_model = case_params(method, CASES[case])
    out = run(method, base, models, shared, per_model)
    oracle = mergekit_merge(method, [base, *models], mergekit_params(method, CASES[case]), base_index=0)
    # Random normal deltas have no ties in |delta|, so no element is exempt.
    assert_ulps(out, oracle, scale_of(base, *models))


@pytest.fixture
def bernoulli_from_our_uniforms(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """Make torch.bernoulli draw `uniform < p` from a queue of uniforms (one per call).

    mergekit's DARE and DELLA call torch.bernoulli once per model, in model
    order; feeding it FakeContext's uniforms turns them into deterministic
    oracles for the same masks.
    """
    queue: list[torch.Tensor] = []

    def fake(probs: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        u = queue.pop(0)
        return (u.reshape(probs.shape) < probs).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake)
    yield queue
    assert not queue, "mergekit drew fewer masks than expected"


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_match_mergekit_with_the_same_draws(
    shape: tuple[int, ...], method: str, case: int, bernoulli_from_our_uniforms: list[torch.Tensor]
) -> None:
    base, models = family(shape, len(CASES[case].weights), seed=case)
    shared, per_model = case_params(method, CASES[case])
    out = run(method, base, models, shared, per_model)
    bernoulli_from_our_uniforms.extend(
        uniforms(i, shape) for i, p in enumerate(per_model) if float(p["density"]) < 1
    )
    oracle = mergekit_merge(method, [base, *models], mergekit_params(method, CASES[case]), base_index=0)
    assert_ulps(out, oracle, scale_of(base, *models))


def tie_positions(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Elements whose |delta| equals that of a kept and of a dropped element (the threshold)."""
    mags = delta.abs()
    kept, dropped = mags[mask], mags[~mask]
    boundary = [v for v in kept.unique().tolist() if (dropped == v).any()]
    return torch.isin(mags, torch.tensor(boundary, dtype=mags.dtype))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_ties_differ_from_mergekit_only_at_the_threshold(method: str) -> None:
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(10, 12, generator=gen) * 0.02
    # Deltas on a coarse grid: many elements share each magnitude.
    steps = [torch.randint(-4, 5, (10, 12), generator=gen).float() * 0.001 for _ in range(2)]
    models = [base + s for s in steps]
    per_model = [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.55}]
    if method != "ties":
        per_model = [{**p, "gamma": 0.05} for p in per_model]
    out = run(method, base, models, {}, per_model)
    params = {k: [p[k] for p in per_model] for k in per_model[0]}
    oracle = mergekit_merge(method, [base, *models], params, base_index=0)

    exempt = torch.zeros(base.shape, dtype=torch.bool)
    for model, p in zip(models, per_model, strict=True):
        delta = (model - base).double()
        if method == "ties":
            mask = magnitude_mask(delta, p["density"])
        else:
            mask = outlier_mask(delta, p["density"], p["gamma"])
        exempt |= tie_positions(delta, mask)
    assert exempt.any(), "the grid should produce threshold ties"
    assert_ulps(out[~exempt], oracle[~exempt], scale_of(base, *models))


@pytest.mark.parametrize("method", sorted(TABLE))
def test_zero_deltas_give_the_base(method: str) -> None:
    base, _ = family((6, 5), 0)
    per_model = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    out = run(method, base, [base.clone(), base.clone()], {}, per_model)
    assert torch.equal(out, base)


@pytest.mark.parametrize("method", sorted(TABLE))
def test_base_alone_is_the_base(method: str) -> None:
    base, _ = family((4,), 0)
    assert torch.equal(run(method, base, []), base)


@pytest.mark.parametrize("method", ["task_arithmetic", "breadcrumbs", "dare_linear", "della_linear"])
def test_linear_members_do_not_normalize_weights_summing_to_zero(method: str) -> None:
    base, models = family((5, 5), 2)
    per_model = [{"weight": 1.0}, {"weight": -1.0}]
    out = run(method, base, models, {"normalize": True}, per_model)
    # The divisor falls back to 1, so this is the plain difference of the deltas.
    assert_ulps(out, base + (models[0] - base) - (models[1] - base), scale_of(base, *models))


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_are_deterministic_and_seeded(method: str) -> None:
    base, models = family((16, 16), 2)
    per_model = [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    first = run(method, base, models, {}, per_model)
    again = run(method, base, models, {}, per_model)
    assert first.numpy().tobytes() == again.numpy().tobytes()
    other_seed = run(method, base, models, {}, per_model, seed=1)
    assert not torch.equal(first, other_seed)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_kept_fraction_is_near_density(method: str, density: float) -> None:
    base, (model,) = family((64, 64), 1)
    per_model = [{"weight": 1.0, "density": density}]
    if method == "della_linear":
        per_model[0]["epsilon"] = min(density, 1 - density) / 2
    out = run(method, base, [model], {"rescale": False}, per_model)
    n = base.numel()
    fraction = float((out != base).sum()) / n
    assert abs(fraction - density) < 5 * math.sqrt(density * (1 - density) / n)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_ties_at_density_one_is_ties(normalize: bool, rescale: bool) -> None:
    base, models = family((9, 7), 3)
    shared = {"normalize": normalize, "rescale": rescale}
    per_model = [{"weight": w, "density": 1.0} for w in (1.0, 0.4, 0.8)]
    assert torch.equal(
        run("dare_ties", base, models, shared, per_model),
        run("ties", base, models, shared, per_model),
    )
    della = run("della", base, models, shared, per_model)
    assert torch.equal(della, run("ties", base, models, shared, per_model))


def test_dare_linear_at_density_one_is_task_arithmetic() -> None:
    base, models = family((9, 7), 3)
    per_model = [{"weight": w, "density": 1.0} for w in (1.0, 0.4, 0.8)]
    for shared in ({}, {"normalize": True, "lambda": 0.5}):
        assert torch.equal(
            run("dare_linear", base, models, shared, per_model),
            run("task_arithmetic", base, models, shared, per_model),
        )
        assert torch.equal(
            run("della_linear", base, models, shared, per_model),
            run("task_arithmetic", base, models, shared, per_model),
        )


def test_lambda_scales_the_merged_delta() -> None:
    base, models = family((8, 8), 2)
    per_model = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    plain = run("ties", base, models, {}, per_model)
    scaled = run("ties", base, models, {"lambda": 2.5}, per_model)
    assert_ulps(scaled - base, 2.5 * (plain - base), scale_of(base, *models), ulps=16)


def test_della_refuses_probabilities_outside_the_unit_interval() -> None:
    from mergebuild.methods import get_method

    method = get_method("della")
    shared = {"normalize": True, "rescale": True, "lambda": 1.0, "int8_mask": False}
    bad = [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}]
    assert method.check_params(shared, bad) is not None
    good = [{"weight": 1.0, "density": 0.5, "epsilon": 0.15}]
    assert method.check_params(shared, good) is None


def _weighted(delta: torch.Tensor, weight: float) -> _Whole:
    """`delta * weight` as the fold takes a model: the delta is `delta - 0` exactly."""
    return _Whole(delta, torch.zeros_like(delta), torch.tensor(weight, dtype=torch.float32), None)


def _finish(like: torch.Tensor, normalize: bool) -> _Finish:
    """No lambda and a zero base: the merged tensor is the mix (divided by the kept weights)."""
    return _Finish(normalize, torch.ones(()), None, torch.zeros_like(like))


def _fold_all(fold: _Fold, weights: list[float], deltas: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    last = len(weights) - 1
    for i, (w, d) in enumerate(zip(weights, deltas, strict=True)):
        fold.add([(i, _weighted(d, w))], _finish(d, normalize) if i == last else None)
    return fold.result()


def _consensus_by_definition(
    weights: list[float], deltas: list[torch.Tensor], normalize: bool
) -> torch.Tensor:
    """Zeros plus each model's part, in model order; the side elected by the sign of the
    positive plus the negative sum, divided by the weights of the models on that side,
    summed in model order (0 counting as 1)."""
    pos, neg, pos_weight, neg_weight = (torch.zeros_like(deltas[0]) for _ in range(4))
    for w, d in zip(weights, deltas, strict=True):
        weight = torch.tensor(w, dtype=torch.float32)
        weighted = d * weight
        pos += torch.where(weighted > 0, weighted, 0.0)
        neg += torch.where(weighted < 0, weighted, 0.0)
        pos_weight = torch.where(weighted > 0, pos_weight + weight, pos_weight)
        neg_weight = torch.where(weighted < 0, neg_weight + weight, neg_weight)
    elected = pos + neg >= 0
    mixed = torch.where(elected, pos, neg)
    if normalize:
        kept = torch.where(elected, pos_weight, neg_weight)
        mixed = mixed / torch.where(kept == 0, 1.0, kept)
    return mixed + 0.0


@pytest.mark.parametrize("models", [1, 5, 9, 16])
def test_consensus_weight_bit_sets_give_the_float_sums_bit_for_bit(models: int) -> None:
    g = torch.Generator().manual_seed(models)
    weights = [float(w) for w in torch.randn(models, generator=g)]
    deltas = [
        torch.randn(300, generator=g).masked_fill_(torch.rand(300, generator=g) < 0.3, 0) for _ in weights
    ]
    expected = _consensus_by_definition(weights, deltas, normalize=True)
    for use_bits in (True, False):
        fold = _Fold(consensus=True, weights=weights, track_weights=True)
        fold.use_bits = use_bits
        merged = _fold_all(fold, weights, deltas, normalize=True)
        assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("normalize", [False, True])
def test_consensus_sums_are_the_one_pass_sums_chunk_by_chunk(
    monkeypatch: pytest.MonkeyPatch, normalize: bool
) -> None:
    g = torch.Generator().manual_seed(7)
    weights = [0.7, -0.4, 1.3]
    deltas = [
        torch.randn(5, 61, generator=g).masked_fill_(torch.rand(5, 61, generator=g) < 0.2, 0) for _ in weights
    ]
    expected = _consensus_by_definition(weights, deltas, normalize)
    monkeypatch.setattr(task_arithmetic, "_CLAMP_CHUNK", 7)  # 305 elements: 44 chunks, one partial
    fold = _Fold(consensus=True, weights=weights, track_weights=normalize)
    merged = _fold_all(fold, weights, deltas, normalize)
    assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("method", DETERMINISTIC + RANDOM)
@pytest.mark.parametrize("normalize", [False, True])
def test_an_omitted_model_is_skipped_with_the_same_bits(method: str, normalize: bool) -> None:
    class Omitting(FakeContext):
        def omitted(self, i: int) -> bool:
            return i == 1

    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 96, generator=g)
    models = [base + 0.01 * torch.randn(64, 96, generator=g) for _ in range(3)]
    models[1] = base.clone()  # what a budget hands a method for an unread expert
    per_model = [{"weight": w, "density": 0.6} for w in (0.7, -0.4, 0.5)]
    shared = {"normalize": normalize}
    impl = get_method(method)
    skipped = impl.merge(Omitting(impl, base, models, shared, per_model))
    computed = impl.merge(FakeContext(impl, base, models, shared, per_model))
    assert torch.equal(skipped.view(torch.int32), computed.view(torch.int32))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "della"])
def test_a_merge_feeds_each_models_whole_delta_to_its_block_statistics(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # Pieces and fold chunks far smaller than the tensor: the statistics come in many chunks.
    monkeypatch.setattr(delta_stats, "STATS_PIECE", 128)
    monkeypatch.setattr(task_arithmetic, "_CLAMP_CHUNK", 256)
    g = torch.Generator().manual_seed(12)
    base = torch.randn(70, 40, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(70, 40, generator=g)).to(torch.bfloat16) for _ in range(3)]
    per_model = [{"weight": w, "density": 0.5} for w in (0.7, -0.4, 0.5)]
    impl = get_method(method)
    ctx = FakeContext(impl, base, models, {}, per_model)

    impl.merge(ctx)

    grid = BlockGrid.for_shape(ctx.shape, STATS_BLOCK_BYTES)
    assert len(grid.ranges()) > 1
    assert sorted(ctx.stats) == [0, 1, 2]
    for i, model in enumerate(models):
        assert ctx.stats[i].result() == block_stats(model.float() - base.float(), grid)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "task_arithmetic"])
def test_models_waiting_for_the_fold_do_not_change_the_bits(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # A small tensor lets two models wait for the fold; with no room, one waits at a time.
    g = torch.Generator().manual_seed(13)
    base = torch.randn(48, 80, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(48, 80, generator=g)).to(torch.bfloat16) for _ in range(5)]
    per_model = [{"weight": w, "density": 0.5} for w in (0.7, -0.4, 0.5, 0.2, 1.1)]
    impl = get_method(method)
    assert task_arithmetic._folds_ahead(base.numel()) == 2
    queued = impl.merge(FakeContext(impl, base, models, {}, per_model))
    monkeypatch.setattr(task_arithmetic, "_FOLD_QUEUE_BYTES", 0)
    assert task_arithmetic._folds_ahead(base.numel()) == 1
    one_at_a_time = impl.merge(FakeContext(impl, base, models, {}, per_model))
    assert torch.equal(queued.view(torch.int32), one_at_a_time.view(torch.int32))


def test_a_large_tensor_waits_for_one_fold_at_a_time() -> None:
    assert task_arithmetic._folds_ahead(task_arithmetic._FOLD_QUEUE_BYTES // 3) == 2
    assert task_arithmetic._folds_ahead(32000 * 1536) == 1  # a 32000 x 1536 embedding


def test_an_error_is_raised_once_every_waiting_fold_has_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small tensors fold models in twos. Model 4 cannot be read while the folds of models 0
    # and 1 and of models 2 and 3 wait, and the first fold fails: its error is raised only
    # after the second fold has ended too.
    class Failing(FakeContext):
        def stored_model(self, i: int) -> torch.Tensor:
            if i == 4:
                raise OSError("model 4 cannot be read")
            return super().stored_model(i)

    ended: list[list[int]] = []
    add = _Fold.add

    def slow_add(self: _Fold, group: list[tuple[int, object]], *args: object) -> None:
        time.sleep(0.2)  # still folding when model 4 fails
        if group[0][0] == 0:
            raise RuntimeError("fold 0 failed")
        add(self, group, *args)  # type: ignore[arg-type]
        ended.append([i for i, _ in group])

    monkeypatch.setattr(_Fold, "add", slow_add)
    base, models, per_model = _close_models(seed=14, count=6)
    impl = get_method("ties")
    with pytest.raises(RuntimeError, match="fold 0 failed") as raised:
        impl.merge(Failing(impl, base, models, {}, per_model))
    assert isinstance(raised.value.__context__, OSError)
    assert ended == [[2, 3]]


def test_small_tensors_fold_models_in_twos_and_large_ones_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    groups: list[list[int]] = []
    add = _Fold.add

    def recorded(self: _Fold, group: list[tuple[int, object]], *args: object) -> None:
        groups.append([i for i, _ in group])
        add(self, group, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_Fold, "add", recorded)
    base, models, per_model = _close_models(seed=16, count=5)
    impl = get_method("ties")
    merged = impl.merge(FakeContext(impl, base, models, {}, per_model))
    assert groups == [[0, 1], [2, 3], [4]]
    monkeypatch.setattr(task_arithmetic, "_FOLD_QUEUE_BYTES", 30)
    groups.clear()
    assert torch.equal(impl.merge(FakeContext(impl, base, models, {}, per_model)), merged)
    assert groups == [[0], [1], [2], [3], [4]]


@pytest.mark.parametrize("fold_queue_bytes", [task_arithmetic._FOLD_QUEUE_BYTES, 30])
def test_start_merge_returns_before_the_last_fold_ends_only_for_a_small_tensor(
    monkeypatch: pytest.MonkeyPatch, fold_queue_bytes: int
) -> None:
    monkeypatch.setattr(task_arithmetic, "_FOLD_QUEUE_BYTES", fold_queue_bytes)
    add = _Fold.add

    def slow_finish(self: _Fold, group: object, finish: object = None) -> None:
        if finish is not None:
            time.sleep(0.3)
        add(self, group, finish)  # type: ignore[arg-type]

    monkeypatch.setattr(_Fold, "add", slow_finish)
    base, models, per_model = _close_models(seed=15, count=3)
    impl = get_method("ties")
    merged = impl.start_merge(FakeContext(impl, base, models, {}, per_model))
    # 16 x 24 elements: two models' sparse deltas fit in the default queue, not in 30 bytes.
    assert merged.done() == (fold_queue_bytes == 30)
    assert torch.equal(merged.result(), impl.merge(FakeContext(impl, base, models, {}, per_model)))


def _close_models(seed: int, count: int) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[str, Scalar]]]:
    """A 16 x 24 base, `count` models near it, and ties parameters (weight 0.5, density 0.5)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 24, generator=g)
    models = [base + 0.01 * torch.randn(16, 24, generator=g) for _ in range(count)]
    return base, models, [{"weight": 0.5, "density": 0.5} for _ in models]
