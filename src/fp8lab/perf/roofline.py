"""A roofline model of one training step: per linear layer (perf/roofline_linear.py) and for the
whole step, which `fp8lab advise` and the layer policy use.

Each kernel costs max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth, launch overhead).
A linear is three GEMMs plus the memory-bound kernels its recipe adds (roofline_linear.py: amax
reductions, casts in one or two directions, transposed copies, rescales, and in every recipe the
fp32 master weight's cast and its gradient's). Everything that is not a converted linear
(attention, norms, RoPE, SwiGLU, residual adds, embedding, the output layer and loss, optimizer)
is the same under every recipe and is costed from its FLOPs and bytes; the step's speedup is
Amdahl over the sum. Rates are `fp8lab doctor`'s measurement of the card when cached, else the
datasheet times TorchAO's achievable fractions (roofline_linear.rates_for).

Anchoring. The model predicts kernels; a real step also has what it leaves out (CPU gaps and host
syncs, eager kernels, GEMM efficiency at shapes other than doctor's 8192^3). Given a measured bf16
step of the same configuration (`fp8lab bench` stores it, perf.measure.load_step_time), a recipe's
step is predicted as measured_bf16 - predicted_bf16 + predicted_recipe (`anchored_s`): the model
predicts only the difference the recipe makes, and the unmodelled rest, the same under every
recipe, is calibrated away.

Why fp8-rowwise gains little, or loses, at N <= 2048 (predicted, doctor's H200 rates, the 1b model: dim 2048,
ffn 8192, 8 kv heads; 16,384 tokens per micro-batch). TorchAO 0.18 scales every operand per row
for one GEMM and per column for another: each of input, weight and grad_output is cast along its
rows (one pass), then along its columns (an amax pass down the columns, then a cast writing the
transposed layout the backward GEMM takes, at ~0.64 of the bandwidth, pytorch/pytorch#133242);
the backward GEMMs have no fast accumulation, so they run on the tensorwise cuBLAS kernel and the
scales are multiplied into the bf16 result by an extra kernel each. That traffic grows with m x k
and m x n; the GEMM time it buys back grows with m x k x n. Per linear, forward + backward, ms
(bf16 / tensorwise / rowwise): wq, wo 2048 -> 2048: 0.54 / 0.45 / 0.50; wk, wv 2048 -> 512:
0.14 / 0.17 / 0.21; w1, w3 2048 -> 8192: 2.16 / 1.59 / 1.67; w2 8192 -> 2048: 2.16 / 1.59 / 1.77.
At wq rowwise's casts and rescales (0.22 ms: the two transposed column casts of input and
grad_output 0.08, the row casts 0.05, the column amax passes 0.03, the grad_input rescale 0.03)
nearly cancel the 0.24 ms its GEMMs save; at wk/wv (0.14 ms against 0.06 saved) they exceed it.
Per block rowwise spends 2.4 ms on casts and rescales, tensorwise 1.8. That is not all: the step
measured 0.97x where this predicts 1.09x anchored; the model explains ~1/5 of rowwise's measured
deficit to tensorwise (+8 of +38 ms per step) while it is pessimistic on TorchAO's published
per-layer rowwise measurements (pytorch/ao#2185): the rest is for a profile of the whole step.

Kernel structure follows TorchAO's own roofline (torchao/testing/training/roofline_utils.py)
and TorchAO 0.18's code; constants and their sources are listed in CONSTANTS. What the model
leaves out: wave quantisation and tile effects of small GEMMs (TorchAO notes its roofline
undercounts ~2x for M, K, N <= 1k), fusion of FP8 casts into the previous op and the dedup of the
casts of an input shared by wq/wk/wv or w1/w3 (none assumed: conservative for FP8),
communication (FSDP all-gathers, reduce-scatters), activation checkpointing, CPU overhead and
host syncs, and power/clock limits: the anchor covers what is the same under every recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8lab.errors import FP8LabError
from fp8lab.models.flops import param_counts
from fp8lab.models.head import HEADS, chunk_size
from fp8lab.models.llama import ModelArgs
from fp8lab.perf.roofline_linear import (  # noqa: F401 - re-exported: the roofline's public names
    ATTENTION_EFFICIENCY,
    B_BF16,
    B_FP8,
    B_FP32,
    B_WEIGHT,
    CONSTANTS,
    FA_BWD_OVER_FWD,
    GEMM_EFFICIENCY,
    KERNEL_LAUNCH_S,
    MEM_BW_EFFICIENCY,
    ROWWISE_GEMM_REL,
    TRANSPOSE_BW_REL,
    LinearCost,
    Rates,
    gemm_s,
    layer_speedup,
    linear_cost,
    mem_s,
    rates_for,
    supports,
)
from fp8lab.precision.recipes import RECIPES

LOSS_HEADS = HEADS
# The residual stream's dtype (precision.residual_dtype): "compute" is the autocast dtype, bf16.
RESIDUAL_BYTES = {"fp32": B_FP32, "bf16": B_BF16, "compute": B_BF16}

# Plain head, bytes per logit, all eager (PyTorch's CUDA kernels): logits.float() 2 + 4;
# log_softmax forward 16 (a row of 128K fp32 logits does not fit in shared memory, so
# cunn_SoftMaxForward reads it three times: max, sum of exps, write; aten/src/ATen/native/cuda/
# SoftMax.cu); nll_loss backward's zero-filled fp32 gradient 4; log_softmax backward 16 (sum of
# the gradient, then gradient and output read, gradient written); the cast back to bf16 4 + 2.
PLAIN_HEAD_BYTES = 6 + 16 + 4 + 16 + 6
PLAIN_HEAD_FWD_BYTES = 6 + 16  # what the checkpointed head runs again in backward
# Fused head (models/head.py), bytes per logit: one compiled pass reads the bf16 logits twice
# (max and sum of exps, then softmax - one-hot) and writes their bf16 gradient.
FUSED_HEAD_BYTES = 2 * B_BF16 + B_BF16
# ... and per weight element: the first chunk's bf16 grad_weight GEMM result is cast to fp32
# (2 + 4); each later one is added into that fp32 accumulator in place (2 + 4 + 4: `add_` upcasts
# in the kernel); once: scaled and returned (4 + 4), where a plain head casts bf16 to fp32 (2 + 4,
# already in the output layer's linear cost).
FUSED_GW_CHUNK_BYTES = B_BF16 + 2 * B_FP32
FUSED_GW_ONCE_BYTES = 2 * B_FP32  # cast (2 + 4) + scale (4 + 4) - the plain head's cast (2 + 4)


@dataclass(frozen=True)
class LinearGroup:
    """Identical linears across blocks, named by their suffix ('attention.wq')."""
    name: str
    k: int  # in_features
    n: int  # out_features
    count: int


def model_linears(args: ModelArgs) -> list[LinearGroup]:
    """The model's nn.Linear layers (names as in models/llama.py), grouped across blocks."""
    d, hd, L = args.dim, args.head_dim, args.n_layers
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    return [LinearGroup("attention.wq", d, q, L), LinearGroup("attention.wk", d, kv, L),
            LinearGroup("attention.wv", d, kv, L), LinearGroup("attention.wo", q, d, L),
            LinearGroup("feed_forward.w1", d, args.ffn_dim, L), LinearGroup("feed_forward.w3", d, args.ffn_dim, L),
            LinearGroup("feed_forward.w2", args.ffn_dim, d, L), LinearGroup("output", d, args.vocab_size, 1)]


