"""One optimizer step, as a function of the built pieces: the trainer runs it, and
`fp8lab bench` times it, so the benchmark measures the step that trains.

It reads top to bottom: micro-batches, loss, backward, clip, optimizer step. One
device-to-host transfer carries the loss and the gradient norm; nothing else syncs. With fused
AdamW (train.deferred_sync) that transfer comes after the optimizer step is queued: a non-finite
loss or norm skips the step on the device (found_inf), so the GPU does not idle while the host
waits for the figures and then prepares the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fp8lab.config import JobConfig
from fp8lab.data.loader import IGNORE_INDEX  # padding targets, made by the loader
from fp8lab.precision.fsdp import post_optimizer_hook
from fp8lab.train.build import RunParts
from fp8lab.train.schedule import lr_at


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    stepped: bool  # False: a non-finite loss or norm skipped the optimizer step
    stop: bool = False  # a stop signal reached this process, or (under torchrun) any rank


def finite_or_none(x: float) -> float | None:
    """x, or None when it is NaN or infinite (JSON has neither)."""
    return x if math.isfinite(x) else None


def token_loss(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction,
                           ignore_index=IGNORE_INDEX)


def model_loss(model, x: torch.Tensor, y: torch.Tensor, *, docs: torch.Tensor | None = None, head: str = "plain",
               chunk_tokens: int = 0, grad_fn=None) -> torch.Tensor:
    """Summed token cross-entropy of `model` on inputs `x`, targets `y`; with `docs` (B, T),
    each position attends only within its own document (data.document_mask). `head`,
    `chunk_tokens`: the loss head (models/head.py; train.loss_head, train.loss_chunk_tokens);
    `grad_fn`: the fused head's softmax pass, compiled (RunParts.loss_grad_fn)."""
    return model(x, docs, y, head=head, chunk_tokens=chunk_tokens, grad_fn=grad_fn)


def run_loss(parts: RunParts, cfg: JobConfig, x: torch.Tensor, y: torch.Tensor,
             docs: torch.Tensor | None = None) -> torch.Tensor:
    """model_loss as this run computes it (its loss head, chunking and compiled pieces)."""
    return model_loss(parts.model, x, y, docs=docs, head=parts.loss_head, chunk_tokens=cfg.train.loss_chunk_tokens,
                      grad_fn=parts.loss_grad_fn)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned, so the copy overlaps with compute
        return t.pin_memory().to(device, non_blocking=True)
    return t


def device_batch(batch: tuple[torch.Tensor, ...], device: torch.device):
    """(inputs, targets, docs or None) on `device`, from a loader batch of 2 or 3 tensors."""
    x, y, *rest = batch
    docs = to_device(rest[0], device) if rest else None
    return to_device(x, device), to_device(y, device), docs


