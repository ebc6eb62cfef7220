"""fp8lab advise --model PRESET_OR_CONFIG --gpu NAME: predict what each recipe gains."""

from __future__ import annotations

import json
from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 50


def register(sub) -> None:
    a = sub.add_parser("advise", help="predict each recipe's speedup and memory for a model on a GPU (roofline)",
                       description="A roofline model per linear layer and Amdahl over the training step: what "
                                   "FP8 would gain, before you spend a GPU-day. Nothing runs on the GPU.")
    a.add_argument("--model", required=True, help="a preset (debug, 125m, 350m, 1b, 3b, 8b) or a TOML config file")
    a.add_argument("--gpu", required=True, help="a GPU id (h100-sxm, h200, rtx5090, ...) or 'auto' for this machine's")
    a.add_argument("--batch-tokens", type=int, help="tokens per micro-batch per GPU (default: the config's "
                                                    "data.micro_batch_size x data.seq_len)")
    a.add_argument("--seq-len", type=int, help="sequence length (default: the config's data.seq_len)")
    a.add_argument("--num-gpus", type=int, default=1, help="GPUs sharing optimizer state, FSDP2-style (default 1)")
    a.add_argument("--rates", choices=("auto", "vendor", "microbench", "measured"), default="auto",
                   help="where the GPU's rates come from: auto = this card's `fp8lab doctor` measurement when "
                        "cached, else the table's choice for the GPU")
    a.add_argument("--optimizer", choices=("adamw", "adamw-bf16", "adamw-8bit", "adamw-fp8", "adamw-4bit"),
                   help="optimizer state the memory is predicted for (default: the config's optim.name)")
    a.add_argument("--activation-checkpoint", choices=("none", "full", "selective"),
                   help="activation checkpointing mode (default: the config's train.activation_checkpoint)")
    a.add_argument("--json", action="store_true", help="print the prediction as JSON")
    a.set_defaults(fn=run)


def _model(spec: str, seq_len: int | None):
    from fp8lab.config import load_config
    from fp8lab.models.presets import PRESETS, preset_args

    if spec in PRESETS:
        cfg = load_config(None, {"model.preset": spec})
    elif Path(spec).is_file():
        cfg = load_config(spec, {})
    else:
        raise FP8LabError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    m = cfg.model
    seq = seq_len or cfg.data.seq_len
    args = preset_args(m.preset, vocab_size=m.vocab_size or None, dim=m.dim, n_layers=m.n_layers,
                       n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim, tie_embeddings=m.tie_embeddings)
    return cfg, args, seq


def _gpu(name: str) -> str:
    from fp8lab.gpus import GPUS, get_gpu, lookup_gpu

    if name != "auto":
        spec = get_gpu(name)
    else:
        import torch

        if not torch.cuda.is_available():
            raise FP8LabError(f"--gpu auto: no CUDA GPU on this machine; name one of {', '.join(GPUS)}")
        device_name = torch.cuda.get_device_name()
        spec = lookup_gpu(device_name)
        if spec is None:
            raise FP8LabError(f"--gpu auto: {device_name} is not in fp8lab's table; name the closest of "
                              f"{', '.join(GPUS)}")
    return next(k for k, v in GPUS.items() if v is spec)


def run(args, rest) -> int:
    from fp8lab.bench.advise import advise
    from fp8lab.perf.measure import load_measured_rates

    cfg, margs, seq_len = _model(args.model, args.seq_len)
    tokens = args.batch_tokens or cfg.data.micro_batch_size * seq_len
    if seq_len <= 0 or tokens <= 0 or args.num_gpus <= 0:
        raise FP8LabError("--seq-len, --batch-tokens and --num-gpus must be positive")
    if tokens < seq_len:
        raise FP8LabError(f"--batch-tokens {tokens} is less than one sequence of --seq-len {seq_len}")
    gpu_id = _gpu(args.gpu)
    measured = load_measured_rates(gpu_id) if args.rates in ("auto", "measured") else None
    result = advise(margs, gpu=gpu_id, tokens=tokens, seq_len=seq_len, grad_accum=cfg.train.grad_accum_steps,
                    num_gpus=args.num_gpus, skip_modules=cfg.precision.skip_modules, rate_source=args.rates,
                    measured=measured, optimizer=args.optimizer or cfg.optim.name,
                    activation_checkpoint=args.activation_checkpoint or cfg.train.activation_checkpoint,
                    loss_chunk_tokens=cfg.train.loss_chunk_tokens)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        render(result, model_name=args.model)
    return 0


