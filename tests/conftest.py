"""Shared fixtures: small model families built once per session."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mergebuild import parallel
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


@contextmanager
def jobs(count: int) -> Iterator[None]:
    """Run the block with `count` threads for CPU arithmetic (`parallel.set_jobs`), then
    restore the settings it found."""
    before, torch_threads = parallel.jobs(), torch.get_num_threads()
    parallel.set_jobs(count)
    try:
        yield
    finally:
        parallel.set_jobs(before)
        torch.set_num_threads(torch_threads)
