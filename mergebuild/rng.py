"""Position-keyed randomness: every draw is a pure function of its key and index.

Random methods (DARE, DELLA) draw one uniform per element. The value at flat
index j is a hash of (seed, expert tensor digest, tensor name, j), so results
never depend on block size, schedule, thread count or device.
"""

from __future__ import annotations

import struct

import torch
import xxhash

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


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


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float64 uniforms in [0, 1) for flat indices start .. start+count-1 of stream `key`.

    The mixer is SplitMix64's finalizer over (key + index * golden ratio), which
    passes BigCrush for sequential counters.
    """
    x = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x.mul_(_signed(_GOLDEN)).add_(_signed(key))
    x.bitwise_xor_(_shr(x, 30)).mul_(_signed(_MIX1))
    x.bitwise_xor_(_shr(x, 27)).mul_(_signed(_MIX2))
    x.bitwise_xor_(_shr(x, 31))
    return _shr(x, 11).to(torch.float64).mul_(2.0**-53)
