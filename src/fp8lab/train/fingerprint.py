"""Fingerprints that let a comparison check, not assume, that its runs started from the
same weights and trained on the same batches."""

from __future__ import annotations

import hashlib
import zlib

import torch
from torch import nn

from fp8lab.precision.convert import to_plain


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter's name and fp32 bytes, in name order. Recipes wrap
    weights differently, so the plain tensor inside each wrapper is what is hashed: two
    runs that start from the same weights agree whatever their recipe. Copies every
    parameter to the host once: meant for the start of a run, not every step."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = to_plain(p).detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t  # FSDP2: the whole weight (every rank calls this)
        h.update(name.encode())
        h.update(t.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def batch_crc(batches: list[tuple[torch.Tensor, ...]]) -> int:
    """crc32 of a step's inputs and targets (host tensors, so no device sync): cheap
    enough for every step, and enough to tell two data orders apart. Document ids follow
    from the data, so they are left out: a run with and without the mask reads the same data."""
    crc = 0
    for x, y, *_ in batches:
        crc = zlib.crc32(x.numpy().tobytes(), crc)
        crc = zlib.crc32(y.numpy().tobytes(), crc)
    return crc
