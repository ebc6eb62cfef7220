"""The loss head: final hidden states -> summed token cross-entropy (train.loss_head).

* plain: the output layer on every token at once, cross-entropy on the fp32 logits. For 16K
  tokens of a 128K vocabulary that is 4 GB of bf16 logits, 8 GB of fp32 ones, and as much again
  for each gradient: the largest tensors of the step, and ~10 memory-bound passes over them.
* checkpointed: the same, `chunk_tokens` at a time under activation checkpointing: the full
  logits never exist, but backward runs the output GEMM again.
* fused: one autograd function that, chunk by chunk, computes the logits, the loss, and the
  gradient of the logits (softmax - one-hot, on the raw logits), and at once the two backward
  GEMMs (grad of the hidden states and of the weight); backward only scales what forward left.
  Three GEMMs, as plain has; no fp32 logits, no recompute; the chunk's logits die inside forward.
  The price: grad of the weight (vocab x dim, fp32) is held from the end of forward to the start
  of backward, which come one right after the other. Liger-Kernel's FusedLinearCrossEntropy and
  Apple's cut cross-entropy do the same; this one is plain PyTorch, its softmax pass compiled.

All three give the same loss and gradients up to summation order (tests/test_loss_head.py).
The fused head needs the output layer to be a plain nn.Linear: an FP8 output layer computes its
own GEMMs and gradients (precision.skip_modules without "output"), so it takes plain or checkpointed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # torch cross_entropy's default: targets that carry no loss (padding, prompts)
HEADS = ("fused", "plain", "checkpointed")
# Default chunk, in logits. Compiled (CUDA), the softmax pass keeps its fp32 values in registers: a
# chunk holds its bf16 logits and their bf16 gradient, so 512M logits (2 GB) is affordable, and fewer
# chunks mean fewer fp32 read-add-writes of the weight's gradient (10 bytes per element per chunk).
# Eager (CPU), the pass makes ~4 fp32 temporaries per logit (measured ~20 bytes per logit with fp32
# logits): 64M logits keep that near 1.3 GB.
CHUNK_LOGITS = {"compiled": 1 << 29, "eager": 1 << 26}


def resolve_head(setting: str, *, compiled_cuda: bool, output_converted: bool = False,
                 chunk_tokens: int = 0) -> str:
    """train.loss_head as it runs. `auto`: fused where its softmax pass is compiled (CUDA with
    precision.compile); else checkpointed when train.loss_chunk_tokens asks for chunks, plain when
    not: on CPU that pass runs eagerly and was measured slower than plain (benchmarks/results/
    2026-12-01-cpu-loss-head.md). An FP8 output layer (`output_converted`) computes its own GEMMs,
    which the fused head cannot: auto then takes plain or checkpointed; an explicit fused is refused."""
    if setting == "fused" and output_converted:
        raise ValueError("train.loss_head=fused computes the output layer's GEMMs itself, but the recipe "
                         "converted it (precision.skip_modules lacks 'output'): set --train.loss_head=plain (or "
                         "checkpointed) for an FP8 output layer, or keep 'output' in precision.skip_modules")
    if setting != "auto":
        return setting
    if compiled_cuda and not output_converted:
        return "fused"
    return "checkpointed" if chunk_tokens else "plain"


def chunk_size(chunk_tokens: int, vocab: int, tokens: int, *, compiled: bool = True) -> int:
    """Tokens per chunk: at most `chunk_tokens`, or (0) as many as keep a chunk's logits at
    CHUNK_LOGITS; the chunks made equal, so a compiled pass sees one shape (16K tokens of a 128K
    vocabulary: 4 x 4,096, not 3 x 4,185 and a 3,829)."""
    most = max(1, min(tokens, chunk_tokens or CHUNK_LOGITS["compiled" if compiled else "eager"] // vocab))
    n = -(-tokens // most)
    return -(-tokens // n)


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, its gradient with respect to `logits`, in their dtype) of one chunk.
    Pure element-wise work and two row reductions over the logits: torch.compile makes it one
    or two passes (reads of the logits) and one write of the gradient."""
    lf = logits.float()
    valid = targets != IGNORE_INDEX
    target = torch.where(valid, targets, 0)
    lse = torch.logsumexp(lf, dim=-1)
    picked = lf.gather(1, target[:, None]).squeeze(1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    onehot = torch.arange(lf.shape[1], device=lf.device)[None, :] == target[:, None]
    grad = torch.where(valid[:, None], torch.exp(lf - lse[:, None]) - onehot.float(), 0.0)
    return loss, grad.to(logits.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk, grad_fn):
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen here, explicitly
            x, w = h.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            # fp32 accumulator over chunks: each chunk's bf16 GEMM result is rounded once, then summed
            # in fp32 (plain rounds its one GEMM's result once).
            grad_w = None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, x.shape[0], chunk):
                xc = x[s:s + chunk]
                loss, g = grad_fn(xc @ w.t(), targets[s:s + chunk])
                total += loss
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[s:s + chunk])
                if ctx.needs_input_grad[1]:
                    part = g.t() @ xc
                    grad_w = part.float() if grad_w is None else grad_w.add_(part)  # add_ upcasts in the kernel
        ctx.h_dtype, ctx.w_dtype, ctx.spent = h.dtype, weight.dtype, False
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # The gradients were computed for d(loss) = 1; the real one (1 / tokens, a drill's factor)
        # is a scalar, applied here in place: one pass over each, no GEMM, no second vocab x dim
        # fp32 tensor. In place means once: a second backward (retain_graph) would scale twice.
        if ctx.spent:
            raise RuntimeError("the fused loss head's backward runs once (no retain_graph); use "
                               "train.loss_head=plain to backpropagate through the loss twice")
        ctx.spent = True
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h.mul_(grad_total).to(ctx.h_dtype)
        gw = None if grad_w is None else grad_w.mul_(grad_total).to(ctx.w_dtype)
        return gh, gw, None, None, None, None


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the output layer's GEMM runs in: autocast's, else the operands' own."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def head_loss(h: torch.Tensor, output: nn.Linear, targets: torch.Tensor, *, head: str = "plain",
              chunk_tokens: int = 0, grad_fn: Callable | None = None) -> torch.Tensor:
    """Summed cross-entropy of `output(h)` against `targets` (IGNORE_INDEX carries no loss).
    h (N, dim), targets (N,). `grad_fn`: softmax_grad or a compiled copy of it (fused head)."""
    if head == "plain":
        return F.cross_entropy(output(h).float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
    if head not in HEADS:
        raise ValueError(f"unknown loss head {head!r}: choose one of {', '.join(HEADS)}")
    chunk = chunk_size(chunk_tokens, output.out_features, h.shape[0], compiled=grad_fn is not None)
    training = torch.is_grad_enabled() and (h.requires_grad or output.weight.requires_grad)
    if head == "fused" and training:
        if type(output) is not nn.Linear or output.bias is not None:
            raise ValueError(f"the fused loss head needs a plain bias-free nn.Linear output layer, not "
                             f"{type(output).__name__}; use the plain or checkpointed head")
        return _FusedLinearCrossEntropy.apply(h, output.weight, targets, _compute_dtype(h, output.weight), chunk,
                                              grad_fn or softmax_grad)
    total = torch.zeros((), device=h.device)
    for s in range(0, h.shape[0], chunk):
        hc, tc = h[s:s + chunk], targets[s:s + chunk]
        if training:  # checkpointed: keep only the chunk's input; backward runs the output layer again
            total = total + checkpoint(_chunk_loss, hc, tc, output, use_reentrant=False)
        else:  # evaluation: nothing is kept for a backward anyway
            total = total + _chunk_loss(hc, tc, output)
    return total


def _chunk_loss(h: torch.Tensor, t: torch.Tensor, output: nn.Module) -> torch.Tensor:
    return F.cross_entropy(output(h).float(), t, reduction="sum", ignore_index=IGNORE_INDEX)
