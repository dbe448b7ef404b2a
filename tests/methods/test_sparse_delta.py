"""The cached form of a sparsified delta: decode(joined(x)) gives back the same kept delta, bit for bit."""

from __future__ import annotations

import pytest
import torch

from mergebuild.methods import sparse_delta
from mergebuild.methods.sparse_delta import SparseDelta, decode, encode, kept_delta


def joined(sparse: SparseDelta, base: torch.Tensor, dtype: torch.dtype) -> bytes:
    """The blob that `encode`'s pieces make."""
    return b"".join(encode(sparse, base, dtype))


def _pair(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    # Mostly small moves (one-byte codes), some large ones and sign flips (escapes).
    delta = torch.randn(shape, generator=g) * 5e-4
    delta[torch.rand(shape, generator=g) < 0.05] *= 400
    return base, (base.to(torch.float32) + delta).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 48), (1000,), ()])
@pytest.mark.parametrize("with_factor", [False, True])
def test_round_trip_gives_the_same_kept_delta(
    dtype: torch.dtype, shape: tuple[int, ...], with_factor: bool
) -> None:
    base, expert = _pair(dtype, shape, seed=1)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.5
    factor = torch.tensor(1.7) if with_factor else None
    sparse = SparseDelta(mask, expert.to(torch.float32), factor)
    base32 = base.to(torch.float32)

    back = decode(joined(sparse, base, dtype), base)

    assert torch.equal(back.mask, mask)
    assert (back.factor is None) == (factor is None)
    if factor is not None:
        assert back.factor is not None and back.factor.item() == factor.item()
    expected = kept_delta(mask, sparse.expert, base32, factor)
    # Equal values; a dropped element may be -0.0 on one side and +0.0 on the other, which
    # no fold can tell apart (its sums start at +0.0).
    assert torch.equal(kept_delta(back.mask, back.expert, base32, back.factor), expected)
    assert torch.equal(back.expert[mask].to(torch.float32), sparse.expert[mask])


def test_values_that_do_not_fit_a_byte_are_kept_whole() -> None:
    base = torch.tensor([1.0, 1.0, -2.0, 0.0, 3.0], dtype=torch.bfloat16)
    expert = torch.tensor([1.0078125, -1.0, 1e-30, 5.0, 3.0], dtype=torch.bfloat16)  # 1 ulp, flips, 0 -> 5
    mask = torch.tensor([True, True, True, True, False])
    sparse = SparseDelta(mask, expert.to(torch.float32), None)

    back = decode(joined(sparse, base, torch.bfloat16), base)

    assert torch.equal(back.expert[mask].to(torch.float32), expert[mask].to(torch.float32))


def test_the_blob_is_a_fraction_of_the_expert() -> None:
    base, expert = _pair(torch.bfloat16, (512, 512), seed=3)
    mask = torch.rand(base.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    blob = joined(SparseDelta(mask, expert.to(torch.float32), None), base, torch.bfloat16)
    # Mask: 1 bit per element; codes: 1 byte per kept one; plus the escapes (2 bytes each).
    assert len(blob) < 0.45 * expert.numel() * 2


def test_an_empty_mask_and_a_full_one() -> None:
    base, expert = _pair(torch.bfloat16, (33, 7), seed=5)
    base32 = base.to(torch.float32)
    for mask in (torch.zeros(base.shape, dtype=torch.bool), torch.ones(base.shape, dtype=torch.bool)):
        sparse = SparseDelta(mask, expert.to(torch.float32), None)
        back = decode(joined(sparse, base, torch.bfloat16), base)
        back_delta = kept_delta(back.mask, back.expert, base32, back.factor)
        assert torch.equal(back_delta, kept_delta(mask, sparse.expert, base32, None))


def test_a_foreign_blob_is_refused() -> None:
    with pytest.raises(ValueError, match="not a sparse delta blob"):
        decode(b"MBSD2\n" + bytes(16), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_coding_in_chunks_gives_the_blob_of_one_pass(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    # 1000 elements in chunks of 64: the packed mask, the codes and the escapes of each chunk
    # follow the previous chunk's, and the last chunk is short.
    base, expert = _pair(dtype, (1000,), seed=6)
    mask = torch.rand(base.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    sparse = SparseDelta(mask, expert, torch.tensor(1.25))
    whole = joined(sparse, base.to(torch.float32), dtype)
    monkeypatch.setattr(sparse_delta, "_ENCODE_CHUNK", 64)

    chunked = joined(sparse, base.to(torch.float32), dtype)

    assert chunked == whole
    back = decode(chunked, base)
    assert torch.equal(back.mask, mask)
    assert torch.equal(back.expert[mask].to(torch.float32), expert[mask].to(torch.float32))


@pytest.mark.parametrize(
    ("expert_dtype", "base_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float32),
        (torch.float64, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
)
def test_difference_is_float32_arithmetic_whatever_the_storage_dtypes(
    expert_dtype: torch.dtype, base_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 1000, generator=gen)
    expert = base + torch.randn(3, 1000, generator=gen) * 1e-3
    expert, base = expert.to(expert_dtype), base.to(base_dtype)
    # Float32 arithmetic on the exactly promoted values (a float64 expert: torch's float64
    # subtraction, rounded once).
    want = (expert - base.float()).float()
    if expert_dtype == base_dtype != torch.float32:
        # Subtracted in their own 16-bit dtype, most of these would round.
        assert not torch.equal((expert - base).float(), want)
    assert torch.equal(sparse_delta.difference(expert, base), want)
    assert torch.equal(
        sparse_delta.Difference(expert, base).part(slice(100, 2100)), want.reshape(-1)[100:2100]
    )
