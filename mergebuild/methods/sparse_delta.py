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
    """Which elements of an expert's delta are kept, their expert values, and the rescale factor."""

    mask: torch.Tensor  # bool, the tensor's shape
    values: torch.Tensor  # float32, 1-D: the expert's values where mask is set, in flat order
    factor: torch.Tensor | None  # float32 0-d L1 rescale factor, or None

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """The kept delta (float32) against `base`, the same base the mask was made with."""
        expert = torch.zeros(base.shape, dtype=torch.float32)
        expert.masked_scatter_(self.mask, self.values)
        return kept_delta(self.mask, expert, base, self.factor)


def kept_delta(
    mask: torch.Tensor, expert: torch.Tensor, base: torch.Tensor, factor: torch.Tensor | None
) -> torch.Tensor:
    """where(mask, expert - base, 0), times the rescale factor: the one expression both paths use."""
    kept = torch.where(mask, expert - base, torch.zeros((), dtype=torch.float32))
    return kept * factor if factor is not None else kept


def l1_factor(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
    """The factor that gives `kept` the L1 norm of `delta`; None when either norm is below 1e-7."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return None
    return before / after


def encode(sparse: SparseDelta, base: torch.Tensor, dtype: torch.dtype) -> bytes:
    """The blob form: header, the mask, and the kept values in `dtype` (the expert's storage dtype).

    For 2-byte dtypes the kept values are coded against the base: a fine-tune
    moves a weight by a few units in the last place, so the difference of the
    two bit patterns (as integers) almost always fits in a signed byte; those
    bytes are zlib-compressed, and the rare value that does not fit is stored
    whole. On a bf16 fine-tune this takes a kept value from 2 bytes to about
    0.8. The mask is zlib-compressed too. `base` (float32) is the base the mask
    was made with; `decode` needs the same one.
    """
    flat_mask = sparse.mask.reshape(-1)
    values = sparse.values.to(dtype)
    if not torch.equal(values.to(torch.float32), sparse.values):
        raise AssertionError("kept values are not representable in the expert's dtype")
    sections = [zlib.compress(np.packbits(flat_mask.numpy()).tobytes(), 1)]
    if dtype.itemsize == 2:
        bits = values.view(torch.int16)
        diff = bits.to(torch.int32) - base.reshape(-1)[flat_mask].to(dtype).view(torch.int16).to(torch.int32)
        small = (diff >= -127) & (diff <= 127)
        codes = torch.where(small, diff, _ESCAPE).to(torch.int8)
        sections += [zlib.compress(codes.numpy().tobytes(), 1), bits[~small].numpy().tobytes()]
    else:
        sections.append(values.view(torch.uint8).numpy().tobytes())
    header = {
        "shape": list(sparse.mask.shape),
        "count": int(values.numel()),
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
    mask = torch.from_numpy(np.unpackbits(packed, count=n).astype(bool)).reshape(shape)
    dtype = DTYPES[header["dtype"]]
    if dtype.itemsize == 2:
        codes = torch.frombuffer(bytearray(zlib.decompress(sections[1])), dtype=torch.int8).to(torch.int32)
        bits = base.reshape(-1)[mask.reshape(-1)].to(dtype).view(torch.int16).to(torch.int32) + codes
        escaped = codes == _ESCAPE
        if sections[2]:
            bits[escaped] = torch.frombuffer(bytearray(sections[2]), dtype=torch.int16).to(torch.int32)
        values = bits.to(torch.int16).view(dtype)
    else:
        raw = bytearray(sections[1])
        values = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    factor = header["factor"]
    scale = None if factor is None else torch.tensor(struct.unpack("<f", bytes.fromhex(factor))[0])
    return SparseDelta(mask, values.to(torch.float32), scale)


#: The code of a kept value whose bit difference from the base does not fit in a byte.
_ESCAPE = -128
