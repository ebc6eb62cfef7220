"""Training memory, predicted from the model's shape and measured from the real tensors.

`predict_memory` adds up, per rank, the bytes a training step holds at its peak: fp32 master
weights, fp32 gradients, the optimizer's state, the low-precision weight copies kept from
forward to backward, the activations autograd saves (by activation-checkpointing mode) and the
logits. `measure_peak` runs a step under torch's memory profiler and returns the peak of the
live tensors by the same parts (on CPU and CUDA alike: a sum of tensor bytes, not RSS or the
allocator's reserve), which is what the prediction is checked against.

The per-block activation counts follow the autograd graph of models/llama.py: what each op saves
for backward, with storages shared between ops counted once (`tests/test_memory_model.py`
measures them on CPU). Excluded: the CUDA context, allocator fragmentation and workspaces,
compile's own buffers, communication buffers.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from fp8lab.models.flops import param_counts
from fp8lab.models.head import chunk_size
from fp8lab.models.llama import ModelArgs
from fp8lab.precision.recipes import get_recipe

# Optimizer state bytes per parameter. TorchAO's low-bit AdamW quantizes a tensor of at least
# LOWBIT_MIN_SIZE values that divides into whole blocks, with one fp32 scale per block; the
# others (norm gains, small matrices) keep fp32 moments. (Under FSDP2 the rule applies to shards.)
OPTIMIZERS = ("adamw", "adamw-bf16", "adamw-8bit", "adamw-fp8", "adamw-4bit")
LOWBIT = {"adamw-8bit": (1, 256), "adamw-fp8": (1, 256), "adamw-4bit": (0.5, 128)}  # bytes/value, block size
LOWBIT_MIN_SIZE = 4096
AC_MODES = ("none", "full", "selective")
PARTS = ("parameters", "gradients", "optimizer state", "low-precision weight copies", "activations", "logits")


@dataclass
class MemoryPlan:
    """Predicted bytes at the step's peak, per rank, by part (PARTS), and their sum."""

    parts: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def gb(self) -> dict[str, float]:
        return {k: round(v / 1e9, 3) for k, v in self.parts.items()}


def _matrices(args: ModelArgs) -> list[tuple[str, int]]:
    """(name, numel) of every weight tensor, the way an optimizer sees them (a tied weight once)."""
    d, f, kv, L = args.dim, args.ffn_dim, args.n_kv_heads * args.head_dim, args.n_layers
    out = [("tok_embeddings", args.vocab_size * d)]
    for _ in range(L):
        out += [("wq", d * d), ("wk", d * kv), ("wv", d * kv), ("wo", d * d), ("w1", d * f), ("w3", d * f),
                ("w2", f * d), ("attention_norm", d), ("ffn_norm", d)]
    out.append(("norm", d))
    if not args.tie_embeddings:
        out.append(("output", args.vocab_size * d))
    return out


def optimizer_bytes(args: ModelArgs, optimizer: str) -> float:
    """Bytes of AdamW's two moments for every parameter (the step counters are negligible)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    total = 0.0
    for _, n in _matrices(args):
        if optimizer == "adamw" or (optimizer in LOWBIT and (n < LOWBIT_MIN_SIZE or n % LOWBIT[optimizer][1])):
            total += 8 * n
        elif optimizer == "adamw-bf16":
            total += 4 * n
        else:
            per, block = LOWBIT[optimizer]
            total += 2 * (per * n + 4 * -(-n // block))
    return total


def block_activation_bytes(args: ModelArgs, *, compute_bytes: int, compiled: bool = False) -> float:
    """Bytes one block saves for backward per token (no activation checkpointing).

    fp32 compute: x, the norm's normalized and scaled outputs (3d per norm, the scaled one shared
    by the linears reading it), RoPE'd q and k, v, the attention output (the out projection reads
    it as a view), w1 and w3 outputs, SiLU's output and the gated product: 8d + 2kv + 4f values.
    bf16 autocast: the norms stay fp32 (x and normalized, 4 bytes) and the linears save a bf16
    copy of the scaled output (2 bytes); the rest is bf16. TorchAO 0.18's Float8Linear saves its
    high-precision input and casts again in backward, so FP8 recipes save what bf16 saves.

    compiled (torch.compile per block): inductor's partitioner keeps what the matmuls and
    attention need and recomputes the element-wise work in backward: the block input and the
    residual after attention (fp32), each norm's output as the linears read it, RoPE'd q and k, v,
    the attention output, w1 and w3 outputs (SiLU and the product are recomputed)."""
    d, f, kv = args.dim, args.ffn_dim, args.n_kv_heads * args.head_dim
    c = compute_bytes
    if compiled:
        return float(2 * (4 * d + c * d) + c * (2 * d + 2 * kv) + c * 2 * f)
    norms = 2 * ((4 + 4) * d + c * d)  # x and normalized in fp32, the scaled output as the linears keep it
    attention = c * (2 * d + 2 * kv)  # RoPE'd q, k; v; output
    ffn = c * 4 * f  # w1 out, SiLU out, w3 out, product
    return float(norms + attention + ffn)


def kept_bytes(args: ModelArgs, *, compute_bytes: int, mode: str, compiled: bool = False) -> float:
    """Bytes per token one block keeps from its forward until its backward, by checkpointing mode.

    none: everything it saves (block_activation_bytes). full: its input alone (the fp32 residual
    stream); its forward runs again in backward. selective (train/ac.py): its input and the outputs
    of its seven matmuls and of attention; the element-wise work is recomputed."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; known: {', '.join(AC_MODES)}")
    if mode == "none":
        return block_activation_bytes(args, compute_bytes=compute_bytes, compiled=compiled)
    d, f, kv, c = args.dim, args.ffn_dim, args.n_kv_heads * args.head_dim, compute_bytes
    if mode == "full":
        return 4.0 * d
    return 4.0 * d + c * (d + 2 * kv + d + d + 2 * f + d)  # q/k/v, attention, wo, w1/w3, w2 outputs


