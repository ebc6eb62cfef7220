"""A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Forward only. Training, precision and parallelism are applied from outside (precision
converters swap the nn.Linear modules here; FSDP wraps the blocks), so this file stays
the one a reader can check against the Llama papers. Module names follow torchtitan's
Llama so checkpoints map onto Hugging Face layouts with a fixed table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fp8lab.models.head import head_loss


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face's `rope_type`s define it: "linear" divides every
    frequency by `factor`; "llama3" (Llama 3.1/3.2) divides the low frequencies by `factor`, keeps
    the high ones, and blends in between (`low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`)."""
    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    KNOWN = ("linear", "llama3")

    def check(self) -> None:
        """Raise ValueError naming what cannot build the tables."""
        if self.rope_type not in self.KNOWN:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported (supported: "
                             f"{', '.join(self.KNOWN)})")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3":
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if getattr(self, name) is None:
                    raise ValueError(f"llama3 rope scaling needs {name}")
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ValueError(f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                                 f"{self.low_freq_factor} and {self.high_freq_factor}")


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    rope_scaling: RopeScaling | None = None  # None: plain RoPE

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # as dataclasses.asdict and a checkpoint's state.json give it
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        """The inverse of dataclasses.asdict (what a checkpoint's state.json holds); keys this
        version does not know are ignored, missing ones take their defaults."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def check(self) -> None:
        """Raise ValueError naming the field when the shape cannot build a model."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} (model.dim / model.n_heads) must be even for RoPE")
        if self.rope_scaling is not None:
            self.rope_scaling.check()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the autocast dtype: the mean of squares of bf16
        # activations loses the small ones.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # The output keeps the input's dtype, so a bf16 residual stream stays bf16 past the fp32 gain.
        return (out.type_as(x) * self.weight).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2), in fp32 (computed in fp64)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def scaled_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """The RoPE frequencies under `s`, by the formulas of Hugging Face's modeling_rope_utils
    (and Meta's Llama 3.1 reference code for llama3)."""
    s.check()
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: wavelengths shorter than original_max / high_freq_factor are kept, longer than
    # original_max / low_freq_factor are stretched by `factor`, and those between are blended.
    wavelen = 2 * math.pi / inv_freq
    old = s.original_max_position_embeddings
    stretched = torch.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * stretched / s.factor + smooth * stretched
    medium = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
    return torch.where(medium, blended, stretched)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, n_heads, head_dim), interleaved pairs (x0, x1) rotate together as in Llama.
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos = cos[None, :, None, :]  # (1, T, 1, head_dim // 2)
    sin = sin[None, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (B, n_heads, T, head_dim) for SDPA; enable_gqa shares each kv head across
        # n_heads // n_kv_heads query heads without materialising repeated k and v.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # mask None: plain causal attention (the fused kernels' fast path); else the boolean
        # (B, 1, T, T) document mask from `document_mask`, causal already.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.check()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed "0".."n-1" keeps the names of an nn.ModuleList while letting
        # FSDP/pipelining remove or wrap blocks by name.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # dtype of the residual stream between blocks (precision.residual_dtype): None keeps the
        # embedding's (fp32 masters: fp32; under FSDP2's bf16 gather: bf16).
        self.residual_dtype: torch.dtype | None = None
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)
        # Not persistent: derived from the args, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic under torch.manual_seed: normal(0, 0.02) weights, with the
        residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2 / torchtitan)
        so the residual stream's variance does not grow with depth."""
        params = dict(self.named_parameters())
        for name, fill in self.init_plan():
            fill(params[name])

    def init_plan(self) -> list[tuple[str, Callable[[torch.Tensor], object]]]:
        """(parameter name, in-place fill of a tensor of its shape), in the order the random
        draws happen. The one source of truth for initialisation: init_weights applies it to
        this model, and FSDP2's meta-device build (train/build.py) applies it one full tensor
        at a time and keeps its shard, so every rank count draws the same numbers."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.args.n_layers)

        def trunc(s: float):
            return functools.partial(nn.init.trunc_normal_, std=s, a=-3 * s, b=3 * s)

        plan = [("tok_embeddings.weight",
                 functools.partial(nn.init.normal_, std=1.0 if not self.args.tie_embeddings else std))]
        for i in self.layers:
            p = f"layers.{i}."
            plan += [(p + n, trunc(std)) for n in ("attention.wq.weight", "attention.wk.weight",
                                                     "attention.wv.weight", "feed_forward.w1.weight",
                                                     "feed_forward.w3.weight")]
            plan += [(p + n, trunc(out_std)) for n in ("attention.wo.weight", "feed_forward.w2.weight")]
            plan += [(p + "attention_norm.weight", nn.init.ones_), (p + "ffn_norm.weight", nn.init.ones_)]
        plan.append(("norm.weight", nn.init.ones_))
        if not self.args.tie_embeddings:
            plan.append(("output.weight", trunc(self.args.dim ** -0.5)))
        return plan

    def constructor_draws(self) -> list[Callable[[], object]]:
        """The random draws the constructor made before init_weights replaced them: nn.Linear and
        nn.Embedding initialise themselves when built (torch's reset_parameters). A meta-device
        build draws nothing, so it replays these first (each builds a throwaway layer of the same
        shape, in construction order) to start init_plan where a plain build starts it."""
        out = []
        for mod in self.modules():  # registration order is construction order in this file
            if isinstance(mod, nn.Embedding):
                out.append(functools.partial(nn.Embedding, mod.num_embeddings, mod.embedding_dim))
            elif isinstance(mod, nn.Linear):  # TorchAO's converted linears are nn.Linear subclasses
                out.append(functools.partial(nn.Linear, mod.in_features, mod.out_features, bias=mod.bias is not None))
        return out

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the RoPE tables in place: after a meta-device build and `to_empty` they hold
        garbage (they are computed from the args, never drawn nor checkpointed)."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta,
                               self.args.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, docs: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                *, head: str = "plain", chunk_tokens: int = 0, grad_fn: Callable | None = None) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab_size). `docs` (B, T), optional: the
        document each position belongs to; positions attend only within their document.

        With `targets` (B, T): the summed cross-entropy instead, through the loss head `head`
        (models/head.py: fused, plain, checkpointed), so that under FSDP2 the loss runs inside
        the root module's forward, where its weights are gathered."""
        h = self.hidden_states(tokens, docs)
        if targets is None:
            return self.output(h)
        return head_loss(h.flatten(0, 1), self.output, targets.flatten(), head=head, chunk_tokens=chunk_tokens,
                         grad_fn=grad_fn)

    def hidden_states(self, tokens: torch.Tensor, docs: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) int64 -> the normed final hidden states (B, T, dim) the output layer
        reads: what a chunked loss starts from, so the full logits need never exist."""
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if self.residual_dtype is not None:
            h = h.to(self.residual_dtype)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        mask = None if docs is None else document_mask(docs)  # built once, shared by every block
        for block in self.layers.values():
            h = block(h, cos, sin, mask)
        return self.norm(h)


def document_mask(docs: torch.Tensor) -> torch.Tensor:
    """docs (B, T), the document of each position -> a boolean (B, 1, T, T) attention mask: query i
    sees key j when j <= i and both lie in the same document. RoPE is relative, so a document
    attended this way gives the outputs it would give alone at position 0 (no position reset)."""
    T = docs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return (docs[:, None, :, None] == docs[:, None, None, :]) & causal
