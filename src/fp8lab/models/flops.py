"""Parameter counts and training FLOPs per token, for throughput and MFU figures.

FLOPs per token = 6 * N + 12 * L * d * T (the PaLM appendix B / nanoGPT / torchtitan
estimate): 6N for the forward and backward of every matmul weight, and 12*L*d*T for the
attention scores and weighted sum, which grow with sequence length T. N counts the weights
that take part in matmuls: every linear including the output head, but not the embedding
lookup (a gather, no FLOPs). MFU divides by the dense peak of the fastest math the run uses
(fp8lab.gpus.mfu_peak_tflops: BF16's for bf16, FP8's for the FP8 recipes), so it never
passes 100%: an FP8 run is measured against what its FP8 matmuls could do.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8lab.models.llama import ModelArgs


@dataclass(frozen=True)
class ParamCounts:
    total: int  # unique parameters (a tied head counts once)
    embedding: int  # the token embedding table
    matmul: int  # weights used in matmuls: all linears, output head included

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_counts(args: ModelArgs) -> ParamCounts:
    d, hd = args.dim, args.head_dim
    attn = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2  # wq, wo, wk, wv
    ffn = 3 * d * args.ffn_dim
    norms = 2 * d
    per_layer = attn + ffn + norms
    embedding = args.vocab_size * d
    head = args.vocab_size * d
    total = embedding + args.n_layers * per_layer + d + (0 if args.tie_embeddings else head)
    matmul = args.n_layers * (attn + ffn) + head
    return ParamCounts(total=total, embedding=embedding, matmul=matmul)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at the given sequence length."""
    n = param_counts(args).matmul
    return 6.0 * n + 12.0 * args.n_layers * args.dim * seq_len
