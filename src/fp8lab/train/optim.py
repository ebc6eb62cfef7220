"""AdamW with decay / no-decay groups, and its state made explicit for checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, device: torch.device) -> torch.optim.AdamW:
    """Matrices (linears, embeddings) decay; vectors (norm gains) do not: decaying a norm's
    gain toward zero fights the normalisation (nanoGPT, torchtitan)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() already yields a tied weight once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused AdamW is one kernel for all parameters on CUDA; elsewhere torch picks. Tensor
    # subclasses (MXFP8 weights) are not supported by the fused kernel.
    def local(p):  # FSDP2 shards are DTensors around plain tensors, which fused AdamW takes
        return p._local_tensor if hasattr(p, "_local_tensor") else p.data

    plain = all(type(local(p)) is torch.Tensor for p in decay + no_decay)
    fused = device.type == "cuda" and plain
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None,
    )


def init_optimizer_state(opt: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state (zeros) before the first step, so a checkpoint
    can be loaded into it in place. Mirrors torch.optim.AdamW's own lazy initialisation:
    a scalar `step` (on the parameter's device when fused), and fp32 moments shaped like
    the parameter."""
    for group in opt.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
