"""Shared fixtures: the test families (built once per session) and a scratch area."""

from __future__ import annotations

import pytest
import torch

from tests.families import Family, make_bert_family, make_llama_family

#: Layers per family, as the generators below build them (drives gradient positions).
NUM_LAYERS = {"llama": 4, "llama32": 4, "unchanged": 4, "bert": 2}

#: Tensors equal to the base in every expert of the "unchanged" family (zero deltas).
UNCHANGED = ("layers.1.self_attn", "model.norm")


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    """The input families, by name.

    - llama: bfloat16, sharded at 100KB. Deltas of bf16 numbers are coarse, so about
      1 % of |delta| values tie at a top-k threshold: the dedicated tie cases use it.
    - llama32: float32, sharded at 200KB; deltas are tie-free for practical purposes,
      so sparsifier cases compare every element.
    - unchanged: like llama32, but UNCHANGED tensors have zero deltas in every expert,
      for the degenerate paths (empty consensus, zero norms, zero variance).
    - bert: BertModel, float32, one file, with an int64 `embeddings.position_ids`.
    """
    root = tmp_path_factory.mktemp("families")
    return {
        "llama": make_llama_family(root / "llama", num_layers=NUM_LAYERS["llama"]),
        "llama32": make_llama_family(
            root / "llama32",
            seed=1,
            dtype=torch.float32,
            max_shard_size="200KB",
            num_layers=NUM_LAYERS["llama32"],
        ),
        "unchanged": make_llama_family(
            root / "unchanged",
            seed=3,
            dtype=torch.float32,
            max_shard_size=None,
            num_layers=NUM_LAYERS["unchanged"],
            unchanged=UNCHANGED,
        ),
        "bert": make_bert_family(root / "bert", seed=2, legacy_buffers=True, num_layers=NUM_LAYERS["bert"]),
    }
