"""The test model families are what every other test builds on: check they are what they claim."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel, LlamaForCausalLM

from tests.families import Family, load_tensors, make_bert_family, make_llama_family, read_index


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_llama_family(tmp_path_factory.mktemp("llama"), unchanged=("layers.1.", "norm"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_bert_family(tmp_path_factory.mktemp("bert"), legacy_buffers=True)


def test_llama_is_sharded_with_index(llama: Family) -> None:
    for model_dir in (llama.base, *llama.experts):
        weight_map = read_index(model_dir)
        assert weight_map is not None
        shards = set(weight_map.values())
        assert len(shards) > 1
        assert all((model_dir / s).exists() for s in shards)
        assert set(load_tensors(model_dir)) == set(weight_map)
        assert (model_dir / "config.json").exists()


def test_bert_is_single_file(bert: Family) -> None:
    for model_dir in (bert.base, *bert.experts):
        assert read_index(model_dir) is None
        assert [p.name for p in model_dir.glob("*.safetensors")] == ["model.safetensors"]


def test_families_load_with_from_pretrained(llama: Family, bert: Family) -> None:
    model = LlamaForCausalLM.from_pretrained(llama.experts[0])
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    on_disk = load_tensors(llama.experts[0])
    assert torch.equal(model.lm_head.weight, on_disk["lm_head.weight"])
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 128) and torch.isfinite(out.float()).all()

    bert_model = BertModel.from_pretrained(bert.base)
    assert bert_model.config.hidden_size == 64
    assert torch.isfinite(bert_model(torch.tensor([[2, 7, 3]])).last_hidden_state).all()


def test_tokenizer_in_base_only(llama: Family) -> None:
    tok = AutoTokenizer.from_pretrained(llama.base)
    assert tok("w1 w2")["input_ids"] == [6, 7]
    assert (llama.base / "tokenizer.json").exists()
    assert not (llama.experts[0] / "tokenizer.json").exists()


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_deltas(which: str, llama: Family, bert: Family) -> None:
    family, unchanged = (llama, ("layers.1.", "norm")) if which == "llama" else (bert, ())
    base = load_tensors(family.base)
    experts = [load_tensors(e) for e in family.experts]
    disagree = 0
    for name, b in base.items():
        if not b.is_floating_point():
            # Non-floating buffers are saved exactly as given, in every model.
            assert all(torch.equal(e[name], b) for e in experts)
            assert b.dtype == torch.int64
            continue
        deltas = [e[name].float() - b.float() for e in experts]
        if any(s in name for s in unchanged):
            assert all(torch.equal(e[name], b) for e in experts), name
            continue
        for d in deltas:
            # Mostly nonzero (bf16 rounding may swallow the odd tiny delta).
            assert (d != 0).float().mean() > 0.9, name
        # Experts differ from each other, in scale and in sign.
        assert not torch.equal(deltas[0], deltas[1])
        disagree += int((deltas[0].sign() * deltas[1].sign() < 0).sum())
    assert disagree > 0
    if which == "bert":
        assert "embeddings.position_ids" in base


def test_scales_vary_per_expert_and_tensor(llama: Family) -> None:
    base = load_tensors(llama.base)
    experts = [load_tensors(e) for e in llama.experts]
    name_a, name_b = "model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    ratio = [
        float((e[name].float() - base[name].float()).std() / base[name].float().std())
        for e in experts
        for name in (name_a, name_b)
    ]
    assert len({round(r, 3) for r in ratio}) == len(ratio)


def test_deterministic(tmp_path: Path) -> None:
    a = make_bert_family(tmp_path / "a", 2, seed=3)
    b = make_bert_family(tmp_path / "b", 2, seed=3)
    c = make_bert_family(tmp_path / "c", 2, seed=4)
    for x, y, z in zip((a.base, *a.experts), (b.base, *b.experts), (c.base, *c.experts), strict=True):
        assert (x / "model.safetensors").read_bytes() == (y / "model.safetensors").read_bytes()
        assert (x / "model.safetensors").read_bytes() != (z / "model.safetensors").read_bytes()


def test_small_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    family = make_llama_family(tmp_path / "l")
    make_bert_family(tmp_path / "b")
    assert time.perf_counter() - start < 2.0
    size = sum(p.stat().st_size for p in family.base.iterdir())
    assert size < 600_000
