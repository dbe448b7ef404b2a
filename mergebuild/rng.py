"""Position-keyed randomness: every draw is a pure function of its key and index.

Random methods (DARE, DELLA) draw one uniform per element. The value at flat
index j is a hash of (seed, expert tensor digest, tensor name, j), so results
never depend on block size, schedule, thread count or device. Methods compare
draws with probabilities on the hashes themselves (`keep_mask`, and
`uniform_words` against `word_bounds`), with the same results as comparing the
float64 uniforms.

The hash runs on the host over blocks of `_CHUNK` elements whose uint64
temporaries stay in the CPU cache; a whole-tensor pass per hash step (nine of
them) would be bound by memory bandwidth and page faults instead. `keep_mask` gives
`uniform(...) < density` exactly without materializing the float64 uniforms.
Both spread parts of `_PART` elements over the merge's threads (`parallel`), and hash
with the native kernels where they are built (`mergebuild.native`: the same hashes).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from mergebuild import native, parallel

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
#: SplitMix64's finalizer: x ^= x >> shift, then x *= multiplier (none after the last).
_STEPS = ((np.uint64(30), np.uint64(_MIX1)), (np.uint64(27), np.uint64(_MIX2)), (np.uint64(31), None))
#: Elements per block: two uint64 buffers of 256 KiB stay in the CPU's cache.
_CHUNK = 1 << 15
#: Elements per part a thread takes.
_PART = 1 << 20


def stream_key(seed: int, digest: bytes, name: str) -> int:
    """The 64-bit key of one random stream: (seed, tensor digest, tensor name)."""
    payload = struct.pack("<q", seed) + digest + name.encode()
    return xxhash.xxh3_64_intdigest(payload)


def _hashed_blocks(key: int, start: int, count: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (lo, hi, x): x holds the 64-bit hashes (uint64) of indices start+lo .. start+hi-1.

    x is a scratch buffer, overwritten by the next block: consume it before
    asking for the next. The mixer is SplitMix64's finalizer over
    (key + index * golden ratio), which passes BigCrush for sequential counters.
    numpy runs it: its unsigned shifts are logical and its calls cost a third of
    torch's, 1.9 ns per element against 4 to 6 for the same steps in torch's int64.
    """
    size = min(_CHUNK, count)
    # index * golden for the block's offsets, mod 2^64 (numpy's array products wrap).
    steps = np.arange(size, dtype=np.uint64) * np.uint64(_GOLDEN)
    x_buf = np.empty(size, dtype=np.uint64)
    tmp_buf = np.empty(size, dtype=np.uint64)
    for lo in range(0, count, _CHUNK):
        hi = min(count, lo + _CHUNK)
        x, tmp = x_buf[: hi - lo], tmp_buf[: hi - lo]
        np.add(steps[: hi - lo], np.uint64((key + (start + lo) * _GOLDEN) & _MASK64), out=x)
        for shift, mul in _STEPS:
            np.bitwise_xor(x, np.right_shift(x, shift, out=tmp), out=x)
            if mul is not None:
                np.multiply(x, mul, out=x)
        yield lo, hi, x


def uniform(key: int, start: int, count: int) -> torch.Tensor:
    """Float64 uniforms in [0, 1) for flat indices start .. start+count-1 of stream `key`.

    The value is the hash's top 53 bits times 2**-53 (see `_hashed_blocks`). This is the
    draws' definition: the methods compare draws without making these values
    (`keep_mask`, `uniform_words`), and the tests check both against it.
    """
    out = np.empty(count, dtype=np.float64)

    def fill(first: int) -> None:
        part = out[first : first + _PART]
        for lo, hi, x in _hashed_blocks(key, start + first, part.size):
            np.multiply(np.right_shift(x, np.uint64(11), out=x), 2.0**-53, out=part[lo:hi])

    parallel.map_parts(fill, range(0, count, _PART))
    return torch.from_numpy(out)


#: Flipping a hash's top bit maps the unsigned order of the hashes to int64's.
_TOP_BIT = np.uint64(1 << 63)


def uniform_words(key: int, start: int, count: int) -> torch.Tensor:
    """The hashes behind `uniform` for flat indices start .. start+count-1, as int64 words that
    order like them (each hash minus 2^63): a uniform is below p exactly when its word is
    below `word_bounds(p)`, so methods that compare draws with probabilities need neither
    the float64 uniforms nor float64 comparisons."""
    out = np.empty(count, dtype=np.int64)

    def fill(first: int) -> None:
        part = out[first : first + _PART].view(np.uint64)
        if native.library() is not None:
            native.hash_words(key, start + first, part)
            return
        for lo, hi, x in _hashed_blocks(key, start + first, part.size):
            np.bitwise_xor(x, _TOP_BIT, out=part[lo:hi])

    parallel.map_parts(fill, range(0, count, _PART))
    return torch.from_numpy(out)


@dataclass(frozen=True)
class Draws:
    """The draws of one model's tensor (or of the rows a context covers): element j's draw is
    index `first` + j of stream `key`. Called with a slice of the elements (start and stop
    given), it gives their `uniform_words`; a method that knows the stream may also make the
    draws itself (della's native kernel does)."""

    key: int
    first: int = 0

    def __call__(self, part: slice) -> torch.Tensor:
        return uniform_words(self.key, self.first + part.start, part.stop - part.start)


def word_bounds(probabilities: torch.Tensor) -> torch.Tensor:
    """int64 bounds, one per float64 probability p in [0, 1) (on its device): the uniform of
    a word is below p iff the word is below p's bound (the same bound as `keep_mask`'s,
    shifted like the words)."""
    p = probabilities.detach().cpu().numpy().astype(np.float64, copy=False)
    if not ((p >= 0) & (p < 1)).all():
        raise ValueError("word bounds are for probabilities in [0, 1)")
    bounds = _hash_bounds(p) ^ _TOP_BIT
    return torch.from_numpy(bounds.view(np.int64)).to(probabilities.device)


def _hash_bounds(p: np.ndarray) -> np.ndarray:
    """uint64 bounds, one per float64 probability p in [0, 1): a uniform is below p iff its
    hash is below p's bound.

    With u = m * 2**-53 and m an integer below 2**53: u < p  <=>  m < p * 2**53
    (exact in float64: a power-of-two scaling)  <=>  m < ceil(p * 2**53) = T. As the
    hash h is m * 2**11 plus 11 low bits: m < T  <=>  h < T * 2**11 (at most 2^64 - 2^11).
    """
    return np.ceil(p * 2.0**53).astype(np.uint64) << np.uint64(11)


def keep_mask(key: int, start: int, count: int, density: float) -> torch.Tensor:
    """Bool mask equal to `uniform(key, start, count) < density`, bit for bit, but faster: the
    hashes are compared with the density's bound (`_hash_bounds`)."""
    density = float(density)
    if not density > 0:  # also NaN: nothing is below it
        return torch.zeros(count, dtype=torch.bool)
    if density >= 1:
        return torch.ones(count, dtype=torch.bool)
    bound = _hash_bounds(np.array([density]))[0]
    out = np.empty(count, dtype=np.bool_)

    def fill(first: int) -> None:
        part = out[first : first + _PART]
        if native.library() is not None:
            native.hashes_below(key, start + first, int(bound), part)
            return
        for lo, hi, x in _hashed_blocks(key, start + first, part.size):
            np.less(x, bound, out=part[lo:hi])

    parallel.map_parts(fill, range(0, count, _PART))
    return torch.from_numpy(out)
