"""What mergekit 0.1.5 does around the merge math, pinned down as tests.

These check the oracle, not mergebuild: they record the behaviours that
mergebuild's parameter resolver and input handling follow (gradient positions,
filter matching, scope fall-through, missing and non-floating tensors, and which
methods count the base as an input), so a mergekit upgrade that changes them
shows up here first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conformance.oracle import mergekit_config, run_mergekit
from tests.families import Family, load_tensors, make_llama_family

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A float32, single-file Llama family, so the weights can be read back exactly."""
    root = tmp_path_factory.mktemp("semantics")
    return make_llama_family(root, 2, seed=5, dtype=torch.float32, max_shard_size=None, num_layers=NUM_LAYERS)


def _effective_weight(out: torch.Tensor, base: torch.Tensor, expert: torch.Tensor) -> float:
    """w such that out = base + w * (expert - base), by least squares."""
    d = (expert - base).double()
    return float(((out - base).double() * d).sum() / (d * d).sum())


def _weights(fam: Family, params: dict, shared: dict, tmp: Path) -> dict[str, float]:
    """Per tensor, the weight task_arithmetic gave expert 0 under these settings."""
    config = mergekit_config(
        "task_arithmetic",
        [(fam.experts[0], params)],
        base=fam.base,
        parameters=shared,
        out_dtype="float32",
    )
    out = load_tensors(run_mergekit(config, tmp / "out"))
    base, expert = load_tensors(fam.base), load_tensors(fam.experts[0])
    return {n: round(_effective_weight(out[n], base[n], expert[n]), 4) for n in out}


def _without(src: Path, dst: Path, names: list[str]) -> Path:
    """A copy of model directory `src` whose weights lack `names`."""
    shutil.copytree(src, dst)
    tensors = load_tensors(src)
    for n in names:
        del tensors[n]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_gradient_position_is_layer_over_last_layer_and_zero_outside(fam: Family, tmp_path: Path) -> None:
    w = _weights(fam, {"weight": [0.0, 1.0]}, {}, tmp_path)
    for i in range(NUM_LAYERS):
        assert w[f"model.layers.{i}.mlp.up_proj.weight"] == round(i / (NUM_LAYERS - 1), 4)
        assert w[f"model.layers.{i}.input_layernorm.weight"] == round(i / (NUM_LAYERS - 1), 4)
    # Embeddings, the final norm and lm_head (after the last layer!) all take t = 0.
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert w[name] == 0.0


def test_gradient_interpolates_between_anchors(fam: Family, tmp_path: Path) -> None:
    w = _weights(fam, {"weight": [0.2, 0.8, 0.5]}, {}, tmp_path)
    # t = 1/3 -> position 2/3 between anchors 0 and 1: 0.2 + (2/3) * 0.6 = 0.6.
    assert w["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.6, abs=1e-4)
    # t = 2/3 -> position 4/3: 0.8 + (1/3) * (0.5 - 0.8) = 0.7.
    assert w["model.layers.2.mlp.up_proj.weight"] == pytest.approx(0.7, abs=1e-4)


def test_filters_are_substrings_first_match_wins_and_fall_through_scopes(fam: Family, tmp_path: Path) -> None:
    own = {"weight": [{"filter": "mlp", "value": 0.3}, {"filter": "up_proj", "value": 0.9}]}
    shared = {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.1}]}
    w = _weights(fam, own, shared, tmp_path)
    assert w["model.layers.0.mlp.up_proj.weight"] == 0.3  # first matching rule wins
    assert w["model.layers.0.mlp.down_proj.weight"] == 0.3  # 'mlp' is a substring
    # No per-model rule matches: the method-wide rules apply, not the default.
    assert w["model.layers.0.self_attn.q_proj.weight"] == 0.7
    assert w["model.norm.weight"] == 0.1
    assert w["lm_head.weight"] == 0.1


