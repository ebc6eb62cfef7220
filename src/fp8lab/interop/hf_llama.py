"""Hugging Face Llama folders <-> fp8lab's model: the config, the one fixed name table, the q/k
row order, and safetensors reading and writing.

fp8lab's Transformer is Meta-style: RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each
head. Hugging Face's LlamaForCausalLM rotates the two halves (x[i], x[i + head_dim/2]) instead
("rotate half"), so the rows of wq and wk are permuted within each head on the way out (what
transformers' convert_llama_weights_to_hf does to Meta's weights) and back on the way in. The
permutation moves rows only, so a round trip is exact; applied to q and k alike it leaves every
attention score, hence the logits, unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fp8lab.errors import FP8LabError
from fp8lab.fsutil import fsync_dir, os_error, write_durable
from fp8lab.interop.hf_tokenizer import read_json
from fp8lab.models.llama import ModelArgs, RopeScaling

SCHEME = "hf:"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")

# fp8lab name -> Hugging Face name; layer names are relative to layers.{i} / model.layers.{i}.
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
}
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
ROPE_PERMUTED = ("attention.wq.weight", "attention.wk.weight")
# Buffers some older exports saved as tensors; derived from the config, never learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SUPPORTED_ROPE = ("default", "linear", "llama3")


def hf_folder(init_from: str) -> Path:
    """The folder of `model.init_from` ("hf:PATH")."""
    if not init_from.startswith(SCHEME) or not init_from[len(SCHEME):]:
        raise FP8LabError(f"model.init_from={init_from!r}: expected {SCHEME}PATH (a local Hugging Face folder)")
    return Path(init_from[len(SCHEME):]).expanduser()


def name_table(args: ModelArgs) -> dict[str, str]:
    """{fp8lab parameter name: Hugging Face tensor name} for every weight the model holds, in
    the model's order (a tied model has no output.weight)."""
    table = {"tok_embeddings.weight": TOP_NAMES["tok_embeddings.weight"]}
    for i in range(args.n_layers):
        table.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in LAYER_NAMES.items()})
    table["norm.weight"] = TOP_NAMES["norm.weight"]
    if not args.tie_embeddings:
        table["output.weight"] = TOP_NAMES["output.weight"]
    return table


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """{fp8lab parameter name: shape} that `args` gives."""
    d, hd, f, v = args.dim, args.head_dim, args.ffn_dim, args.vocab_size
    layer = {
        "attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.n_kv_heads * hd, d),
        "attention.wv.weight": (args.n_kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d), "feed_forward.w2.weight": (d, f),
        "attention_norm.weight": (d,), "ffn_norm.weight": (d,),
    }
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    return {name: shapes[name] for name in name_table(args)}


def _heads_of(name: str, args: ModelArgs) -> int | None:
    """How many heads the rows of `name` hold, when they need the RoPE permutation."""
    if name.endswith(ROPE_PERMUTED[0]):
        return args.n_heads
    if name.endswith(ROPE_PERMUTED[1]):
        return args.n_kv_heads
    return None


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows, fp8lab's interleaved RoPE pairs -> HF's rotate-half order: within each
    head, row 2i + j moves to j * head_dim/2 + i."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# -- config.json -------------------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    """FOLDER/config.json as a dict; a missing folder or file is a one-line FP8LabError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FP8LabError(f"Hugging Face folder {folder} {'is a file' if folder.exists() else 'does not exist'}; "
                          f"give a local folder holding {CONFIG} and {WEIGHTS}")
    if not (folder / CONFIG).is_file():
        raise FP8LabError(f"{folder} has no {CONFIG}: not a Hugging Face model folder")
    return read_json(folder / CONFIG, what="model config")


def _get(cfg: dict, key: str, kind: type, origin: str, default=None):
    """cfg[key] (or `default`) as `kind`; JSON's ints pass as floats, bools never as numbers."""
    value = cfg.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is None:
        raise FP8LabError(f"{origin}: {key} is missing")
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise FP8LabError(f"{origin}: {key}={value!r} is not a{'n' if kind is int else ''} {kind.__name__}")
    return value