def logits_bytes(args: ModelArgs, *, tokens: int, compute_bytes: int, chunk_tokens: int = 0,
                 head: str = "fused", compiled: bool = False) -> float:
    """The loss head at its peak (train.loss_head, models/head.py), plus the final norm's saved tensors.

    plain: in the loss's backward, log-softmax's saved fp32 output, the gradient arriving at it and
    the one it passes to the logits (three fp32 (tokens x vocab) tensors); checkpointed: one chunk's.
    fused: at the end of forward, one chunk's logits, the softmax pass's fp32 temporaries (eager only:
    compiled, it keeps them in registers) and their gradient, beside what it keeps for backward: the
    hidden states' gradient and the weight's (fp32). (Compiled here means on CUDA, where build compiles
    the pass.)"""
    V = args.vocab_size
    norm = (4 + 4 + compute_bytes) * args.dim  # x, normalized (fp32), the scaled output as the output layer keeps it
    if head == "fused":
        n = chunk_size(chunk_tokens, V, tokens, compiled=compiled)
        per_logit = 2 * compute_bytes + (0 if compiled else 16)  # eager: ~4 fp32 temporaries (models/head.py)
        return n * V * per_logit + tokens * args.dim * compute_bytes + 4 * V * args.dim + tokens * norm
    n = chunk_size(chunk_tokens, V, tokens, compiled=False) if head == "checkpointed" else tokens
    return n * V * 3 * 4 + tokens * norm


def weight_copy_bytes(args: ModelArgs, *, compute_bytes: int, recipe: str, converted: set[str]) -> float:
    """Low-precision copies of the linears' weights held from forward to backward: autocast's bf16
    copy of every linear it runs (the matmul saves it); none in fp32. A linear converted to FP8
    keeps none: TorchAO 0.18 saves the fp32 master and casts it again in backward."""
    from fp8lab.perf.roofline import model_linears

    if compute_bytes == 4:
        return 0.0
    low = get_recipe(recipe).is_low_precision
    return float(sum(2 * g.count * g.k * g.n for g in model_linears(args) if not (low and g.name in converted)))