@dataclass(frozen=True)
class StepTime:
    parts: dict[str, float]  # seconds per micro-batch, by part

    @property
    def total_s(self) -> float:
        return sum(self.parts.values())


def _check_step_settings(loss_head: str, residual_dtype: str, converted: set[str]) -> None:
    if loss_head not in LOSS_HEADS:
        raise FP8LabError(f"unknown loss head {loss_head!r}: choose one of {', '.join(LOSS_HEADS)}")
    if residual_dtype not in RESIDUAL_BYTES:
        raise FP8LabError(f"unknown residual dtype {residual_dtype!r}: choose one of {', '.join(RESIDUAL_BYTES)}")
    if loss_head == "fused" and "output" in converted:
        raise FP8LabError("the fused loss head needs a bf16 output layer: an FP8 output layer takes the plain "
                          "or checkpointed head (train.loss_head)")


def _blocks_elementwise(args: ModelArgs, m: int, rates: Rates, r: int) -> float:
    """Pointwise work of the compiled blocks and the final norm, seconds per micro-batch of m tokens,
    with a residual stream of r bytes per value. Per token forward: two RMSNorms (read r*d, write bf16
    2d), RoPE on q and k (read and write bf16), two residual adds (read r*d + 2d, write r*d), SwiGLU
    (read 2 x 2f, write 2f); backward moves about twice the forward. The final norm is one compiled
    pass each way (forward reads r*d, writes 2d; backward reads both and the gradient, writes it)."""
    d, kv = args.dim, args.n_kv_heads * args.head_dim
    fwd_bytes = (2 * (r + B_BF16) * d + 2 * B_BF16 * (d + kv) + 2 * (2 * r + B_BF16) * d
                 + 3 * B_BF16 * args.ffn_dim)
    kernels_per_block = 15  # ~5 fused pointwise groups forward, ~10 backward
    blocks = args.n_layers * (3 * fwd_bytes * m / (rates.mem_gbs * 1e9) + kernels_per_block * KERNEL_LAUNCH_S)
    return blocks + mem_s(rates, 3 * (r + B_BF16) * d * m)