def _rope(cfg: dict, origin: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either layout: transformers 5's `rope_parameters` (theta inside) or
    4's top-level `rope_theta` with `rope_scaling` (whose type may be under "type"). With both,
    `rope_scaling` wins, as in transformers 5."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise FP8LabError(f"{origin}: {key}={params!r} is not a JSON object")
    if any(isinstance(v, dict) for v in params.values()):
        raise FP8LabError(f"{origin}: {key} holds per-layer-type RoPE settings; fp8lab supports one RoPE for "
                          "every layer")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise FP8LabError(f"{origin}: rope_theta={theta!r} is not a positive number")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise FP8LabError(f"{origin}: {key}.rope_type={kind!r} is not supported (fp8lab supports "
                          f"{', '.join(SUPPORTED_ROPE)})")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise FP8LabError(f"{origin}: partial_rotary_factor={partial!r} is not supported (fp8lab rotates the "
                          "whole head)")
    if kind == "default":
        return float(theta), None
    where = f"{origin} ({key})"
    scaling = RopeScaling(rope_type=kind, factor=_get(params, "factor", float, where))
    if kind == "llama3":
        scaling = RopeScaling(
            rope_type=kind, factor=scaling.factor,
            low_freq_factor=_get(params, "low_freq_factor", float, where),
            high_freq_factor=_get(params, "high_freq_factor", float, where),
            original_max_position_embeddings=_get(params, "original_max_position_embeddings", int, where,
                                                  default=cfg.get("max_position_embeddings")))
    return float(theta), scaling


def config_to_args(cfg: dict, *, origin: str) -> ModelArgs:
    """ModelArgs from a Hugging Face Llama config.json (`origin` names the file in errors). What
    fp8lab's model cannot express is a one-line FP8LabError naming the key and its value."""
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise FP8LabError(f"{origin}: model_type={model_type!r} is not supported; fp8lab imports Llama-architecture "
                          "models (model_type 'llama', LlamaForCausalLM)")
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if archs != ["LlamaForCausalLM"]:
        raise FP8LabError(f"{origin}: architectures={archs!r} is not supported; fp8lab imports LlamaForCausalLM")
    for key, want in (("hidden_act", ("silu", "swish")), ("attention_bias", (False,)), ("mlp_bias", (False,))):
        if cfg.get(key, want[0]) not in want:
            raise FP8LabError(f"{origin}: {key}={cfg[key]!r} is not supported (fp8lab's Llama has {key}={want[0]!r})")
    dim = _get(cfg, "hidden_size", int, origin)
    heads = _get(cfg, "num_attention_heads", int, origin)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim * heads != dim):
        raise FP8LabError(f"{origin}: head_dim={head_dim!r} is not supported: fp8lab's head dim is hidden_size / "
                          f"num_attention_heads = {dim} / {heads}")
    theta, scaling = _rope(cfg, origin)
    args = ModelArgs(
        dim=dim, n_layers=_get(cfg, "num_hidden_layers", int, origin), n_heads=heads,
        n_kv_heads=_get(cfg, "num_key_value_heads", int, origin, default=heads),
        vocab_size=_get(cfg, "vocab_size", int, origin), ffn_dim=_get(cfg, "intermediate_size", int, origin),
        norm_eps=_get(cfg, "rms_norm_eps", float, origin, default=1e-6), rope_theta=theta,
        max_seq_len=_get(cfg, "max_position_embeddings", int, origin, default=2048),
        tie_embeddings=_get(cfg, "tie_word_embeddings", bool, origin, default=False), rope_scaling=scaling)
    try:
        args.check()
    except ValueError as e:
        raise FP8LabError(f"{origin}: {e}") from None
    return args


def import_args(folder: Path, *, data_vocab: int, seq_len: int) -> ModelArgs:
    """The model shape of Hugging Face `folder`, checked against the data that is to train it."""
    folder = Path(folder)
    args = config_to_args(read_config(folder), origin=str(folder / CONFIG))
    if data_vocab > args.vocab_size:
        raise FP8LabError(f"the data's vocabulary ({data_vocab:,} ids) does not fit the model's ({args.vocab_size:,}, "
                          f"{folder / CONFIG}); prepare the data with the model's tokenizer: fp8lab prepare "
                          f"--tokenizer {folder} ...")
    if seq_len > args.max_seq_len:
        raise FP8LabError(f"data.seq_len={seq_len} exceeds max_position_embeddings={args.max_seq_len} of "
                          f"{folder / CONFIG}; prepare shorter sequences")
    return args


def args_to_config(args: ModelArgs, *, dtype: torch.dtype, bos_token_id=None, eos_token_id=None,
                   pad_token_id=None) -> dict:
    """config.json of a LlamaForCausalLM with `args`' shape. RoPE is written both ways (transformers
    5's `rope_parameters`; 4's `rope_theta` + `rope_scaling`) so either major version reads it."""
    s = args.rope_scaling
    scaling = None if s is None else {"rope_type": s.rope_type, "factor": s.factor, **(
        {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
         "original_max_position_embeddings": s.original_max_position_embeddings} if s.rope_type == "llama3" else {})}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default" if s is None else s.rope_type, "rope_theta": args.rope_theta,
                            **({k: v for k, v in scaling.items() if k != "rope_type"} if scaling else {})},
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id, "torch_dtype": dtype_name, "dtype": dtype_name,
    }


# -- safetensors in ----------------------------------------------------------------------------

def weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} of a folder (one model.safetensors, or the
    shards model.safetensors.index.json maps)."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / WEIGHTS_INDEX).is_file():
        index = read_json(folder / WEIGHTS_INDEX, what="safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise FP8LabError(f"{folder / WEIGHTS_INDEX} has no weight_map")
        out = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:
                raise FP8LabError(f"{folder / WEIGHTS_INDEX}: {name} is mapped to {file!r}, not a file in {folder}")
            out[name] = folder / file
        return out
    if not (folder / WEIGHTS).is_file():
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        hint = f" (found {', '.join(others[:3])}: fp8lab reads safetensors only, never pickles)" if others else ""
        raise FP8LabError(f"{folder} has no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")
    try:
        with safe_open(folder / WEIGHTS, framework="pt") as f:
            return {name: folder / WEIGHTS for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise FP8LabError(f"{folder / WEIGHTS} is not a readable safetensors file: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@torch.no_grad()
def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Fill fp8lab `model` (plain, before conversion; its args set the shape) with the weights of a
    Hugging Face Llama folder, converting dtype and RoPE row order. A missing, misshaped or
    unexpected tensor is a one-line FP8LabError naming the tensor and the file."""
    from safetensors import safe_open

    folder = Path(folder)
    args: ModelArgs = model.args
    files = weight_files(folder)
    table, shapes = name_table(args), expected_shapes(args)
    wanted = set(table.values())
    tied_head = TOP_NAMES["output.weight"] if args.tie_embeddings else None  # some tied exports keep a copy
    extra = sorted(n for n in files if n not in wanted and n != tied_head and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise FP8LabError(f"{files[extra[0]]}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)"
                          if len(extra) > 1 else "") + f"; {folder / CONFIG} does not describe it")
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for ours, theirs in table.items():
        if theirs not in files:
            where = folder / (WEIGHTS_INDEX if (folder / WEIGHTS_INDEX).is_file() else WEIGHTS)
            raise FP8LabError(f"{where}: tensor {theirs} is missing (the config asks for it)")
        by_file.setdefault(files[theirs], []).append(ours)
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for ours in names:
                    theirs = table[ours]
                    if theirs not in present:
                        raise FP8LabError(f"{path}: tensor {theirs} is missing (the index says it is here)")
                    t = f.get_tensor(theirs)
                    if tuple(t.shape) != shapes[ours]:
                        raise FP8LabError(f"{path}: tensor {theirs} has shape {tuple(t.shape)}, the config says "
                                          f"{shapes[ours]}")
                    if not t.is_floating_point():
                        raise FP8LabError(f"{path}: tensor {theirs} is {t.dtype}, not a float tensor (quantized "
                                          "weights are not supported)")
                    heads = _heads_of(ours, args)
                    params[ours].copy_(half_to_interleaved(t, heads) if heads else t)
        except FP8LabError:
            raise
        except OSError as e:
            raise os_error(e, path=path, action="read") from None
        except Exception as e:  # noqa: BLE001 - safetensors' own errors: a truncated or damaged file
            raise FP8LabError(f"{path} is not a readable safetensors file: {_first_line(e)}") from None


# -- a folder out ------------------------------------------------------------------------------

def to_hf_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8lab {parameter name: tensor} -> Hugging Face {name: contiguous tensor in `dtype`}, in the
    name table's order; every expected tensor must be there with its shape."""
    shapes = expected_shapes(args)
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise FP8LabError(f"the checkpoint lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:]
                                                                   else "") + " for its recorded model shape")
    out = {}
    for ours, theirs in name_table(args).items():
        t = tensors[ours]
        if tuple(t.shape) != shapes[ours]:
            raise FP8LabError(f"the checkpoint's {ours} has shape {tuple(t.shape)}, its recorded model shape "
                              f"says {shapes[ours]}")
        heads = _heads_of(ours, args)
        t = interleaved_to_half(t, heads) if heads else t
        out[theirs] = t.to(dtype).contiguous().clone()  # clone: no two entries may share storage
    return out


def check_out_dir(out: Path) -> None:
    """Refuse an output that exists and is not an empty directory (nothing is ever overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "exists and is not empty"
        raise FP8LabError(f"output {out} {what}; fp8lab export never overwrites: choose a new --out")


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of `tensors` of at most `max_bytes` each (a larger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def write_folder(out: Path, *, tensors: dict[str, torch.Tensor], config: dict, generation_config: dict,
                 files: dict[str, bytes], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write a Hugging Face model folder at `out`: config.json, generation_config.json, the weights
    (sharded with an index above `max_shard_bytes`) and `files` (name -> bytes, e.g. tokenizer
    files). Built in a temporary sibling and renamed into place, so an error leaves nothing at
    `out`. Returns the names written."""
    from safetensors.torch import save_file

    out = Path(out)
    check_out_dir(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        groups = shard(tensors, max_shard_bytes)
        names = [WEIGHTS] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                                    for i in range(len(groups))]
        for name, group in zip(names, groups, strict=True):
            save_file(group, str(tmp / name), metadata={"format": "pt"})  # transformers wants the format key
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {t: name for name, group in zip(names, groups, strict=True) for t in group}}
            write_durable(tmp / WEIGHTS_INDEX, json.dumps(index, indent=2) + "\n")
            names.append(WEIGHTS_INDEX)
        for name, value in ((CONFIG, config), (GENERATION_CONFIG, generation_config)):
            write_durable(tmp / name, json.dumps(value, indent=2) + "\n")
            names.append(name)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            names.append(name)
        for p in tmp.iterdir():  # make the data durable before the rename publishes it
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if out.is_dir():
            out.rmdir()  # empty (checked above): rename cannot replace a directory on every system
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, path=e.filename or out, elsewhere="choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names
