"""Shared fixtures: small model families built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.families import Family, make_bert_family, make_llama_family


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A sharded tiny Llama family whose experts share the base's embeddings."""
    return make_llama_family(tmp_path_factory.mktemp("llama"), 3, unchanged=("embed_tokens",))


@pytest.fixture(scope="session")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A single-file tiny BERT family with an int64 position_ids buffer."""
    return make_bert_family(tmp_path_factory.mktemp("bert"), 2, legacy_buffers=True)


def write_spec(path: Path, spec: dict) -> Path:
    """Write a spec as JSON (valid Jsonnet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2))
    return path