def _loss_head(args: ModelArgs, m: int, rates: Rates, head: str, chunk_tokens: int, output_recipe: str) -> float:
    """The loss head beyond the output layer's three GEMMs and weight casts (those are in the
    linears' cost): plain and checkpointed run cross-entropy eagerly on fp32 logits, checkpointed
    also runs the output GEMM and the loss forward again in backward; fused never makes fp32
    logits but accumulates the weight gradient over chunks."""
    V, d = args.vocab_size, args.dim
    logits = m * V
    if head == "fused":
        chunks = -(-m // chunk_size(chunk_tokens, V, m, compiled=True))  # a GPU step: the pass is compiled
        return (mem_s(rates, FUSED_HEAD_BYTES * logits) + (chunks - 1) * mem_s(rates, FUSED_GW_CHUNK_BYTES * V * d)
                + mem_s(rates, FUSED_GW_ONCE_BYTES * V * d))
    t = mem_s(rates, PLAIN_HEAD_BYTES * logits)
    if head == "checkpointed":
        forward = next(t for name, t in linear_cost(m, d, V, output_recipe, rates).kernels if name == "gemm output")
        t += forward + mem_s(rates, PLAIN_HEAD_FWD_BYTES * logits)
    return t


def step_time(args: ModelArgs, *, tokens: int, seq_len: int, rates: Rates, recipe: str, converted: set[str],
              grad_accum: int = 1, num_gpus: int = 1, loss_head: str = "fused", residual_dtype: str = "fp32",
              loss_chunk_tokens: int = 0) -> StepTime:
    """Seconds per micro-batch of `tokens` tokens (sequences of `seq_len`): the linears in
    `converted` (group names) under `recipe`, everything else BF16. The optimizer step is
    amortised over `grad_accum` micro-batches and sharded over `num_gpus` (FSDP2).
    `loss_head` (train.loss_head): fused, plain or checkpointed; `residual_dtype`
    (precision.residual_dtype): fp32, or bf16 / compute; `loss_chunk_tokens` (train.loss_chunk_tokens):
    tokens per chunk of the fused and checkpointed heads, 0 = models/head.py's default."""
    _check_step_settings(loss_head, residual_dtype, converted)
    m, d, L = tokens, args.dim, args.n_layers
    gemm = casts = 0.0
    for g in model_linears(args):
        cost = linear_cost(m, g.k, g.n, recipe if g.name in converted else "bf16", rates)
        gemm += g.count * cost.gemm_s
        casts += g.count * cost.overhead_s
    # Causal attention: 2 matmuls of 2*T*d_attn FLOPs per token (full), halved; backward 2.5x.
    attn_fwd = 2.0 * seq_len * args.n_heads * args.head_dim * m * L
    attention = attn_fwd * (1 + FA_BWD_OVER_FWD) / (rates.attention_eff * rates.bf16_peak * 1e12)
    elementwise = _blocks_elementwise(args, m, rates, RESIDUAL_BYTES[residual_dtype])
    V = args.vocab_size
    # Embedding: gather forward; backward zero-fills the fp32 table's gradient and adds rows into
    # it; a tied output layer's fp32 weight gradient is then added to it.
    embedding = mem_s(rates, 8 * m * d) + mem_s(rates, B_FP32 * V * d) + mem_s(rates, 12 * m * d)
    if args.tie_embeddings:
        embedding += mem_s(rates, 3 * B_FP32 * V * d)
    output_recipe = recipe if "output" in converted else "bf16"
    loss = _loss_head(args, m, rates, loss_head, loss_chunk_tokens, output_recipe)
    # AdamW (fused): read param, grad, m, v, write param, m, v = 28 B; clip_grad_norm_: 12 B.
    n_params = param_counts(args).total
    optimizer = mem_s(rates, 40 * n_params / num_gpus) / grad_accum
    return StepTime({"linear GEMMs": gemm, "linear casts and scales": casts, "attention": attention,
                     "norms, RoPE, SwiGLU, residuals": elementwise, "embedding": embedding, "loss": loss,
                     "optimizer": optimizer})


def anchored_s(measured_bf16_s: float, predicted_bf16_s: float, predicted_s: float) -> float | None:
    """A recipe's step anchored to a measured bf16 step of the same configuration: the model
    predicts only the difference the recipe makes. None when the anchor is too small to take
    the predicted difference (a measurement of another configuration)."""
    t = measured_bf16_s - predicted_bf16_s + predicted_s
    return t if t > 0 else None


def all_recipes() -> list[str]:
    return list(RECIPES)
