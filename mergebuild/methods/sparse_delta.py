"""A sparsified task vector of one expert, and its compact cached form.

Per-expert work of the sparsifying methods (which elements of delta_i survive,
and the L1 rescale factor) does not depend on the other experts, the weights or
lambda, so it is cached on its own: a rebuild after swapping one expert or
changing a coefficient reuses it. The cached form is a bitmask plus the kept
values of the expert in its storage dtype, coded against the base (delta =
expert - base is recomputed from the base, which the merge reads anyway), so it
is a fraction of the expert's size (see `encode`).

A fresh sparse delta and a cached one reach the merge in the same form (mask,
expert, factor), and the kept delta is made from it with one elementwise
expression, `kept_delta`, so a rebuild is bit-identical to a build from an
empty cache.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from mergebuild import native
from mergebuild.safetensors_io import DTYPE_NAMES, DTYPES

_MAGIC = b"MBSD3\n"
#: Elements `difference` subtracts at a time.
_DIFFERENCE_CHUNK = 1 << 20
#: Elements `encode` codes at a time (a multiple of 8, for the packed mask). A chunk's
#: temporaries (1 MiB of int16 differences) stay in the CPU's cache: 40 ms against 48 for
#: a 16000 x 1536 bf16 expert with chunks of 4M elements.
_ENCODE_CHUNK = 1 << 19


@dataclass(frozen=True)
class SparseDelta:
    """Which elements of an expert's delta are kept, the expert's values there, and the rescale factor."""

    mask: torch.Tensor  # bool, the tensor's shape
    #: The tensor's shape, float32 or the expert's storage dtype: the expert's values where
    #: `mask` is set (elsewhere unspecified).
    expert: torch.Tensor
    factor: torch.Tensor | None  # float32 0-d L1 rescale factor, or None


def difference(expert: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`expert - base` into float32 `out` (made when not given); `base` is float32 or a
    16-bit float.

    16-bit values are promoted exactly, as `expert.float() - base.float()` would, but
    `expert - base` in one call converts the whole expert to a float32 temporary first:
    this subtracts `_DIFFERENCE_CHUNK` elements at a time, so the temporary is a chunk's
    size. Two 16-bit operands would be subtracted in 16 bits: the expert is copied into
    `out` first, and a float32 tensor minus a 16-bit one is computed in float32. The
    native kernel, where it takes the operands, does it all in one pass.
    """
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device) if out is None else out
    if native.usable(expert, base, out):
        return native.difference(expert, base, out)
    flat_expert, flat_base, flat_out = expert.reshape(-1), base.reshape(-1), out.reshape(-1)
    both_16_bit = expert.element_size() == 2 and base.element_size() == 2
    for start in range(0, flat_out.numel(), _DIFFERENCE_CHUNK):
        part = slice(start, start + _DIFFERENCE_CHUNK)
        if both_16_bit:
            flat_out[part].copy_(flat_expert[part]).sub_(flat_base[part])
        else:
            torch.sub(flat_expert[part], flat_base[part], out=flat_out[part])
    return out


