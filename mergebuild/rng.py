"""Position-keyed randomness: every draw is a pure function of its key and index.

Random methods (DARE, DELLA) draw one uniform per element. The value at flat
index j is a hash of (seed, expert tensor digest, tensor name, j), so results
never depend on block size, schedule, thread count or device.

The hash runs over blocks of `_CHUNK` elements whose int64 temporaries stay in
the CPU cache; a whole-tensor pass per hash step (about 15 of them) would be
bound by memory bandwidth and page faults instead. `keep_mask` gives
`uniform(...) < density` exactly without materializing the float64 uniforms.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

import torch
import xxhash

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
#: Elements per block on the CPU: two int64 buffers of 256 KiB stay in cache, and at
#: torch's intra-op grain size each op runs on the calling thread (see sparsify._BLOCK).
_CHUNK = 1 << 15


def _signed(x: int) -> int:
    """Reinterpret an unsigned 64-bit integer as torch's signed int64."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def stream_key(seed: int, digest: bytes, name: str) -> int:
    """The 64-bit key of one random stream: (seed, tensor digest, tensor name)."""
    payload = struct.pack("<q", seed) + digest + name.encode()
    return xxhash.xxh3_64_intdigest(payload)


def _hashed_blocks(
    key: int, start: int, count: int, device: torch.device | str
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (lo, hi, x): x holds the 64-bit hashes (as int64) of indices start+lo .. start+hi-1.

    x is a scratch buffer, overwritten by the next block: consume it before
    asking for the next. The mixer is SplitMix64's finalizer over
    (key + index * golden ratio), which passes BigCrush for sequential counters.
    """
    chunk = _CHUNK if torch.device(device).type == "cpu" else max(count, 1)
    size = min(chunk, count)
    # index * golden for the block's offsets, mod 2^64; a block adds its own start.
    steps = torch.arange(size, dtype=torch.int64, device=device).mul_(_signed(_GOLDEN))
    x_buf = torch.empty(size, dtype=torch.int64, device=device)
    tmp_buf = torch.empty(size, dtype=torch.int64, device=device)
    for lo in range(0, count, chunk):
        hi = min(count, lo + chunk)
        x, tmp = x_buf[: hi - lo], tmp_buf[: hi - lo]
        torch.add(steps[: hi - lo], _signed(key + (start + lo) * _GOLDEN), out=x)
        for shift, mul in ((30, _MIX1), (27, _MIX2), (31, None)):
            # x ^= x >>> shift (a logical shift: arithmetic, then clear the sign copies)
            torch.bitwise_right_shift(x, shift, out=tmp)
            tmp.bitwise_and_((1 << (64 - shift)) - 1)
            x.bitwise_xor_(tmp)
            if mul is not None:
                x.mul_(_signed(mul))
        yield lo, hi, x


def uniform53(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 53-bit integers m (int64) behind `uniform`: uniform(...) == m * 2**-53 exactly."""
    out = torch.empty(count, dtype=torch.int64, device=device)
    for lo, hi, x in _hashed_blocks(key, start, count, device):
        torch.bitwise_right_shift(x, 11, out=out[lo:hi]).bitwise_and_((1 << 53) - 1)
    return out


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float64 uniforms in [0, 1) for flat indices start .. start+count-1 of stream `key`.

    The value is the hash's top 53 bits times 2**-53 (see `_hashed_blocks`).
    """
    out = torch.empty(count, dtype=torch.float64, device=device)
    for lo, hi, x in _hashed_blocks(key, start, count, device):
        x.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)
        out[lo:hi].copy_(x).mul_(2.0**-53)
    return out


def keep_mask(
    key: int, start: int, count: int, density: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool mask equal to `uniform(key, start, count, device) < density`, bit for bit, but faster.

    With u = m * 2**-53 and m an integer below 2**53: u < d  <=>  m < d * 2**53
    (exact in float64: a power-of-two scaling)  <=>  m < ceil(d * 2**53). As the
    hash h is m * 2**11 plus 11 low bits: m < T  <=>  h < T * 2**11 (unsigned),
    compared as signed after flipping the sign bit.
    """
    density = float(density)
    if not density > 0:  # also NaN: nothing is below it
        return torch.zeros(count, dtype=torch.bool, device=device)
    if density >= 1:
        return torch.ones(count, dtype=torch.bool, device=device)
    bound = (math.ceil(density * 2.0**53) << 11) + _INT64_MIN  # T * 2^11 <= 2^64 - 2^11
    out = torch.empty(count, dtype=torch.bool, device=device)
    for lo, hi, x in _hashed_blocks(key, start, count, device):
        torch.lt(x.bitwise_xor_(_INT64_MIN), bound, out=out[lo:hi])
    return out
