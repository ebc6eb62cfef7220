"""The reference `fp8lab bench --vs-plain` measures fp8lab against: the Llama training loop a
user writes in an afternoon from TorchAO's README, in plain PyTorch. It imports nothing from
fp8lab on purpose (only torch and torchao), so no fp8lab speed-up or slow-down can leak into it.

fp32 parameters, bf16 autocast on CUDA (fp32 on CPU), `convert_to_float8_training` on every
linear but the output layer for FP8 (emulated on CPU), `block.compile()` per block, fused
AdamW, `clip_grad_norm_(foreach=True)`, cross-entropy on the full fp32 logits, `loss.item()`
each step; the same random batch every step; CUDA events (wall clock on CPU), median step.

    python -m fp8lab.bench.plain_loop --worker '{"dim": 64, ...}' --result out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

TORCHAO = {"bf16": None, "fp8-tensorwise": "tensorwise", "fp8-rowwise": "rowwise",
           "fp8-rowwise-gw-hp": "rowwise_with_gw_hp"}


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn_dim, eps):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attention_norm(x)
        q = rope(self.wq(h).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = rope(self.wk(h).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rope(x, cos, sin):  # rotate-half RoPE, in fp32
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


class Llama(nn.Module):
    def __init__(self, *, dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab, tie, seq_len, norm_eps=1e-5,
                 rope_theta=500000.0):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, n_kv_heads, ffn_dim, norm_eps) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight
        hd = dim // n_heads
        angles = torch.outer(torch.arange(seq_len).float(), rope_theta ** (-torch.arange(0, hd, 2).float() / hd))
        angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # (1, T, 1, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for block in self.layers:
            x = block(x, self.cos, self.sin)
        return self.output(self.norm(x))


def build(*, recipe: str, device: str, compile: bool = False, **shape) -> nn.Module:
    """The model of `shape` on `device`, converted for `recipe` (the output layer stays high
    precision) and compiled per block when asked."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 3B model's init on the CPU takes a while
        model = Llama(**shape)
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)  # speed only: any sane init does
    if TORCHAO[recipe]:
        logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels' load noise
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(TORCHAO[recipe])
        if torch.device(device).type != "cuda":
            config = dataclasses.replace(config, emulate=True)  # no FP8 kernels off CUDA
        convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn != "output")
    if compile:
        for block in model.layers:
            block.compile()
    return model


def run(*, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int, vocab: int, tie: bool,
        batch: int, seq_len: int, recipe: str = "bf16", warmup: int = 3, steps: int = 10, compile: bool = False,
        device: str = "cuda", threads: int = 0, norm_eps: float = 1e-5, rope_theta: float = 500000.0) -> dict:
    """Train `warmup` + `steps` steps on one random batch; the timed steps' figures."""
    if recipe not in TORCHAO:
        raise ValueError(f"the plain loop runs {', '.join(TORCHAO)}, not {recipe!r}")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    model = build(recipe=recipe, device=device, compile=compile, dim=dim, n_layers=n_layers, n_heads=n_heads,
                  n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, vocab=vocab, tie=tie, seq_len=seq_len, norm_eps=norm_eps,
                  rope_theta=rope_theta)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda or None)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    startup_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"status": "ok", "recipe": recipe, "device": str(device), "compiled": compile,
            "compute_dtype": "bfloat16" if cuda else "float32", "emulated": bool(TORCHAO[recipe]) and not cuda,
            "converted": sum(type(m).__name__ == "Float8Linear" for m in model.modules()),
            "tokens_per_step": batch * seq_len, "tokens_per_s": batch * seq_len / med, "step_time_s": med,
            "step_times_s": times, "startup_s": startup_s, "warmup_steps": warmup, "steps": steps,
            "mem_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "loss_first": losses[0], "loss_last": losses[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fp8lab.bench.plain_loop", description="the plain reference loop, one recipe")
    p.add_argument("--worker", required=True, help="run()'s keyword arguments, as JSON")
    p.add_argument("--result", required=True, help="where to write the result (JSON)")
    args = p.parse_args(argv)
    row = run(**json.loads(args.worker))
    with open(args.result + ".tmp", "w") as f:
        json.dump(row, f)
    os.replace(args.result + ".tmp", args.result)  # the parent reads a whole file or none
    return 0


if __name__ == "__main__":
    sys.exit(main())