def predict_memory(args: ModelArgs, *, tokens: int, recipe: str = "bf16", converted: set[str] | None = None,
                   optimizer: str = "adamw", activation_checkpoint: str = "none", compute_bytes: int = 2,
                   num_gpus: int = 1, loss_chunk_tokens: int = 0, emulated: bool = False,
                   compiled: bool = False, loss_head: str = "fused", head_compiled: bool | None = None) -> MemoryPlan:
    """Peak bytes per rank of one training step of `tokens` tokens per micro-batch; `emulated`:
    FP8 through TorchAO's emulation (CPU), whose matmul upcasts both FP8 operands to fp32.

    The peak is the largest of three moments: the start of backward (every saved activation and
    the head's, the first gradients), the end of backward (every gradient, one block's
    activations) and the optimizer step (weights, gradients and state; fused AdamW on CUDA makes
    no parameter-sized temporaries). Under FSDP2 (`num_gpus` > 1) weights, gradients and optimizer
    state are sharded and about two blocks' weights are gathered at a time."""
    converted = set() if converted is None else converted
    n = param_counts(args).total
    params, grads = 4 * n / num_gpus, 4 * n / num_gpus
    state = optimizer_bytes(args, optimizer) / num_gpus
    copies = weight_copy_bytes(args, compute_bytes=compute_bytes, recipe=recipe, converted=converted)
    if num_gpus > 1:
        copies = copies / args.n_layers * 2
    kept = kept_bytes(args, compute_bytes=compute_bytes, mode=activation_checkpoint, compiled=compiled) * tokens
    logits = logits_bytes(args, tokens=tokens, compute_bytes=compute_bytes, chunk_tokens=loss_chunk_tokens,
                          head=loss_head, compiled=compiled if head_compiled is None else head_compiled)
    head_grad = 4 * args.vocab_size * args.dim / num_gpus
    one_block = block_activation_bytes(args, compute_bytes=compute_bytes, compiled=compiled) * tokens
    recompute = one_block if activation_checkpoint != "none" else 0.0  # a checkpointed block's forward, again
    working = 4 * 4 * args.dim * tokens  # backward's own gradients of the residual stream and its siblings
    # TorchAO's emulation (CPU) holds fp32 upcasts of the largest converted matmul's operands in
    # its backward, whatever else is alive (measured: 2 x tokens x ffn_dim x 4 bytes, debug model).
    emul = 2 * 4 * tokens * args.ffn_dim if emulated and get_recipe(recipe).is_low_precision and converted else 0
    L = args.n_layers
    moments = {
        "the start of backward": {"gradients": head_grad, "low-precision weight copies": copies,
                                  "activations": kept * L + emul, "logits": logits},
        "the last block's recompute": {"gradients": head_grad, "low-precision weight copies": copies,
                                       "activations": kept * L + recompute + emul, "logits": 0.0},
        "the end of backward": {"gradients": grads, "low-precision weight copies": copies / L,
                                "activations": (kept if recompute else 0.0) + one_block + working + emul,
                                "logits": 0.0},
        "the optimizer step": {"gradients": grads, "low-precision weight copies": 0.0, "activations": 0.0,
                               "logits": 0.0},
    }
    when, peak = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    parts = {"parameters": params, "gradients": peak["gradients"], "optimizer state": state,
             "low-precision weight copies": peak["low-precision weight copies"], "activations": peak["activations"],
             "logits": peak["logits"]}
    return MemoryPlan(parts=parts, notes=[f"the peak is at {when}"])


# -- measured ------------------------------------------------------------------------------------

# torch.profiler's categories -> PARTS; the autograd's own buffers (a gradient in flight) count as
# activations' kin: they exist only between forward and backward.
_CATEGORY_PART = {"PARAMETER": "parameters", "GRADIENT": "gradients", "OPTIMIZER_STATE": "optimizer state",
                  "ACTIVATION": "activations", "AUTOGRAD_DETAIL": "activations", "TEMPORARY": "activations",
                  "INPUT": "inputs"}


def measure_peak(step, *, device: str = "cpu") -> dict[str, float]:
    """Run `step()` under torch's memory profiler; return the live tensor bytes on `device` at
    their peak, by part ("total" included). Call it after one step has run, so the optimizer's
    state exists before the measured one, as in training."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    mp = prof._memory_profile()  # torch's own categorised timeline (what export_memory_timeline draws)
    live: dict = {}
    now: collections.Counter = collections.Counter()
    peak, at_peak = 0, {}
    for _, action, (key, version), size in mp.timeline:
        if key.device.type != device.split(":")[0]:
            continue
        if action in (Action.PREEXISTING, Action.CREATE, Action.INCREMENT_VERSION):
            if key in live:
                now[live[key][1]] -= live[key][0]
            category = mp._categories.get(key, version)
            part = _CATEGORY_PART.get(getattr(category, "name", ""), "other")
            live[key] = (size, part)
            now[part] += size
        elif action == Action.DESTROY and key in live:
            size_, part = live.pop(key)
            now[part] -= size_
        total = sum(now.values())
        if total > peak:
            peak, at_peak = total, dict(now)
    return {**{k: float(v) for k, v in at_peak.items() if v}, "total": float(peak)}
