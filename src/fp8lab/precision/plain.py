"""TorchAO's training tensor subclasses, told apart and unwrapped.

Under MXFP8 (and FSDP2 with FP8 all-gather) TorchAO wraps each converted weight in a tensor
subclass. Checkpoints, fingerprints and telemetry want the plain fp32 master inside: this
module finds it, sharing storage, so a checkpoint written under one recipe loads under any.
"""

from __future__ import annotations

import torch
from torch import nn


def is_torchao_subclass(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and type(t).__module__.startswith("torchao")


def to_plain(t: torch.Tensor) -> torch.Tensor:
    """The high-precision tensor inside a TorchAO training subclass (MXFP8 weight wrapper,
    float8 all-gather weight), sharing its storage; other tensors (DTensor included) as is.
    Checkpoints hold plain tensors so they load under any recipe.
    """
    t = t.data if isinstance(t, nn.Parameter) else t
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) and is_torchao_subclass(t._local_tensor):
        # FSDP2 with FP8 all-gather: a shard whose local tensor is TorchAO's weight wrapper.
        return DTensor.from_local(to_plain(t._local_tensor), t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    while is_torchao_subclass(t):
        inner, _ = t.__tensor_flatten__()
        if len(inner) != 1:
            raise TypeError(f"cannot unwrap {type(t).__name__}: it holds {inner}")
        t = getattr(t, inner[0])
    return t
