"""`fp8lab bench --vs-plain`: fp8lab's training step beside the plain reference loop.

For each recipe of the bench, the plain loop (plain_loop.py: the loop a user writes in an
afternoon from TorchAO's README, importing nothing from fp8lab) trains the same shapes
(train.build.model_args_for of the same config), micro-batch, sequence length, warm-up, timed
steps and compile setting, in its own process, right before or after fp8lab's worker of that
recipe (step_bench alternates the order). So `fp8lab/plain`, fp8lab's tokens/s over the plain
loop's, is measured in one invocation on one machine, never across runs.

Each row gets `plain` (the plain run's result, or why it failed or cannot run), `vs_plain`,
`plain_speedup_vs_bf16` (the plain loop's recipe over the plain loop's bf16) and
`vs_plain_bf16` (fp8lab's tokens/s over the plain bf16 loop's: FP8's gain over what a user
has without fp8lab). Entries that differ only in fp8lab settings (`fp8-rowwise:filter_mode=auto`)
share one plain run of their recipe.
"""

from __future__ import annotations

import json
from typing import Callable

from fp8lab.bench.plain_loop import TORCHAO
from fp8lab.errors import FP8LabError

MODULE = "fp8lab.bench.plain_loop"  # the plain worker: python -m MODULE --worker SPEC --result FILE

WHAT = ("the plain loop (fp8lab/bench/plain_loop.py, nothing from fp8lab): the same shapes, micro-batch, "
        "sequence length, warm-up and timed steps; nn.RMSNorm, separate wq/wk/wv, RoPE, SDPA (causal, GQA), "
        "SwiGLU; fp32 weights with bf16 autocast on CUDA (fp32 on CPU); TorchAO convert_to_float8_training on "
        "every linear but the output (emulated on CPU); block.compile() per block when fp8lab compiles; fused "
        "AdamW (CUDA); clip_grad_norm_(foreach=True); cross-entropy on the full fp32 logits; loss.item() each "
        "step; one random batch; CUDA events (wall clock on CPU), median. Each side in its own process, "
        "fp8lab first for the 1st, 3rd, ... recipe and the plain loop first for the others. "
        "fp8lab/plain = fp8lab tokens/s / plain tokens/s (> 1: fp8lab is faster)")


def check_comparable(cfg) -> None:
    """Refuse, before anything runs, the settings under which the plain loop trains something else."""
    if cfg.train.grad_accum_steps != 1:
        raise FP8LabError(f"--vs-plain compares one micro-batch per step, but train.grad_accum_steps="
                          f"{cfg.train.grad_accum_steps}: add --train.grad_accum_steps=1 (the config's "
                          "micro-batch stays; the plain loop has no accumulation)")
    if cfg.data.document_mask:
        raise FP8LabError("--vs-plain: the plain loop attends causally over the whole sequence; drop "
                          "--data.document_mask=true (or bench without --vs-plain)")


def differences(cfg) -> list[str]:
    """What fp8lab's step does here that the plain loop does not: the ratio includes it."""
    said = []
    if cfg.train.activation_checkpoint != "none":
        said.append(f"train.activation_checkpoint={cfg.train.activation_checkpoint} (the plain loop keeps activations)")
    if cfg.optim.name != "adamw":
        said.append(f"optim.name={cfg.optim.name} (the plain loop: torch AdamW, fp32 moments)")
    if cfg.train.loss_chunk_tokens:
        said.append(f"train.loss_chunk_tokens={cfg.train.loss_chunk_tokens}")
    if cfg.precision.filter_mode != "all" or list(cfg.precision.skip_modules) != ["output"]:
        said.append("precision.filter_mode / skip_modules (the plain loop converts every linear but the output)")
    if cfg.precision.residual_dtype != "fp32":
        said.append(f"precision.residual_dtype={cfg.precision.residual_dtype} (the plain loop's residual stream is fp32)")
    if cfg.precision.compute_dtype != "auto" or cfg.precision.emulate != "auto":
        said.append("precision.compute_dtype / emulate (the plain loop: bf16 autocast on CUDA, FP8 emulated on CPU)")
    return said


