"""mergebuild/memory.py: allocator tuning is accepted by glibc and a no-op elsewhere."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mergebuild import memory


def test_tune_allocator_in_a_fresh_process() -> None:
    # A subprocess, so that this test process keeps its allocator as it was.
    code = "from mergebuild.memory import tune_allocator as t; print(t(), t(), t(single_arena=True))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out.split() == [str(on_glibc)] * 3


def test_use_one_arena_in_a_fresh_process() -> None:
    code = "from mergebuild.memory import use_one_arena as u; print(u(), u())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out.split() == [str(on_glibc)] * 2


@pytest.mark.parametrize("value", [-1, 1 << 31])
def test_tune_allocator_rejects_values_mallopt_cannot_take(value: int) -> None:
    with pytest.raises(ValueError, match="C int"):
        memory.tune_allocator(mmap_threshold=value)
    with pytest.raises(ValueError, match="C int"):
        memory.tune_allocator(trim_threshold=value)


def test_use_huge_pages_sets_torchs_switch_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    memory.use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    memory.use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