def render(a, *, model_name: str) -> None:
    from rich.table import Table

    from fp8lab.ui import console

    r = a.rates
    console.print(f"[bold]fp8lab advise[/]: {model_name} ({a.model['params'] / 1e9:.2f}B params) on {a.gpu['name']} "
                  f"({a.gpu['id']}), {a.tokens} tokens per micro-batch, seq {a.seq_len}"
                  + (f", {a.grad_accum} micro-batches per step" if a.grad_accum > 1 else "")
                  + (f", {a.num_gpus} GPUs" if a.num_gpus > 1 else ""))
    fmt = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    console.print(f"rates ({r['source']}): BF16 {fmt(r['bf16_tflops'])}, FP8 {fmt(r['fp8_tflops'])}, "
                  f"FP8 rowwise {fmt(r['fp8_rowwise_tflops'])}, MXFP8 {fmt(r['mxfp8_tflops'])} TFLOP/s achievable; "
                  f"memory {fmt(r['mem_gbs'])} GB/s")
    t = Table(title="predicted, per recipe (vs bf16)")
    for col in ("recipe", "speedup", "all linears", "step ms", "tokens/s", "MFU", "memory GB", "converts"):
        t.add_column(col, justify="left" if col in ("recipe", "converts") else "right", overflow="fold")
    for x in a.recipes:
        if not x.supported:
            t.add_row(x.recipe, "-", "-", "-", "-", "-", "-", "unsupported: " + "; ".join(x.notes))
            continue
        mem = f"{x.memory_gb:.1f}" + ("" if x.fits else " (>" + f"{a.gpu['mem_gb']:g})")
        conv = ", ".join(x.converted) if x.recipe != "bf16" else "-"
        t.add_row(x.recipe, f"{x.speedup:.2f}x", f"{x.speedup_all:.2f}x", f"{x.step_ms:,.1f}",
                  f"{x.tokens_per_s:,}", f"{x.mfu:.0%}", mem, conv or "nothing")
    console.print(t)
    low = [x for x in a.recipes if x.supported and x.recipe != "bf16"]
    if low:
        lt = Table(title=f"predicted per linear (fwd+bwd, x of bf16; converts at >= {_margin()}x)")
        lt.add_column("linear")
        lt.add_column("in -> out", justify="right")
        for x in low:
            lt.add_column(x.recipe, justify="right")
        shapes = {g["name"]: g for g in _groups(a)}
        for name in low[0].layer_speedups:
            g = shapes[name]
            lt.add_row(name, f"{g['k']} -> {g['n']} x{g['count']}", *(f"{x.layer_speedups[name]:.2f}" for x in low))
        console.print(lt)
    base = a.get("bf16")
    console.print("bf16 step, ms: " + ", ".join(f"{k} {v:,.1f}" for k, v in base.breakdown_ms.items()))
    m = a.memory_settings
    console.print(f"bf16 memory, GB (optimizer {m['optimizer']}, activation checkpointing "
                  f"{m['activation_checkpoint']}, compiled): "
                  + ", ".join(f"{k} {v:,.1f}" for k, v in base.memory_breakdown_gb.items()))
    console.print(f"[bold]recommended: {a.recommended}[/] - {a.why}")
    for c in a.caveats:
        console.print(f"  note: {c}")


def _margin() -> float:
    from fp8lab.perf.layer_policy import WIN_MARGIN

    return WIN_MARGIN


def _groups(a) -> list[dict]:
    from dataclasses import asdict

    from fp8lab.models.llama import ModelArgs
    from fp8lab.perf.roofline import model_linears

    keys = {f for f in ModelArgs.__dataclass_fields__}
    return [asdict(g) for g in model_linears(ModelArgs(**{k: v for k, v in a.model.items() if k in keys}))]