class PlainRuns:
    """The plain side of one bench invocation: runs, reuses and merges the plain loop's results.
    `run(spec, tag)` runs one plain worker (step_bench's launcher: this module must not import
    step_bench, which imports it); `baseline` is the bench's baseline recipe."""

    def __init__(self, cfg, args, opts, *, cuda: bool, run: Callable[[dict, str], dict], baseline: str,
                 progress: Callable[[str], None]):
        self.opts, self.run, self.baseline, self.progress = opts, run, baseline, progress
        self.device = cfg.train.device if cfg.train.device != "auto" else ("cuda" if cuda else "cpu")
        self.shape = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                      "n_kv_heads": args.n_kv_heads, "ffn_dim": args.ffn_dim, "vocab": args.vocab_size,
                      "tie": args.tie_embeddings, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
                      "batch": cfg.data.micro_batch_size, "seq_len": cfg.data.seq_len}
        self.differences: dict[str, list[str]] = {}  # entry -> its settings the plain loop lacks
        self.by_entry: dict[str, dict] = {}
        self._done: dict[str, dict] = {}  # spec as JSON -> result: one plain run per distinct spec

    def spec(self, ecfg) -> dict:
        """The plain loop's arguments for one entry's config (its recipe and compile setting)."""
        p = ecfg.precision
        compiled = p.compile == "on" or (p.compile == "auto" and self.device.startswith("cuda"))
        return self.shape | {"recipe": p.recipe, "warmup": self.opts.warmup, "steps": self.opts.steps,
                             "compile": compiled, "device": self.device, "threads": ecfg.train.threads}

    def measure(self, entry: str, ecfg, *, tag: str) -> dict:
        spec = self.spec(ecfg)
        self.differences[entry] = differences(ecfg)  # per entry: 'fp8-rowwise:filter_mode=auto' differs alone
        if spec["recipe"] not in TORCHAO:
            result = {"status": "unsupported",
                      "reason": f"the plain loop runs {', '.join(TORCHAO)}, not {spec['recipe']}"}
        elif (key := json.dumps(spec, sort_keys=True)) in self._done:
            result = self._done[key]
            self.progress(f"{entry}: the plain loop's {spec['recipe']} run above stands for it")
        else:
            self.progress(f"{entry}: plain loop: build + {spec['warmup']} warm-up + {spec['steps']} timed steps ...")
            result = self.run(spec, tag)
            self._done[key] = result
            self.progress(f"{entry}: plain loop: " + (f"{result['tokens_per_s']:,.0f} tokens/s "
                                                     f"({result['wall_s']:.0f} s in all)"
                                                     if result["status"] == "ok" else f"failed: {result['reason']}"))
        self.by_entry[entry] = result
        return result

    def merge(self, rows: list[dict]) -> list[str]:
        """Put each entry's plain result and the ratios into its row; the notes to add."""
        base = self.by_entry.get(self.baseline, {})
        base_tps = base.get("tokens_per_s") if base.get("status") == "ok" else None
        for r in rows:
            if r["recipe"] not in self.by_entry:
                continue  # unsupported by fp8lab's check: neither side ran
            p = self.by_entry[r["recipe"]]
            ok, p_ok = r["status"] == "ok", p["status"] == "ok"
            r["plain"] = p
            r["vs_plain"] = r["tokens_per_s"] / p["tokens_per_s"] if ok and p_ok else None
            r["plain_speedup_vs_bf16"] = p["tokens_per_s"] / base_tps if p_ok and base_tps else None
            r["vs_plain_bf16"] = r["tokens_per_s"] / base_tps if ok and base_tps else None
        notes = []
        if base_tps is None:
            notes.append("no plain-loop speedups: the plain loop's bf16 " + ("was not measured" if self.baseline not in
                         self.by_entry else "did not run") + " in this invocation")
        said = {e: d for e, d in self.differences.items() if d}
        if said:
            notes.append("--vs-plain: fp8lab runs with settings the plain loop does not have, and fp8lab/plain "
                         "includes them: " + "; ".join(f"{e}: {', '.join(d)}" for e, d in said.items()))
        return notes

    def describe(self) -> dict:
        return {"what": WHAT, "device": self.device, "shape": self.shape}
