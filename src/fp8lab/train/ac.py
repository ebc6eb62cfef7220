"""Activation checkpointing (train.activation_checkpoint): keep fewer of a block's activations
from forward to backward and recompute the rest in backward.

- none: autograd keeps everything it saves.
- full: each transformer block keeps only its inputs (the residual stream, the RoPE tables
  and the document mask); backward runs the block's forward once more, then its backward.
- selective: op-level, per block. Forward keeps the outputs of the ops in SAVED_OPS (matmuls,
  attention, FP8 scales' absolute maxima) and drops everything else; backward re-runs the
  block's forward with the kept outputs served from the cache, so only the cheap element-wise
  work is computed again (the RMSNorms, RoPE, SiLU and the gated product, the residual adds,
  the casts to FP8 or to the autocast dtype).

Blocks are wrapped in place by swapping each block's class for a subclass whose forward runs
the original one under `torch.utils.checkpoint.checkpoint` (non-reentrant): no wrapper module
is inserted, so parameter names and state_dict keys stay those of the plain model (checkpoints,
the converter, FSDP2 and telemetry address layers by name). FSDP2's `fully_shard` swaps the
class the same way and stacks on top; `block.compile()` traces the checkpointed forward, and
the compiler's partitioner then honours the same save/recompute choices. Order, as torchtitan:
precision conversion -> activation checkpointing -> compile -> FSDP2.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

_aten = torch.ops.aten


def _saved_ops() -> frozenset:
    """The ops whose outputs selective AC keeps. What runs in a Llama block (seen with a
    TorchDispatchMode on torch 2.13): every nn.Linear is aten.mm, plain or on TorchAO's
    Float8TrainingTensor (the FP8 matmul is dispatched as aten.mm on the subclass, which then
    calls aten._scaled_mm on GPU or upcasts and multiplies in fp32 under emulation; a traced
    graph may show the inner op, so it is listed too); attention is one fused SDPA op (the CPU
    flash kernel here; flash, memory-efficient or cuDNN on CUDA). aten.max / aten.amax are
    FP8's tensorwise / rowwise absolute maxima: one value per tensor or row, and keeping them
    saves a full read of the activation in the recompute (torchtitan keeps aten.max too).
    Not kept: SDPA's math fallback (composite, so the policy sees its pieces, not one op) is
    recomputed whole, which is correct but keeps nothing of attention."""
    names = ("mm.default", "addmm.default", "_scaled_mm.default", "max.default", "amax.default",
             "_scaled_dot_product_flash_attention_for_cpu.default", "_scaled_dot_product_flash_attention.default",
             "_scaled_dot_product_efficient_attention.default", "_scaled_dot_product_cudnn_attention.default")
    ops = []
    for name in names:  # an op a build lacks (e.g. cuDNN attention on some CPU wheels) is skipped
        packet, _, overload = name.partition(".")
        if hasattr(_aten, packet):
            ops.append(getattr(getattr(_aten, packet), overload))
    return frozenset(ops)


SAVED_OPS = _saved_ops()


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # MUST_SAVE / PREFER_RECOMPUTE, as torchtitan: eager recomputes every op not saved; the
    # compiler may still keep a recomputable intermediate when that is cheaper.
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy)


class _Checkpointed:
    """Mixed in before a block's own class: forward = the block's forward under checkpoint."""
    ac_mode: str

    def forward(self, *args, **kwargs):
        # Full AC passes no context_fn at all: under torch.compile a context_fn must return two
        # TorchDispatchModes (only checkpoint's own default may be a no-op).
        extra = {"context_fn": _selective_contexts} if self.ac_mode == "selective" else {}
        # preserve_rng_state=False: the blocks draw no random numbers (no dropout), so saving and
        # restoring the RNG state around the recompute would only cost time.
        return checkpoint(super().forward, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    # One subclass per block class (cached), so every block of a model shares it and dynamo sees
    # one forward to compile.
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})


def apply_activation_checkpointing(model: nn.Module, *, mode: str) -> int:
    """Checkpoint every block of `model.layers` in place with `mode` (AC_MODES); returns the
    number of blocks wrapped (0 for "none"). Call after precision conversion and before
    compile and FSDP2. Blocks keep their arguments (x, cos, sin, mask; the document mask may
    be None), names and state_dict keys."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; known: {', '.join(AC_MODES)}")
    if mode == "none":
        return 0
    blocks = list(model.layers.values())
    for block in blocks:
        if isinstance(block, _Checkpointed):
            raise ValueError(f"block {block.layer_id} is already activation-checkpointed ({block.ac_mode})")
        if getattr(block, "_compiled_call_impl", None) is not None or isinstance(block, FSDPModule):
            # compile would have traced the plain forward; FSDP2's class swap would sit below ours
            raise ValueError("apply activation checkpointing before compile and FSDP2")
        block.__class__ = _checkpointed_class(type(block))
        block.ac_mode = mode
    return len(blocks)


def checkpointed_mode(block: nn.Module) -> str:
    """The AC mode a block runs with ("none" when it is not wrapped)."""
    return block.ac_mode if isinstance(block, _Checkpointed) else "none"


def ac_note(mode: str) -> str:
    """One line for the run's notes."""
    if mode == "full":
        return "activation checkpointing: full (each block keeps its input and is recomputed in backward)"
    if mode == "selective":
        return ("activation checkpointing: selective (each block keeps its matmul and attention outputs; norms, "
                "RoPE, SiLU, the gated product and casts are recomputed in backward)")
    return "activation checkpointing: none"
