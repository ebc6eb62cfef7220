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
    a.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: the config's "
                                                  "train.grad_accum_steps)")
    a.add_argument("--loss-head", choices=("fused", "plain", "checkpointed"),
                   help="the loss head the step runs (default: the config's train.loss_head)")
    a.add_argument("--residual-dtype", choices=("fp32", "bf16", "compute"),
                   help="dtype of the residual stream (default: the config's precision.residual_dtype; "
                        "compute = bf16)")
    a.add_argument("--bf16-step-ms", type=float,
                   help="a measured bf16 optimizer step of this configuration, in ms, to anchor the prediction to "
                        "(default: the one `fp8lab bench` cached for this GPU and configuration, if any)")
    a.add_argument("--no-anchor", action="store_true", help="do not anchor to a cached measured bf16 step")
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


def _settings(args, cfg) -> dict:
    """The step settings the prediction is for: flags first, then the config (keys a config of an
    older fp8lab lacks take the trainer's defaults)."""
    from fp8lab.models.head import resolve_head

    return {"grad_accum": args.grad_accum or cfg.train.grad_accum_steps,
            "optimizer": args.optimizer or cfg.optim.name,
            "activation_checkpoint": args.activation_checkpoint or cfg.train.activation_checkpoint,
            # auto resolves as on a GPU, which is what advise predicts
            "loss_head": args.loss_head or resolve_head(cfg.train.loss_head, compiled_cuda=cfg.precision.compile != "off",
                                                        chunk_tokens=cfg.train.loss_chunk_tokens),
            "residual_dtype": args.residual_dtype or cfg.precision.residual_dtype,
            "loss_chunk_tokens": cfg.train.loss_chunk_tokens}


def _bf16_step(args, gpu_id: str, margs, *, tokens: int, seq_len: int, st: dict) -> dict | None:
    """The bf16 step to anchor to: --bf16-step-ms, else `fp8lab bench`'s cached measurement of
    this configuration on this GPU model, else None."""
    from fp8lab.perf.measure import load_step_time, step_key

    if args.bf16_step_ms is not None:
        if not args.bf16_step_ms > 0:
            raise FP8LabError(f"--bf16-step-ms {args.bf16_step_ms!r} must be a positive number of milliseconds "
                              "(a measured bf16 step of this configuration)")
        return {"step_s": args.bf16_step_ms / 1e3, "source": "--bf16-step-ms"}
    if args.no_anchor:
        return None
    key = step_key(margs, tokens=tokens, seq_len=seq_len, grad_accum=st["grad_accum"], recipe="bf16",
                   loss_head=st["loss_head"], residual_dtype=st["residual_dtype"],
                   activation_checkpoint=st["activation_checkpoint"], optimizer=st["optimizer"], compiled=True)
    hit = load_step_time(gpu_id, key=key)
    if hit is None:
        return None
    return {"step_s": hit["step_s"], "source": f"{hit.get('source', 'fp8lab bench')} on {hit.get('device_name')}, "
                                               f"{hit.get('date', '?')}, torch {hit.get('torch', '?')}"}


def run(args, rest) -> int:
    from fp8lab.bench.advise import advise
    from fp8lab.perf.measure import load_measured_rates

    cfg, margs, seq_len = _model(args.model, args.seq_len)
    tokens = args.batch_tokens or cfg.data.micro_batch_size * seq_len
    if seq_len <= 0 or tokens <= 0 or args.num_gpus <= 0 or (args.grad_accum is not None and args.grad_accum <= 0):
        raise FP8LabError("--seq-len, --batch-tokens, --num-gpus and --grad-accum must be positive")
    if tokens < seq_len:
        raise FP8LabError(f"--batch-tokens {tokens} is less than one sequence of --seq-len {seq_len}")
    gpu_id = _gpu(args.gpu)
    st = _settings(args, cfg)
    measured = load_measured_rates(gpu_id) if args.rates in ("auto", "measured") else None
    result = advise(margs, gpu=gpu_id, tokens=tokens, seq_len=seq_len, num_gpus=args.num_gpus,
                    skip_modules=cfg.precision.skip_modules, rate_source=args.rates, measured=measured,
                    bf16_step=_bf16_step(args, gpu_id, margs, tokens=tokens, seq_len=seq_len, st=st), **st)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        render(result, model_name=args.model)
    return 0


def _fmt(v) -> str:
    return "-" if v is None else f"{v:g}"


def _rates_line(a) -> str:
    r = a.rates
    where = f"measured by fp8lab doctor on {r['measured_on']}" if r.get("measured_on") else r["source"]
    return (f"rates ({where}): BF16 {_fmt(r['bf16_tflops'])}, FP8 {_fmt(r['fp8_tflops'])}, "
            f"FP8 rowwise {_fmt(r['fp8_rowwise_tflops'])}, MXFP8 {_fmt(r['mxfp8_tflops'])} TFLOP/s achievable; "
            f"memory {_fmt(r['mem_gbs'])} GB/s")


def _recipe_table(a):
    from rich.table import Table

    anchored = a.anchor is not None
    t = Table(title="predicted, per recipe (vs bf16)" + ("; anchored to the measured bf16 step" if anchored else ""))
    cols = ["recipe", "speedup", "all linears", "step ms", "tokens/s", "MFU", "memory GB", "converts"]
    if anchored:
        cols[1:1] = ["anchored", "anchored, all", "anchored ms"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("recipe", "converts") else "right", overflow="fold")
    for x in a.recipes:
        extra = [f"{x.speedup_anchored:.2f}x" if x.speedup_anchored else "-",
                 f"{x.speedup_all_anchored:.2f}x" if x.speedup_all_anchored else "-",
                 f"{x.step_ms_anchored:,.1f}" if x.step_ms_anchored else "-"] if anchored else []
        if not x.supported:
            t.add_row(x.recipe, *(["-"] * len(extra)), "-", "-", "-", "-", "-", "-", "unsupported: " + "; ".join(x.notes))
            continue
        mem = f"{x.memory_gb:.1f}" + ("" if x.fits else " (>" + f"{a.gpu['mem_gb']:g})")
        conv = ", ".join(x.converted) if x.recipe != "bf16" else "-"
        t.add_row(x.recipe, *extra, f"{x.speedup:.2f}x", f"{x.speedup_all:.2f}x", f"{x.step_ms:,.1f}",
                  f"{x.tokens_per_s:,}", f"{x.mfu:.0%}", mem, conv or "nothing")
    return t


def render(a, *, model_name: str) -> None:
    from rich.table import Table

    from fp8lab.ui import console

    s = a.step_settings
    console.print(f"[bold]fp8lab advise[/]: {model_name} ({a.model['params'] / 1e9:.2f}B params) on {a.gpu['name']} "
                  f"({a.gpu['id']}), {a.tokens} tokens per micro-batch, seq {a.seq_len}"
                  + (f", {a.grad_accum} micro-batches per step" if a.grad_accum > 1 else "")
                  + (f", {a.num_gpus} GPUs" if a.num_gpus > 1 else "")
                  + f"; loss head {s['loss_head']}, residual stream {s['residual_dtype']}")
    console.print(_rates_line(a))
    if a.anchor:
        console.print(f"anchor: measured bf16 step {a.anchor['step_ms']:,.1f} ms ({a.anchor['source']}); the model's "
                      f"own bf16 step {a.anchor['predicted_ms']:,.1f} ms ({a.anchor['model_error']:+.1%})")
    console.print(_recipe_table(a))
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
