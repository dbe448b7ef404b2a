"""A small Llama-shaped checkpoint family, generated deterministically (no download).

`mergebuild init-demo` writes it under specs/models/demo: a base and three
experts, each a sharded safetensors directory with an index, a config.json and
a tiny word-level tokenizer, a few hundred KB per model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergebuild.publish import OutputWriter, write_file

HIDDEN = 64
INTERMEDIATE = 172
LAYERS = 4
HEADS = 4
VOCAB = 256
EXPERTS = ("math", "code", "chat")


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    return shapes


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _tokenizer() -> dict:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2))
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }  # fmt: skip


def _weights(seed: int, base: dict[str, torch.Tensor] | None, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _shapes().items():
        if base is None:
            value = (
                torch.ones(shape)
                if name.endswith("norm.weight")
                else torch.randn(shape, generator=gen) * 0.05
            )
        elif "embed_tokens" in name:
            # Experts keep the embeddings frozen, as many fine-tunes do.
            value = base[name].float()
        else:
            value = base[name].float() + torch.randn(shape, generator=gen) * scale
        out[name] = value.to(torch.bfloat16)
    return out


def _save(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in sorted(tensors.items())]
    writer = OutputWriter(directory, entries, shard_size=200_000, block_size=2**20, metadata={"format": "pt"})
    for name, t in sorted(tensors.items()):
        writer.write(name, t)
    writer.finish()
    write_file(directory / "config.json", (json.dumps(_config(), indent=2) + "\n").encode())


def write_demo_family(root: Path) -> list[Path]:
    """Write the base and experts under `root` (skipping those already there); return their paths."""
    base_weights = _weights(seed=0, base=None, scale=0.0)
    paths = [root / "base"] + [root / name for name in EXPERTS]
    if not (paths[0] / "config.json").is_file():
        _save(paths[0], base_weights)
        tokenizer = (json.dumps(_tokenizer()) + "\n").encode()
        write_file(paths[0] / "tokenizer.json", tokenizer)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
                  "eos_token": "</s>"}  # fmt: skip
        write_file(paths[0] / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    for i, path in enumerate(paths[1:], start=1):
        if not (path / "config.json").is_file():
            _save(path, _weights(seed=i, base=base_weights, scale=0.01 * i))
    return paths