def train_step(parts: RunParts, cfg: JobConfig, step: int, batches: list[tuple[torch.Tensor, ...]], *,
               drill: float = 1.0, stop_requested: bool = False) -> StepResult:
    """One optimizer step of `parts` on `batches` (host tensors: inputs, targets and, with
    data.document_mask, document ids). `drill` multiplies the first
    micro-batch's loss (fault drills: NaN, or a spike factor), so the real backward and
    guard paths see it. `stop_requested`: this process was asked to stop (preempt.py); under
    torchrun the request rides on the loss all-reduce, so every rank learns it at this step."""
    # Normalise by the loss tokens of *all* micro-batches, counted on the host, so
    # accumulating 4 x 8 sequences gives the gradient of one batch of 32.
    n_tokens = sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in batches)
    scale = None
    if parts.dist.active:
        # Over ranks, by the tokens of *all* ranks' batches (padding makes them differ): FSDP2
        # averages the gradients over the ranks, hence the factor world_size. The count stays on
        # the device, so this adds a collective, not a host sync.
        n_all = torch.tensor(float(n_tokens), device=parts.device, dtype=torch.float64)
        dist.all_reduce(n_all)
        scale = (parts.dist.world_size / n_all).float()
    loss_sum = torch.zeros((), device=parts.device)
    # FSDP2: one reduce-scatter per step, not per micro-batch. Each rank keeps the whole (fp32)
    # gradient over the micro-batches and the last backward reduces their sum (the losses are
    # scaled alike either way); parallel.reduce_every_micro_batch trades that memory back.
    no_sync = isinstance(parts.model, FSDPModule) and not cfg.parallel.reduce_every_micro_batch
    for i, batch in enumerate(batches):
        if no_sync:
            parts.model.set_requires_gradient_sync(i == len(batches) - 1)
        x, y, docs = device_batch(batch, parts.device)
        with parts.autocast():
            loss = run_loss(parts, cfg, x, y, docs)
            loss = loss / n_tokens if scale is None else loss * scale
        if i == 0 and drill != 1.0:
            loss = loss * drill
        loss.backward()
        loss_sum += loss.detach()
    max_norm = cfg.optim.grad_clip or float("inf")  # inf: measure without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), max_norm, foreach=True)
    stops = []
    if parts.dist.active:
        # Sharded gradients give a DTensor norm (reduced over the ranks); each rank's loss is its
        # share x world_size, so the mean over ranks is the loss of the global batch, the same
        # number on every rank, for every rank's guard. The same collective counts the ranks
        # asked to stop.
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        both = torch.stack([loss_sum, torch.full((), float(stop_requested), device=parts.device)])
        dist.all_reduce(both)  # SUM: gloo has no AVG
        loss_sum, stops = both[0] / parts.dist.world_size, [both[1]]
    figures = torch.stack([loss_sum, grad_norm.to(loss_sum.device), *stops])
    lr = lr_at(step, cfg=cfg.optim, total_steps=cfg.train.steps)
    opt = parts.optimizer
    deferred = cfg.train.deferred_sync and _fused_adamw(opt)
    if deferred:
        _set_lr(opt, lr)
        if cfg.guard.skip_nonfinite:
            # Fused AdamW reads `found_inf` (as under AMP's GradScaler): when it is 1, neither the
            # weights, the moments nor the step count change, as if step() had not been called.
            opt.found_inf = (~torch.isfinite(figures[:2]).all()).float()
        try:
            opt.step()
        finally:  # never left for a later step() (e.g. after an out-of-memory here) to read
            opt.found_inf = None
    loss_val, norm_val, *stop = figures.tolist()  # the one sync
    stepped = (math.isfinite(loss_val) and math.isfinite(norm_val)) or not cfg.guard.skip_nonfinite
    if stepped and not deferred:
        _set_lr(opt, lr)
        opt.step()
    if stepped:
        post_optimizer_hook(parts.model, parts.report)
    opt.zero_grad(set_to_none=True)
    return StepResult(loss=loss_val, grad_norm=norm_val, lr=lr, stepped=stepped,
                      stop=stop[0] > 0 if stop else stop_requested)


def describe_step(parts: RunParts, cfg: JobConfig) -> str:
    """The step's fast-path switches as they resolved here, for the run's header."""
    head = f"loss head {parts.loss_head}" + (" (softmax pass compiled)" if parts.loss_grad_fn else "")
    fused = _fused_adamw(parts.optimizer)
    sync = ("loss and norm read after the optimizer step is queued" if cfg.train.deferred_sync and fused
            else "loss and norm read before the optimizer step")
    residual = "" if parts.model.residual_dtype is None else f", residual stream {str(parts.model.residual_dtype)[6:]}"
    return f"{head}; {'fused AdamW' if fused else cfg.optim.name}; {sync}{residual}"


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _fused_adamw(opt: torch.optim.Optimizer) -> bool:
    """torch's fused AdamW: the one optimizer here that can skip a step on the device."""
    return isinstance(opt, torch.optim.AdamW) and all(g.get("fused") for g in opt.param_groups)
