"""Turn a JobConfig into the pieces a run needs: device, data, model, precision, optimizer.

Order matters and is the same for every recipe: the model is built and initialised in
fp32 from `train.seed` *before* conversion, so every recipe starts from identical weights;
conversion happens before compile (which must trace the converted modules), compile before
FSDP2 sharding (as torchtitan orders them), and the optimizer is built last, on the final
(possibly sharded) parameters.

Under FSDP2 no rank ever holds the whole model: it is built on the meta device (shapes only),
converted, compiled and sharded there, then each rank materialises its shards and fills them
from the very numbers one process draws (`materialise`), so any rank count starts from the
weights a single process starts from, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from fp8lab.config import JobConfig
from fp8lab.data import TokenLoader, embedded_dataset, eval_batches, open_dataset
from fp8lab.env import device_memory_bytes, device_name, pick_device
from fp8lab.errors import FP8LabError
from fp8lab.gpus import mfu_peak_tflops
from fp8lab.interop.hf_llama import hf_folder, import_args, load_weights
from fp8lab.interop.hf_tokenizer import check_data_tokenizer
from fp8lab.models import ModelArgs, Transformer, flops_per_token, param_counts, preset_args
from fp8lab.models.head import resolve_head, softmax_grad
from fp8lab.perf.layer_policy import layer_policy
from fp8lab.precision import EMULATION_NOTE, ConversionReport, convert, get_recipe, plan_conversion, to_plain
from fp8lab.precision.fsdp import check_fp8_gather_shapes
from fp8lab.precision.support import resolve_compute_dtype, resolve_emulation, run_label
from fp8lab.precision.swap import swap_linears
from fp8lab.train.ac import ac_note, apply_activation_checkpointing
from fp8lab.train.dist import SINGLE, DistEnv
from fp8lab.train.dist import current as dist_current
from fp8lab.train.optim import build_optimizer
from fp8lab.train.rng import seed_everything


def open_data(cfg: JobConfig):
    path = cfg.data.path
    if path == "embedded":
        path = embedded_dataset(seq_len=cfg.data.seq_len, byte_budget=cfg.data.embedded_bytes)
    ds = open_dataset(Path(path), verify=cfg.data.verify)
    if ds.seq_len != cfg.data.seq_len:
        raise FP8LabError(f"data.seq_len={cfg.data.seq_len} but {ds.path} was prepared with seq_len {ds.seq_len}; "
                          f"set --data.seq_len={ds.seq_len} or prepare the data again")
    return ds


def model_args_for(cfg: JobConfig, data_vocab: int) -> ModelArgs:
    m = cfg.model
    if m.init_from:  # the Hugging Face config.json sets the whole shape
        return import_args(hf_folder(m.init_from), data_vocab=data_vocab, seq_len=cfg.data.seq_len)
    vocab = m.vocab_size or -(-data_vocab // 64) * 64
    if vocab < data_vocab:
        raise FP8LabError(f"model.vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab}); "
                          "raise it or set 0 to follow the data")
    args = preset_args(m.preset, vocab_size=vocab, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
                       n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim, tie_embeddings=m.tie_embeddings,
                       max_seq_len=m.max_seq_len)
    if cfg.data.seq_len > args.max_seq_len:
        raise FP8LabError(f"data.seq_len={cfg.data.seq_len} exceeds the {m.preset} model's max_seq_len "
                          f"({args.max_seq_len}); prepare shorter sequences, or set --model.max_seq_len "
                          f"(RoPE has no learned positions, but the model was sized for {args.max_seq_len})")
    return args


@dataclass
class RunParts:
    """What a run trains with, built from its config by `build`."""
    device: torch.device
    model: nn.Module  # converted; with compile on, each block is compiled in place (names unchanged)
    optimizer: torch.optim.Optimizer
    report: ConversionReport
    compute_dtype: torch.dtype
    label: str  # what runs, in words: the recipe, or "fp32 (bf16 recipe ...)" where bf16 autocast does not
    mfu_peak_tflops: float | None  # MFU's denominator for this recipe on this GPU (gpus.mfu_peak); None on CPU
    model_args: ModelArgs
    dataset: object
    loader: TokenLoader
    eval_batches: list
    flops_per_token: float
    compiled: bool
    notes: list[str]
    dist: DistEnv = SINGLE  # the rank, with parallel.data_parallel=fsdp
    loss_grad_fn: Callable | None = None  # the fused loss head's softmax pass, compiled (None: eager)
    loss_head: str = "plain"  # train.loss_head with auto resolved (models/head.py)

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def build(cfg: JobConfig, *, extra_skip: list[str] = (), fresh: bool = True) -> RunParts:
    """Everything a run needs from `cfg`; `extra_skip` adds layers to keep in bf16 (the
    guard's per-layer fallback). `fresh=False` when a checkpoint is loaded over the weights next:
    model.init_from's weights are then not read (its config still sets the shape)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    # Inductor lowers the embedding backward to atomic adds unless deterministic
    # algorithms are on: without it a compiled CPU run differs from itself by ~1e-8.
    deterministic = cfg.train.deterministic == "on" or (cfg.train.deterministic == "auto" and device.type == "cpu")
    if deterministic and device.type == "cuda":
        # cuBLAS refuses deterministic mode without a fixed workspace (torch docs,
        # "Reproducibility"); it must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    recipe = get_recipe(cfg.precision.recipe)
    notes: list[str] = []
    compute_dtype, why = resolve_compute_dtype(cfg.precision.compute_dtype, low_precision=recipe.is_low_precision,
                                               device=device)
    notes += [why] if why else []

    ds = open_data(cfg)
    args = model_args_for(cfg, ds.vocab_size)
    if cfg.model.init_from:
        check_data_tokenizer(hf_folder(cfg.model.init_from), ds)
    env = dist_current()
    # On CUDA the next batches are gathered and pinned on a thread while the GPU computes;
    # on CPU that thread would only compete with the compute for the same cores.
    on_cuda = device.type == "cuda"
    loader = TokenLoader(ds.split("train"), batch_size=cfg.data.micro_batch_size, seed=cfg.data.seed,
                         vocab_size=args.vocab_size, max_seq_len=args.max_seq_len,
                         prefetch=2 if on_cuda else 0, pin_memory=on_cuda, rank=env.rank, world_size=env.world_size,
                         documents=cfg.data.document_mask)
    # The held-out batches are global (micro_batch_size x ranks sequences each) and every rank
    # evaluates its rows of them, so N ranks evaluate exactly what one process with N x B would.
    held_out = [tuple(t[env.rank::env.world_size] for t in batch)
                for batch in eval_batches(ds.split("val"), batch_size=cfg.data.micro_batch_size * env.world_size,
                                          num_batches=cfg.train.eval_batches, documents=cfg.data.document_mask)]
    if len(held_out) < cfg.train.eval_batches:
        notes.append(f"the validation split of {ds.path} holds {len(ds.split('val'))} sequences: "
                     f"{len(held_out)} eval batch(es) of {cfg.data.micro_batch_size * env.world_size} instead of "
                     f"train.eval_batches={cfg.train.eval_batches}; the eval loss is noisier (prepare with a larger "
                     "--val-fraction, or lower train.eval_batches)")

    fsdp = cfg.parallel.data_parallel == "fsdp"
    check_fits(args, device, shards=shard_count(env, cfg.parallel.replicate) if fsdp else 1)
    seed_everything(cfg.train.seed)
    init_rng = _rng_state(device)  # what `materialise` draws the initial weights from
    with torch.device("meta" if fsdp else device):  # meta: no memory; the weights come after sharding
        model = Transformer(args)
    hf = hf_folder(cfg.model.init_from) if cfg.model.init_from and fresh else None
    if hf is not None and not fsdp:  # into the plain fp32 model, before conversion, compile and sharding
        load_weights(model, hf)
    if cfg.model.init_from:
        notes.append(f"model: {cfg.model.init_from[3:]} (Hugging Face Llama, {args.n_layers} layers, dim {args.dim}, "
                     f"vocabulary {args.vocab_size:,})" + ("; initial weights from its safetensors" if fresh else ""))
    mode = cfg.precision.filter_mode
    # auto / roofline: the perf layer decides per shape (timed here, or predicted), the converter applies it.
    policy = layer_policy(recipe, mode=mode, device=device, filter_gpu=cfg.precision.filter_gpu,
                          tokens=cfg.data.micro_batch_size * cfg.data.seq_len) if mode in ("auto", "roofline") else None
    how = dict(recipe=recipe, emulate=cfg.precision.emulate, skip_modules=[*cfg.precision.skip_modules, *extra_skip],
               filter_mode="all" if policy else mode, filter_fn=policy,
               fsdp_float8_all_gather=cfg.parallel.float8_all_gather)
    report = convert_meta(model, device=device, **how) if fsdp else convert(model, **how)
    if report.emulated:
        notes.append(EMULATION_NOTE)
    compiled = cfg.precision.compile == "on" or (cfg.precision.compile == "auto" and device.type == "cuda")
    try:
        loss_head = resolve_head(cfg.train.loss_head, compiled_cuda=compiled and on_cuda,
                                 output_converted=any(c["name"] == "output" for c in report.converted),
                                 chunk_tokens=cfg.train.loss_chunk_tokens)
    except ValueError as e:
        raise FP8LabError(str(e)) from None
    if cfg.train.loss_head == "auto" and on_cuda and loss_head != "fused":
        notes.append(f"train.loss_head=auto: the {loss_head} loss head, as "
                     + ("the output layer is FP8" if compiled else "precision.compile is off (the fused head's "
                                                                    "softmax pass runs compiled)"))
    if cfg.precision.residual_dtype == "compute":
        model.residual_dtype = compute_dtype
        if compute_dtype != torch.float32:
            notes.append(f"precision.residual_dtype=compute: the residual stream between blocks is "
                         f"{str(compute_dtype).removeprefix('torch.')}")
    # After conversion (it recomputes the converted layers too), before compile (which must trace
    # the checkpointed forward) and FSDP2 (whose per-block hooks then sit outside it): torchtitan's order.
    if apply_activation_checkpointing(model, mode=cfg.train.activation_checkpoint):
        notes.append(ac_note(cfg.train.activation_checkpoint))
    if compiled:
        # Per block, as torchtitan does: the blocks are identical, so dynamo compiles one
        # graph and reuses it (compile time does not grow with depth), and compiling in
        # place keeps the parameter names a checkpoint needs.
        for block in model.layers.values():
            block.compile(dynamic=False)
    # The head: the final norm (~8 eager kernels over the hidden states, one compiled) and the fused
    # loss head's softmax pass, memory-bound over (chunk x vocab) logits (compiled, it reads them
    # once or twice instead of ~6 times). On CPU both stay eager: inductor's C++ build costs more
    # there than they do (CPU runs are tests, not training).
    loss_grad_fn = None
    if compiled and on_cuda:
        model.norm.compile(dynamic=False)
        if loss_head == "fused":
            loss_grad_fn = torch.compile(softmax_grad, dynamic=False)
    if fsdp:
        if cfg.parallel.float8_all_gather:
            check_fp8_gather_shapes(model, report, shard_count(env, cfg.parallel.replicate))
        shard(model, env, device=device, compute_dtype=compute_dtype, replicate=cfg.parallel.replicate)
        materialise(model, device, rng=init_rng, hf=hf)
    optimizer = build_optimizer(model, cfg.optim, device=device)  # on the final (maybe sharded) parameters
    label = run_label(recipe, compute_dtype, setting=cfg.precision.compute_dtype)
    peak = mfu_peak_tflops(device_name(device), recipe.math) if device.type == "cuda" else None
    return RunParts(device=device, model=model, optimizer=optimizer, report=report, compute_dtype=compute_dtype,
                    label=label, mfu_peak_tflops=peak, model_args=args, dataset=ds, loader=loader, eval_batches=held_out,
                    flops_per_token=flops_per_token(args, cfg.data.seq_len), compiled=compiled, notes=notes, dist=env,
                    loss_grad_fn=loss_grad_fn, loss_head=loss_head)


TRAINING_BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments


def check_fits(args: ModelArgs, device: torch.device, *, shards: int = 1) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and optimizer state
    alone exceed the device's memory (a typo such as model.dim=1000000 would otherwise end in an
    allocator error or the OOM killer)."""
    have = device_memory_bytes(device)
    n = param_counts(args).total
    need = n * TRAINING_BYTES_PER_PARAM / shards
    if have is not None and need > have:
        where = device_name(device) if device.type == "cuda" else "this machine's RAM"
        raise FP8LabError(f"the model (dim {args.dim:,}, {args.n_layers:,} layers, vocabulary {args.vocab_size:,}) has "
                          f"{n / 1e9:,.2f}B "
                          f"parameters: their fp32 weights, gradients and AdamW state alone need {need / 1e9:,.1f} GB "
                          f"per {'rank' if shards > 1 else 'device'}, more than the {have / 1e9:,.1f} GB of {where}; "
                          "choose a smaller model (model.preset, model.dim, model.n_layers, model.vocab_size)")


def shard_count(env: DistEnv, replicate: int) -> int:
    """Ranks each parameter is sharded over: all of them, or world_size / replicate under HSDP."""
    if replicate < 1 or env.world_size % replicate:
        raise FP8LabError(f"parallel.replicate={replicate} does not divide the {env.world_size} ranks; HSDP needs "
                          "replicate x shard = ranks (e.g. replicate = the number of nodes)")
    return env.world_size // replicate


def shard(model: nn.Module, env: DistEnv, *, device: torch.device, compute_dtype: torch.dtype,
          replicate: int = 1) -> None:
    """FSDP2 over all ranks: each block is its own unit (its weights are gathered just before
    it runs and freed after), then the root for the embeddings, norm and output layer. With
    bf16 compute the weights are gathered in bf16 (half the bytes of the fp32 masters) and the
    gradients reduced in fp32, as torchtitan does; FP8 all-gathered weights go as FP8.

    replicate > 1 is HSDP: a (replicate, shard) mesh, consecutive ranks (one node's GPUs) forming
    a shard group, so the gathers stay inside a node and only the gradient all-reduce crosses
    nodes; each replica group holds a whole copy of the sharded state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not env.active:
        raise FP8LabError("parallel.data_parallel=fsdp needs a process group: launch with torchrun")
    shards = shard_count(env, replicate)
    if replicate == 1:
        mesh = init_device_mesh(device.type, (env.world_size,))
    else:
        mesh = init_device_mesh(device.type, (replicate, shards), mesh_dim_names=("replicate", "shard"))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def convert_meta(model: nn.Module, *, device: torch.device, recipe, emulate: str, skip_modules, filter_mode: str,
                 filter_fn, fsdp_float8_all_gather: bool) -> ConversionReport:
    """`convert` for a model on the meta device: convert() decides emulation from the device of
    the model's parameters, which here is meta, so it is decided for `device`, where the
    model will run; the rest is convert()'s own steps (plan, swap)."""
    emulated = resolve_emulation(recipe, device, emulate)
    report = ConversionReport(recipe=recipe.name, emulated=emulated, fsdp_float8_all_gather=fsdp_float8_all_gather)
    if recipe.is_low_precision:
        report.converted, report.skipped = plan_conversion(model, recipe, skip_modules=skip_modules,
                                                           filter_mode=filter_mode, filter_fn=filter_fn)
        swap_linears(model, recipe, names={c["name"] for c in report.converted}, emulated=emulated,
                     fsdp_float8_all_gather=fsdp_float8_all_gather)
        if emulated:
            logging.getLogger("fp8lab").warning(EMULATION_NOTE)
    return report


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@torch.no_grad()
def _fill_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` (the whole parameter, identical on every rank) into
    `param`: a DTensor's shard is cut locally (src_data_rank=None: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    target = to_plain(param)  # the fp32 master inside TorchAO's FP8 all-gather wrapper
    if isinstance(target, DTensor):
        full = full.to(target.device)
        target.to_local().copy_(distribute_tensor(full, target.device_mesh, target.placements,
                                                  src_data_rank=None).to_local())
    else:
        target.copy_(full)


class _ShardSink:
    """What hf_llama.load_weights copies a full tensor into (`.copy_`): this rank's shard."""

    def __init__(self, param: torch.Tensor):
        self.param = param

    def copy_(self, full: torch.Tensor) -> None:
        _fill_shard(self.param, full)


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device, *, rng: tuple, hf: Path | None = None) -> None:
    """Allocate a sharded meta-device model's shards on `device` and initialise them as one
    process initialises the whole model: from the generator state right after seeding, the
    layer constructors' draws are replayed, then each parameter in turn is drawn whole (on
    `device`, in Transformer.init_plan's order) and only this rank's shard is kept, so at most
    one full parameter exists at a time. The generator ends where a single process's ends.
    With `hf`, the Hugging Face tensors are then read one at a time the same way."""
    cpu_state, cuda_state = rng
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)
    with torch.device(device):
        for make in model.constructor_draws():  # what a plain build's layer constructors drew first
            make()
    model.to_empty(device=device)
    model.init_buffers()  # RoPE tables: computed, not drawn
    params = dict(model.named_parameters())
    for name, fill in model.init_plan():
        full = torch.empty(params[name].shape, dtype=to_plain(params[name]).dtype, device=device)
        fill(full)
        _fill_shard(params[name], full)
        del full
    if hf is not None:
        # load_weights reads model.args and named_parameters() and copies each tensor in with
        # .copy_; handing it sinks keeps one full tensor in memory, never the model.
        sinks = [(n, _ShardSink(p)) for n, p in model.named_parameters()]
        load_weights(SimpleNamespace(args=model.args, named_parameters=lambda: iter(sinks)), hf)
