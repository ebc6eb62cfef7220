"""fp8lab export RUN_OR_CHECKPOINT --out DIR [--dtype bf16|fp32] [--step N]: a checkpoint as a
Hugging Face Llama folder (config.json, safetensors, generation_config.json, tokenizer files).

Exit codes: 0 written; 2 bad input (no checkpoint, a damaged one asked for by --step, DIR not
empty, ...), and then nothing is written at DIR.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 15  # after train in `fp8lab --help`

DESCRIPTION = ("Write a checkpoint as a Hugging Face LlamaForCausalLM folder that transformers (and what reads its "
               "format) loads without fp8lab or TorchAO: config.json, model.safetensors (sharded with "
               "model.safetensors.index.json above --max-shard-size), generation_config.json, and the run's tokenizer "
               "(tokenizer.json + tokenizer_config.json; byte-level runs get an equivalent tokenizer.json). A run "
               "directory exports its newest checkpoint that verifies (or the one of --step N); a checkpoint folder "
               "(RUN/checkpoints/step-N) exports itself.")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face Llama folder (safetensors)",
                       description=DESCRIPTION,
                       epilog="Exit codes: 0 written; 2 bad input (nothing is written at DIR).")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run directory or one of its checkpoint folders")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="dtype of the written weights (default bf16; the checkpoint's masters are fp32)")
    p.add_argument("--step", type=int, metavar="N", help="export the checkpoint of step N (default: the newest)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file before the weights are sharded (default 5GB, as transformers)")
    p.set_defaults(fn=run)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (KB/MB/GB decimal, KiB/MiB/GiB binary, bare numbers bytes)."""
    m = _SIZE.match(text)
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]) if m else 0
    if size < 1:
        raise FP8LabError(f"--max-shard-size={text!r} is not a size such as 5GB, 500MB or 2000000")
    return size


def pick_checkpoint(source: Path, *, step: int | None) -> tuple[Path, list[str]]:
    """The checkpoint to export from a run directory or checkpoint folder, and notes for the
    console (a newer checkpoint passed over because it does not verify)."""
    from fp8lab.train.checkpoint import MARKER, list_complete, verify_checkpoint

    if not source.is_dir():
        raise FP8LabError(f"{source} {'is a file' if source.exists() else 'does not exist'}; give a run directory "
                          "or a checkpoint folder (RUN/checkpoints/step-N)")
    if (source / MARKER).is_file() or (source / "state.json").is_file():
        return source, []
    if not (source / "checkpoints").is_dir():
        raise FP8LabError(f"{source} is neither an fp8lab run directory (no checkpoints/) nor a checkpoint folder "
                          f"(no {MARKER})")
    done = list_complete(source)
    if step is not None:
        done = [(s, p) for s, p in done if s == step]
        if not done:
            have = ", ".join(str(s) for s, _ in list_complete(source)) or "none"
            raise FP8LabError(f"{source} has no complete checkpoint of step {step} (complete: {have})")
    if not done:
        raise FP8LabError(f"{source} has no complete checkpoint to export (train with checkpoint.at_end=true, or "
                          "longer than checkpoint.interval)")
    notes = []
    for _, path in reversed(done):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, notes
        notes.append(f"checkpoint {path} does not verify ({problem}); passed over")
    raise FP8LabError(f"no checkpoint {'of step ' + str(step) + ' ' if step is not None else ''}in {source} verifies: "
                      f"{notes[0]}")


def run_tokenizer(ckpt: Path) -> tuple[dict[str, bytes], dict]:
    """The tokenizer files the run kept (RUN/tokenizer/, see train/rundir.py) and its special ids."""
    from fp8lab.interop.hf_tokenizer import SPECIAL_IDS, read_json
    from fp8lab.train.rundir import TOKENIZER_DIR

    folder = ckpt.parent.parent / TOKENIZER_DIR if ckpt.parent.name == "checkpoints" else None
    if folder is None or not folder.is_dir():
        return {}, {}
    ids = read_json(folder / SPECIAL_IDS, what="tokenizer record") if (folder / SPECIAL_IDS).is_file() else {}
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != SPECIAL_IDS}
    return files, ids


def run(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from fp8lab.interop.hf_llama import args_to_config, check_out_dir, to_hf_tensors, write_folder
    from fp8lab.models.llama import ModelArgs
    from fp8lab.train.checkpoint import read_model_tensors, read_state

    out = Path(args.out)
    check_out_dir(out)  # before reading gigabytes
    max_shard = parse_size(args.max_shard_size)
    ckpt, notes = pick_checkpoint(Path(args.source), step=args.step)
    for note in notes:
        print(f"note: {note}")
    state = read_state(ckpt)
    if args.step is not None and state["step"] != args.step:
        raise FP8LabError(f"checkpoint {ckpt} is of step {state['step']}, not --step {args.step}")
    if not isinstance(state.get("model_args"), dict):
        raise FP8LabError(f"checkpoint {ckpt}: state.json does not record the model's shape (model_args)")
    try:
        model_args = ModelArgs.from_dict(state["model_args"])
        model_args.check()
    except (TypeError, ValueError) as e:
        raise FP8LabError(f"checkpoint {ckpt}: state.json's model_args do not describe a model ({e})") from None
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tensors = to_hf_tensors(read_model_tensors(ckpt), model_args, dtype=dtype)
    files, ids = run_tokenizer(ckpt)
    special = {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = args_to_config(model_args, dtype=dtype, **special)
    generation = ids.get("generation_config") or {k: v for k, v in special.items() if v is not None}
    names = write_folder(out, tensors=tensors, config=config, generation_config=generation, files=files,
                         max_shard_bytes=max_shard)
    n_params = sum(t.numel() for t in tensors.values())
    print(f"exported {ckpt} (step {state['step']}, {n_params / 1e6:,.1f}M parameters, {args.dtype}) -> {out}")
    for name in names:
        print(f"  {name:<40} {(out / name).stat().st_size:>16,} bytes")
    if "tokenizer.json" not in files:
        print("note: the run recorded no tokenizer (data without a tokenizer file, or a run from before fp8lab "
              "kept one): add tokenizer files to the folder yourself")
    print("load with transformers:\n"
          f"  AutoModelForCausalLM.from_pretrained({json.dumps(str(out))})"
          + (f"; AutoTokenizer.from_pretrained({json.dumps(str(out))})" if "tokenizer.json" in files else ""))
    return 0