def test_missing_required_tensor_is_an_error(fam: Family, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    expert = _without(fam.experts[1], tmp_path / "lacks", [name])
    config = mergekit_config(
        "task_arithmetic",
        [(fam.experts[0], {"weight": 1.0}), (expert, {"weight": 1.0})],
        base=fam.base,
        parameters={},
        out_dtype="float32",
    )
    with pytest.raises(RuntimeError, match="required but not present"):
        run_mergekit(config, tmp_path / "out")


def test_missing_optional_tied_tensor_reads_the_tied_one(fam: Family, tmp_path: Path) -> None:
    """Llama's lm_head is optional, tied to embed_tokens: a model without it lends its embeddings."""
    expert = _without(fam.experts[1], tmp_path / "lacks", ["lm_head.weight"])
    config = mergekit_config(
        "linear",
        [(fam.experts[0], {"weight": 1.0}), (expert, {"weight": 1.0})],
        base=None,
        parameters={},
        out_dtype="float32",
    )
    out = load_tensors(run_mergekit(config, tmp_path / "out"))
    e0, e1 = load_tensors(fam.experts[0]), load_tensors(fam.experts[1])
    expected = (e0["lm_head.weight"] + e1["model.embed_tokens.weight"]) / 2
    assert torch.allclose(out["lm_head.weight"], expected, atol=1e-7)


def test_tensors_outside_the_architecture_are_dropped(fam: Family, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    shutil.copytree(fam.experts[0], extra)
    tensors = {**load_tensors(fam.experts[0]), "extra.scale": torch.ones(3)}
    save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
    config = mergekit_config(
        "task_arithmetic", [(extra, {"weight": 1.0})], base=fam.base, parameters={}, out_dtype="float32"
    )
    out = load_tensors(run_mergekit(config, tmp_path / "out"))
    assert "extra.scale" not in out
    assert set(out) == set(load_tensors(fam.base))


def test_linear_counts_the_base_as_an_input_with_the_method_wide_weight(fam: Family, tmp_path: Path) -> None:
    models = [(fam.experts[0], {"weight": 1.0}), (fam.experts[1], {"weight": 2.0})]
    config = mergekit_config("linear", models, base=fam.base, parameters={"weight": 3.0}, out_dtype="float32")
    out = load_tensors(run_mergekit(config, tmp_path / "out"))
    b, e0, e1 = (load_tensors(p) for p in (fam.base, *fam.experts))
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(out[n], (e0[n] + 2 * e1[n] + 3 * b[n]) / 6, atol=1e-7)
    # Without a method-wide weight the base has none, and mergekit refuses.
    config = mergekit_config("linear", models, base=fam.base, parameters={}, out_dtype="float32")
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        run_mergekit(config, tmp_path / "out2")


def test_karcher_counts_the_base_multislerp_uses_it_as_origin(fam: Family, tmp_path: Path) -> None:
    b, e0, e1 = (load_tensors(p) for p in (fam.base, *fam.experts))
    n = "model.layers.1.mlp.up_proj.weight"
    outs = {}
    for method, params in (("karcher", {}), ("multislerp", {"weight": 1.0})):
        for with_base in (True, False):
            config = mergekit_config(
                method,
                [(fam.experts[0], params), (fam.experts[1], params)],
                base=fam.base if with_base else None,
                parameters={},
                out_dtype="float32",
            )
            outs[method, with_base] = load_tensors(run_mergekit(config, tmp_path / f"{method}-{with_base}"))[
                n
            ]
    # karcher with a base: the norm-weighted spherical mean of three inputs, scaled by
    # the mean norm (1/3 each), so its norm is the mean of the three norms.
    mean_norm = sum(float(x[n].norm()) for x in (b, e0, e1)) / 3
    assert float(outs["karcher", True].norm()) == pytest.approx(mean_norm, rel=1e-4)
    assert not torch.allclose(outs["karcher", True], outs["karcher", False])
    # multislerp with a base interpolates the deltas on the sphere and adds the base
    # back: with two equally weighted experts the result's delta bisects the deltas.
    d = outs["multislerp", True] - b[n]
    d0, d1 = e0[n] - b[n], e1[n] - b[n]
    s = d0 / d0.norm() + d1 / d1.norm()
    cos = float((d * s).sum() / (d.norm() * s.norm()))
    assert cos == pytest.approx(1.0, abs=1e-5)
