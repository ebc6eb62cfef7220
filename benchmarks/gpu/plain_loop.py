"""The plain reference loop (src/fp8lab/bench/plain_loop.py) on its own, for one recipe at a
preset's shape: the loop a user writes in an afternoon from TorchAO's README, which
`fp8lab bench --vs-plain` runs beside fp8lab's step. Prints its result as JSON.

    python benchmarks/gpu/plain_loop.py --preset 1b --recipe fp8-tensorwise --batch 32 --seq 512

Only the shape comes from fp8lab (its presets); the loop itself imports nothing from fp8lab.
"""

from __future__ import annotations

import argparse
import json

import torch

from fp8lab.bench.plain_loop import TORCHAO, run
from fp8lab.models.presets import PRESETS, preset_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b", choices=tuple(PRESETS))
    p.add_argument("--recipe", default="bf16", choices=tuple(TORCHAO))
    p.add_argument("--batch", type=int, default=32, help="micro-batch (sequences per step)")
    p.add_argument("--seq", type=int, default=512, help="sequence length")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="timed steps; the figure is their median")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-layers", type=int, help="fewer layers than the preset (a quick try on CPU)")
    a = p.parse_args()
    shape = preset_args(a.preset, n_layers=a.n_layers)
    cuda = torch.device(a.device).type == "cuda"
    row = run(dim=shape.dim, n_layers=shape.n_layers, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
              ffn_dim=shape.ffn_dim, vocab=shape.vocab_size, tie=shape.tie_embeddings, norm_eps=shape.norm_eps,
              rope_theta=shape.rope_theta, batch=a.batch, seq_len=a.seq, recipe=a.recipe, warmup=a.warmup,
              steps=a.steps, compile=a.compile == "on" or (a.compile == "auto" and cuda), device=a.device)
    print(json.dumps({"preset": a.preset, **row}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