@dataclass(frozen=True)
class Difference:
    """`expert - base` (float32, as `difference` makes it), made where it is used, a part at a
    time: a sparsifier that streams over the delta, or block statistics, never hold it whole."""

    expert: torch.Tensor  # any float dtype
    base: torch.Tensor  # float32 or a 16-bit float, the expert's shape

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def numel(self) -> int:
        return self.base.numel()

    def part(self, part: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat elements `part` of the difference (into `out`, their size, when given)."""
        return difference(self.expert.reshape(-1)[part], self.base.reshape(-1)[part], out)

    def whole(self) -> torch.Tensor:
        """The whole difference, a new tensor."""
        return difference(self.expert, self.base)


def flat_part(x: torch.Tensor | Difference, part: slice, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat elements `part` of `x`: of a tensor a view, of a `Difference` made; written into
    `out` (their size) when given."""
    if isinstance(x, Difference):
        return x.part(part, out)
    view = x.reshape(-1)[part]
    return view if out is None else out.copy_(view)


def keep_in_place(
    values: torch.Tensor, mask: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """`values * mask` written over float `values` (a dropped element is +0.0 or -0.0, which
    no sum that starts at +0.0 tells apart; an infinite value dropped is NaN, which fails
    the merged tensor's finite check).

    The mask is converted to 0s and 1s in `scratch` (float, the values' size; made when not
    given) and multiplied: `torch.where(mask, values, 0)` costs 6 to 9 times as much per
    element, and `values.mul_(mask)` converts into a temporary on every call, whose sizes
    glibc's heap keeps (0.3 GiB more peak RSS on a 619M x 8 ties merge)."""
    keep = torch.empty_like(values) if scratch is None else scratch
    return values.mul_(mask_as_floats(mask, keep))


def mask_as_floats(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The bool `mask` as 0s and 1s in float `out` (the same size). On the host numpy
    converts it: 0.15 ns per element against torch's 0.55."""
    if out.device.type == "cpu" and out.is_contiguous() and mask.is_contiguous():
        np.copyto(out.numpy(), mask.numpy())
        return out
    return out.copy_(mask)


def kept_delta(
    mask: torch.Tensor,
    expert: torch.Tensor,
    base: torch.Tensor,
    factor: torch.Tensor | None,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """(expert - base) * mask, times the rescale factor, into `out` when given (`scratch`, the
    same size, for `keep_in_place`): the one expression both paths use, elementwise, so the
    bits of a chunk are the whole tensor's."""
    kept = keep_in_place(difference(expert, base, out), mask, scratch)
    return kept.mul_(factor) if factor is not None else kept


def encode(sparse: SparseDelta, base: torch.Tensor, dtype: torch.dtype) -> list[memoryview]:
    """The blob form, as its pieces in order: header, the packed mask, and the kept values in
    `dtype` (the expert's storage dtype). The pieces are not joined (the cache hashes and
    writes them one by one: a join would hold the GIL while it copies).

    For 2-byte dtypes the kept values are coded against the base: a fine-tune
    moves most weights by a few units in the last place, so the difference of
    the two bit patterns (wrapping 16-bit integers) usually fits in a signed
    byte, and the value that does not is stored whole after the codes. `base`
    is the base the mask was made with (any dtype; it is converted to `dtype`
    unless it already is), and `decode` needs the same one. Every step is one
    vectorized pass: no entropy coder, which cost more CPU time than the merge
    itself for the saving of about a tenth of the blob. The passes run a chunk
    of `_ENCODE_CHUNK` elements at a time, so the temporaries are a chunk's
    size.
    """
    mask = sparse.mask.reshape(-1).numpy()
    values, base_values = sparse.expert.reshape(-1), base.reshape(-1)
    # Per section, its pieces in element order (each chunk's pieces follow the previous
    # chunk's; a chunk holds a multiple of 8 elements, so the packed mask's pieces do too).
    sections: list[list[np.ndarray]] = [[], [], []] if dtype.itemsize == 2 else [[], []]
    fused = dtype.itemsize == 2 and native.library() is not None
    if fused:
        # The native pass writes a chunk's codes here; each chunk's kept ones are copied out.
        scratch = min(mask.size, _ENCODE_CHUNK) + 1
        codes, escaped = np.empty(scratch, dtype=np.int8), np.empty(scratch, dtype=np.int16)
    for start in range(0, mask.size, _ENCODE_CHUNK):
        part = slice(start, start + _ENCODE_CHUNK)
        kept = mask[part]
        chunk = values[part].to(dtype)
        if fused:
            # One native pass packs the mask and codes the kept values (the same bytes).
            bits = np.ascontiguousarray(chunk.view(torch.int16).numpy())
            packed, count, outside = native.encode_16(
                kept, bits, _bits(base_values[part], dtype), codes, escaped
            )
            sections[0].append(packed)
            sections[1].append(codes[:count].copy())
            sections[2].append(escaped[:outside].copy())
            continue
        sections[0].append(np.packbits(kept))
        if dtype.itemsize == 2:
            # The bit differences of every element, then one compaction of the kept ones (the
            # costly step, 0.8 ns per element) by their indices, which also pick the few escaped
            # values whole: the differences outside -127 .. 127 (as unsigned, diff + 127 above
            # 254). No second pass over the chunk looks for them: 18 % less coding time.
            bits = chunk.view(torch.int16).numpy()
            diff = bits - _bits(base_values[part], dtype)  # wraps: decode wraps back
            kept_at = np.flatnonzero(kept)
            kept_diff = np.take(diff, kept_at)
            codes = kept_diff.astype(np.int8)  # wraps too: right where the difference fits
            escaped = np.flatnonzero(_outside_a_byte(kept_diff))
            codes[escaped] = _ESCAPE
            sections[1].append(codes)
            sections[2].append(bits[kept_at[escaped]])
        else:
            rows = chunk.view(torch.uint8).reshape(-1, dtype.itemsize).numpy()
            sections[1].append(np.compress(kept, rows, axis=0))
    header = {
        "shape": list(sparse.mask.shape),
        "count": sum(len(piece) for piece in sections[1]),  # a code or a row per kept element
        "dtype": DTYPE_NAMES[dtype],
        "factor": None if sparse.factor is None else struct.pack("<f", float(sparse.factor)).hex(),
        "sections": [sum(piece.nbytes for piece in pieces) for pieces in sections],
    }
    raw_header = json.dumps(header, sort_keys=True).encode()
    start = memoryview(b"".join((_MAGIC, struct.pack("<Q", len(raw_header)), raw_header)))
    return [start, *(memoryview(piece.reshape(-1).view(np.uint8)) for pieces in sections for piece in pieces)]


def decode(data: bytes, base: torch.Tensor) -> SparseDelta:
    """Inverse of `encode` (its pieces joined), given the same base (the blob's digest was
    checked before this is called).

    The expert comes back exact where the mask is set (the base's values
    elsewhere): in its storage dtype when that has 2 bytes, else as float32.
    """
    if not data.startswith(_MAGIC):
        raise ValueError("not a sparse delta blob")
    at = len(_MAGIC)
    (length,) = struct.unpack_from("<Q", data, at)
    at += 8
    header = json.loads(data[at : at + length])
    at += length
    sections = []
    for size in header["sections"]:
        sections.append(np.frombuffer(data, dtype=np.uint8, count=size, offset=at))
        at += size
    shape = tuple(header["shape"])
    n = math.prod(shape)
    mask = np.unpackbits(sections[0], count=n).view(bool)
    dtype = DTYPES[header["dtype"]]
    if dtype.itemsize == 2:
        full = _bits(base, dtype)
        full = full.copy() if base.dtype == dtype else full  # a view of the base is written below
        codes = sections[1].view(np.int8)
        bits = np.compress(mask, full) + codes  # wraps as encode did
        bits[codes == _ESCAPE] = sections[2].view(np.int16)
        np.place(full, mask, bits)
        expert = torch.from_numpy(full).view(dtype)
    else:
        raw = np.zeros((n, dtype.itemsize), dtype=np.uint8)
        if sections[1].size:
            np.place(raw, np.repeat(mask, dtype.itemsize), sections[1])
        # float32 values (a wider dtype holds float32 ones): `kept_delta` then subtracts in float32.
        expert = torch.from_numpy(raw.reshape(-1)).view(dtype).to(torch.float32)
    factor = header["factor"]
    scale = None if factor is None else torch.tensor(struct.unpack("<f", bytes.fromhex(factor))[0])
    return SparseDelta(torch.from_numpy(mask).reshape(shape), expert.reshape(shape), scale)


def _outside_a_byte(diff: np.ndarray) -> np.ndarray:
    """Which int16 differences lie outside -127 .. 127 (the escaped ones)."""
    return (diff + np.int16(127)).view(np.uint16) > 254


def _bits(base: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """The base in `dtype` as flat int16 bit patterns (a view when it is already in `dtype`)."""
    same = base if base.dtype == dtype else base.to(dtype)
    return same.reshape(-1).view(torch.int16).numpy()


#: The code of a kept value whose bit difference from the base does not fit in a byte.
_ESCAPE = -128
