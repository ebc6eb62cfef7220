"""One optimizer step, as a function of the built pieces: the trainer runs it, and
`fp8lab bench` times it, so the benchmark measures the step that trains.

It reads top to bottom: micro-batches, loss, backward, clip, optimizer step. One
device-to-host transfer carries the loss and the gradient norm; nothing else syncs.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from fp8lab.config import JobConfig
from fp8lab.data.loader import IGNORE_INDEX  # padding targets, made by the loader
from fp8lab.train.build import Built
from fp8lab.train.schedule import lr_at


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    stepped: bool  # False: a non-finite loss or norm skipped the optimizer step


def finite_or_none(x: float) -> float | None:
    """x, or None when it is NaN or infinite (JSON has neither)."""
    return x if math.isfinite(x) else None


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: torch's peak allocated on `device`. CPU: the process's peak resident set
    (ru_maxrss, KiB on Linux), Python and torch included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def token_loss(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction,
                           ignore_index=IGNORE_INDEX)


def model_loss(model, x: torch.Tensor, y: torch.Tensor, *, chunk_tokens: int = 0) -> torch.Tensor:
    """Summed token cross-entropy of `model` on inputs `x`, targets `y`.

    chunk_tokens > 0: the output layer and the loss run that many tokens at a time, each chunk
    under activation checkpointing, so the fp32 (tokens x vocab) logits and their gradient
    never exist whole (8.4 GB each for 16K tokens of a 128K vocabulary); the price is the
    output layer's forward once more in backward. 0: the plain way, one logits tensor."""
    if not chunk_tokens:
        return token_loss(model(x), y)
    h, t = model.hidden_states(x).flatten(0, 1), y.flatten()
    total = torch.zeros((), device=h.device)
    for start in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[start:start + chunk_tokens], t[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hc, tc, model.output, use_reentrant=False)
        else:  # evaluation: nothing is kept for a backward anyway
            total = total + _chunk_loss(hc, tc, model.output)
    return total


def _chunk_loss(h: torch.Tensor, t: torch.Tensor, output: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(output(h).float(), t, reduction="sum", ignore_index=IGNORE_INDEX)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned, so the copy overlaps with compute
        return t.pin_memory().to(device, non_blocking=True)
    return t


def refresh_fp8_gather_scales(b: Built) -> None:
    """With FP8 all-gather, compute every weight's scale once, from its current values (one
    all-reduce of the amaxes), instead of per weight per gather: after each optimizer step,
    and whenever weights were (re)loaded."""
    if b.float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(b.model)


def fp8_gathered_weights(model: torch.nn.Module) -> int:
    """How many parameters FSDP2 gathers in FP8 (shards around TorchAO's weight wrapper)."""
    return sum(type(getattr(p, "_local_tensor", None)).__name__ == "WeightWithDynamicFloat8CastTensor"
               for p in model.parameters())


def train_step(b: Built, cfg: JobConfig, step: int, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
               drill: float = 1.0) -> StepResult:
    """One optimizer step on `batches` (host tensors). `drill` multiplies the first
    micro-batch's loss (fault drills: NaN, or a spike factor), so the real backward and
    guard paths see it."""
    # Normalise by the loss tokens of *all* micro-batches, counted on the host, so
    # accumulating 4 x 8 sequences gives the gradient of one batch of 32.
    n_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
    scale = None
    if b.dist.active:
        # Over ranks, by the tokens of *all* ranks' batches (padding makes them differ): FSDP2
        # averages the gradients over the ranks, hence the factor world_size. The count stays on
        # the device, so this adds a collective, not a host sync.
        n_all = torch.tensor(float(n_tokens), device=b.device, dtype=torch.float64)
        dist.all_reduce(n_all)
        scale = (b.dist.world_size / n_all).float()
    loss_sum = torch.zeros((), device=b.device)
    for i, (x, y) in enumerate(batches):
        x, y = to_device(x, b.device), to_device(y, b.device)
        with b.autocast():
            loss = model_loss(b.model, x, y, chunk_tokens=cfg.train.loss_chunk_tokens)
            loss = loss / n_tokens if scale is None else loss * scale
        if i == 0 and drill != 1.0:
            loss = loss * drill
        loss.backward()
        loss_sum += loss.detach()
    max_norm = cfg.optim.grad_clip or float("inf")  # inf: measure without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(b.model.parameters(), max_norm, foreach=True)
    if b.dist.active:
        # Sharded gradients give a DTensor norm (reduced over the ranks); each rank's loss is its
        # share x world_size, so the mean over ranks is the loss of the global batch, the same
        # number on every rank, for every rank's guard.
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
        loss_sum = loss_sum / b.dist.world_size
    loss_val, norm_val = torch.stack([loss_sum, grad_norm.to(loss_sum.device)]).tolist()  # the one sync
    lr = lr_at(step, cfg=cfg.optim, total_steps=cfg.train.steps)
    stepped = (math.isfinite(loss_val) and math.isfinite(norm_val)) or not cfg.guard.skip_nonfinite
    if stepped:
        for group in b.optimizer.param_groups:
            group["lr"] = lr
        b.optimizer.step()
        refresh_fp8_gather_scales(b)
    b.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_val, grad_norm=norm_val, lr=lr, stepped=stepped)
