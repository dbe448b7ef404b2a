"""Deterministic tiny checkpoint families for tests: a base model and fine-tuned "experts".

Each family is written as Hugging Face model directories (config.json plus
safetensors, sharded with an index when `max_shard_size` is given). Weights are
seeded random numbers, generated per tensor from (seed, tensor name), so a
family depends only on its arguments, not on transformers' init order or on the
global torch RNG. Nothing is downloaded.

Experts are base + delta, where each delta mixes a component shared by all
experts (with an expert-specific signed coefficient, so experts agree on some
signs and disagree on others, which exercises TIES consensus) and independent
noise, at a scale that varies per expert and per tensor (so magnitude-based
sparsifiers and weight normalisation see different statistics per model).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

# save_pretrained draws a progress bar per save; in test logs it is only noise.
hf_logging.disable_progress_bar()

#: Signed weight of the shared delta component per expert (cycled). Mixed signs
#: give real sign disagreement between experts.
_SHARED_COEFFS = (1.0, -0.7, 0.5, -0.3, 0.8)

#: Range of the per-(expert, tensor) delta scale, relative to the base tensor's std.
_SCALE_RANGE = (0.05, 0.5)


@dataclass(frozen=True)
class Family:
    """Paths of a base model directory and its expert directories."""

    base: Path
    experts: tuple[Path, ...]


def _generator(seed: int, *parts: object) -> torch.Generator:
    """A torch generator seeded from `seed` and a stable hash of `parts`.

    crc32 instead of hash(): Python's str hash is salted per process.
    """
    key = zlib.crc32(repr(parts).encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63))


def _base_tensor(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded float32 base value for tensor `name` with the shape of `like`.

    Norm weights sit around 1 and biases around 0, as in trained models; other
    weights get a small Gaussian.
    """
    g = _generator(seed, "base", name)
    noise = torch.randn(like.shape, generator=g, dtype=torch.float32)
    if "norm" in name.lower() and name.endswith("weight"):
        return 1.0 + 0.1 * noise
    if name.endswith("bias"):
        return 0.01 * noise
    return 0.02 * noise


def _delta(name: str, base: torch.Tensor, expert: int, seed: int) -> torch.Tensor:
    """Expert `expert`'s float32 delta for tensor `name`."""
    shared = torch.randn(base.shape, generator=_generator(seed, "shared", name))
    g = _generator(seed, "delta", expert, name)
    noise = torch.randn(base.shape, generator=g)
    low, high = _SCALE_RANGE
    u = float(torch.rand((), generator=g))
    relative = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    # Scale against the spread of the base *around its mean*: norm weights have
    # mean 1 and std 0.1, and their deltas should be of the std's order.
    scale = relative * float(base.float().std().clamp_min(1e-3))
    coeff = _SHARED_COEFFS[expert % len(_SHARED_COEFFS)]
    return scale * (coeff * shared + noise) / math.sqrt(1 + coeff * coeff)


def _save(
    model: PreTrainedModel,
    path: Path,
    max_shard_size: str | None,
    extra: dict[str, torch.Tensor],
) -> None:
    """save_pretrained as safetensors; one file unless `max_shard_size` is given.

    `extra` tensors (legacy buffers) are written alongside the model's own.
    """
    state = {**model.state_dict(), **extra} if extra else None
    # transformers 5 always writes safetensors; a huge shard size means one file.
    model.save_pretrained(path, state_dict=state, max_shard_size=max_shard_size or "100GB")


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    """A tiny WordLevel tokenizer (built locally, no hub), so copy tests have files to copy."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(max(0, vocab_size - len(specials)))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(path)


def _make_family(
    model: PreTrainedModel,
    root: Path,
    num_experts: int,
    seed: int,
    dtype: torch.dtype,
    max_shard_size: str | None,
    unchanged: tuple[str, ...],
    vocab_size: int,
    extra: dict[str, torch.Tensor] | None = None,
) -> Family:
    """Fill `model` with seeded base weights, save it and `num_experts` perturbed copies.

    `extra` tensors are saved unchanged in every directory (non-floating buffers).
    """
    extra = extra or {}
    root = Path(root)
    state = model.state_dict()
    base: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.is_floating_point():
                # Round to the storage dtype first, so deltas are computed from
                # what is actually on disk.
                base[name] = _base_tensor(name, tensor, seed).to(dtype)
        model.load_state_dict(base, strict=False)
        model.to(dtype)

        base_dir = root / "base"
        _save(model, base_dir, max_shard_size, extra)
        _save_tokenizer(base_dir, vocab_size)

        experts = []
        for e in range(num_experts):
            weights = {}
            for name, b in base.items():
                if any(s in name for s in unchanged):
                    weights[name] = b
                else:
                    delta = _delta(name, b.float(), e, seed)
                    weights[name] = (b.float() + delta).to(dtype)
            model.load_state_dict(weights, strict=False)
            path = root / f"expert{e}"
            _save(model, path, max_shard_size, extra)
            experts.append(path)
        # Leave the model as the base, in case a caller keeps a reference.
        model.load_state_dict(base, strict=False)
    return Family(base=base_dir, experts=tuple(experts))


def make_llama_family(
    root: Path,
    num_experts: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | None = "100KB",
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int = 128,
    unchanged: tuple[str, ...] = (),
) -> Family:
    """A tiny LlamaForCausalLM base (GQA, untied lm_head) and `num_experts` experts under `root`.

    Tensors whose name contains any substring in `unchanged` are bit-equal to the base in every
    expert.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)  # only for transformers' init; every weight is overwritten
    model = LlamaForCausalLM(config)
    return _make_family(model, root, num_experts, seed, dtype, max_shard_size, unchanged, vocab_size)


def make_bert_family(
    root: Path,
    num_experts: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 128,
    unchanged: tuple[str, ...] = (),
    legacy_buffers: bool = False,
) -> Family:
    """A tiny BertModel base (with pooler) and `num_experts` experts under `root`.

    Current transformers does not save BERT's integer buffers. With `legacy_buffers`,
    `embeddings.position_ids` (int64, shape (1, max_positions)) is written too, as in
    older checkpoints (and in mergekit's BERT layout), so tests can check that
    non-floating tensors pass through untouched.
    """
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    extra = {}
    if legacy_buffers:
        positions = config.max_position_embeddings
        extra = {
            "embeddings.position_ids": torch.arange(positions, dtype=torch.int64)[None],
        }
    return _make_family(model, root, num_experts, seed, dtype, max_shard_size, unchanged, vocab_size, extra)


def read_index(model_dir: Path) -> dict[str, str] | None:
    """The tensor -> shard file map of a sharded model directory, or None if unsharded."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if not index.exists():
        return None
    return json.loads(index.read_text())["weight_map"]


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, read with safetensors (sharded or not)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f.get_tensor(name)
    return out
