"""A sparsified task vector of one expert, and its compact cached form.

Per-expert work of the sparsifying methods (which elements of delta_i survive,
and the L1 rescale factor) does not depend on the other experts, the weights or
lambda, so it is cached on its own: a rebuild after swapping one expert or
changing a coefficient reuses it. The cached form is a bitmask plus the kept
values of the expert in its storage dtype, coded against the base (delta =
expert - base is recomputed from the base, which the merge reads anyway), so it
is a fraction of the expert's size (see `encode`).

The fresh and the cached path produce the kept delta with the same elementwise
expression, `where(mask, expert - base, 0) * factor`, so a rebuild is bit-identical
to a build from an empty cache.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from mergebuild.safetensors_io import DTYPE_NAMES, DTYPES

_MAGIC = b"MBSD2\n"


@dataclass(frozen=True)
class SparseDelta:
    """Which elements of an expert's delta are kept, the expert's values there, and the rescale factor."""

    mask: torch.Tensor  # bool, the tensor's shape
    #: float32, the tensor's shape: the expert's values where `mask` is set (elsewhere unspecified).
    expert: torch.Tensor
    factor: torch.Tensor | None  # float32 0-d L1 rescale factor, or None

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """The kept delta (float32) against `base`, the same base the mask was made with."""
        return kept_delta(self.mask, self.expert, base, self.factor)


def kept_delta(
    mask: torch.Tensor, expert: torch.Tensor, base: torch.Tensor, factor: torch.Tensor | None
) -> torch.Tensor:
    """where(mask, expert - base, 0), times the rescale factor: the one expression both paths use."""
    kept = torch.where(mask, expert - base, torch.zeros((), dtype=torch.float32))
    return kept * factor if factor is not None else kept


def encode(sparse: SparseDelta, base: torch.Tensor, dtype: torch.dtype) -> bytes:
    """The blob form: header, the mask, and the kept values in `dtype` (the expert's storage dtype).

    For 2-byte dtypes the kept values are coded against the base: a fine-tune
    moves a weight by a few units in the last place, so the difference of the
    two bit patterns (wrapping 16-bit integers) almost always fits in a signed
    byte; those bytes are zlib-compressed, and the rare value that does not fit
    is stored whole. On a bf16 fine-tune this takes a kept value from 2 bytes to
    about 0.8. The mask is zlib-compressed too. `base` (float32) is the base the
    mask was made with; `decode` needs the same one.
    """
    flat_mask = sparse.mask.reshape(-1)
    sections = [zlib.compress(np.packbits(flat_mask.numpy()).tobytes(), 1)]
    if dtype.itemsize == 2:
        bits = sparse.expert.reshape(-1).to(dtype).view(torch.int16)
        diff = bits - base.reshape(-1).to(dtype).view(torch.int16)  # wraps: decode wraps back
        small = (diff >= -127) & (diff <= 127)
        codes = torch.where(small, diff, _ESCAPE).to(torch.int8)[flat_mask]
        escapes = bits[flat_mask & ~small]
        sections += [zlib.compress(codes.numpy().tobytes(), 1), escapes.numpy().tobytes()]
    else:
        sections.append(sparse.expert.reshape(-1)[flat_mask].to(dtype).view(torch.uint8).numpy().tobytes())
    header = {
        "shape": list(sparse.mask.shape),
        "count": int(flat_mask.sum()),
        "dtype": DTYPE_NAMES[dtype],
        "factor": None if sparse.factor is None else struct.pack("<f", float(sparse.factor)).hex(),
        "sections": [len(section) for section in sections],
    }
    raw_header = json.dumps(header, sort_keys=True).encode()
    return b"".join((_MAGIC, struct.pack("<Q", len(raw_header)), raw_header, *sections))


def decode(data: bytes, base: torch.Tensor) -> SparseDelta:
    """Inverse of `encode`, given the same base (the blob's digest was checked before this is called)."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a sparse delta blob")
    at = len(_MAGIC)
    (length,) = struct.unpack_from("<Q", data, at)
    at += 8
    header = json.loads(data[at : at + length])
    at += length
    sections = []
    for size in header["sections"]:
        sections.append(data[at : at + size])
        at += size
    shape = tuple(header["shape"])
    n = int(np.prod(shape)) if shape else 1
    packed = np.frombuffer(zlib.decompress(sections[0]), dtype=np.uint8)
    flat_mask = torch.from_numpy(np.unpackbits(packed, count=n).astype(bool))
    dtype = DTYPES[header["dtype"]]
    if dtype.itemsize == 2:
        codes = torch.zeros(n, dtype=torch.int8)
        kept = torch.frombuffer(bytearray(zlib.decompress(sections[1])), dtype=torch.int8)
        codes.masked_scatter_(flat_mask, kept)
        bits = base.reshape(-1).to(dtype).view(torch.int16) + codes  # wraps as encode did
        if sections[2]:
            escaped = flat_mask & (codes == _ESCAPE)
            bits.masked_scatter_(escaped, torch.frombuffer(bytearray(sections[2]), dtype=torch.int16))
        expert = bits.view(dtype).to(torch.float32)
    else:
        expert = torch.zeros(n, dtype=torch.float32)
        raw = bytearray(sections[1])
        if raw:
            expert.masked_scatter_(flat_mask, torch.frombuffer(raw, dtype=dtype).to(torch.float32))
    factor = header["factor"]
    scale = None if factor is None else torch.tensor(struct.unpack("<f", bytes.fromhex(factor))[0])
    return SparseDelta(flat_mask.reshape(shape), expert.reshape(shape), scale)


#: The code of a kept value whose bit difference from the base does not fit in a byte.
_ESCAPE = -128
