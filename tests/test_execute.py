"""Executor settings."""

from __future__ import annotations

import pytest

from mergebuild.errors import InputError
from mergebuild.execute import READ_AHEAD_BYTES, read_ahead_bytes


def test_read_ahead_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGEBUILD_READ_AHEAD", raising=False)
    assert read_ahead_bytes() == READ_AHEAD_BYTES
    monkeypatch.setenv("MERGEBUILD_READ_AHEAD", "64MiB")
    assert read_ahead_bytes() == 64 * 2**20
    monkeypatch.setenv("MERGEBUILD_READ_AHEAD", "lots")
    with pytest.raises(InputError, match="MERGEBUILD_READ_AHEAD: not a size"):
        read_ahead_bytes()
