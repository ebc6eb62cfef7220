"""The job configuration's sections: one dataclass per component, each field carrying its
documentation (and, where the value is one of a set, its choices) in `metadata`, so errors and
`fp8lab train --help-config` can name the key and list what is allowed. Each section validates
itself in `__post_init__`; cross-section rules live in `JobConfig.__post_init__`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import tomli_w

from fp8lab.errors import FP8LabError
from fp8lab.gpus import GPUS
from fp8lab.models.presets import PRESETS
from fp8lab.precision.recipes import RECIPES


def opt(default: Any, doc: str, *, choices: tuple | None = None) -> Any:
    """A config field with its documentation and, optionally, its allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check_choices(obj: Any, section: str) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise FP8LabError(
                f"{section}.{f.name}={value!r} is not allowed; choose one of: {', '.join(map(str, choices))}"
            )


def _positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and not math.isfinite(v):
            raise FP8LabError(f"{section}.{name}={v} must be a finite number")
        if v is not None and (v < 0 or (v == 0 and not allow_zero)):
            need = ">= 0" if allow_zero else "> 0"
            raise FP8LabError(f"{section}.{name}={v} must be {need}")


@dataclass
class ModelConfig:
    preset: str = opt("debug", "named size", choices=tuple(PRESETS))
    vocab_size: int = opt(0, "0: the data's vocabulary rounded up to a multiple of 64 (tensor-core friendly)")
    dim: Optional[int] = opt(None, "override the preset's model width")
    n_layers: Optional[int] = opt(None, "override the preset's number of blocks")
    n_heads: Optional[int] = opt(None, "override the preset's attention heads")
    n_kv_heads: Optional[int] = opt(None, "override the preset's key/value heads (grouped-query attention)")
    ffn_dim: Optional[int] = opt(None, "override the preset's SwiGLU hidden size")
    tie_embeddings: Optional[bool] = opt(None, "override whether the output head shares the embedding weights")
    max_seq_len: Optional[int] = opt(None, "override the preset's maximum sequence length")
    init_from: Optional[str] = opt(None, "hf:PATH, a local Hugging Face Llama folder: the model's shape and initial "
                                         "weights (no other model.* key; prepare the data with --tokenizer PATH)")

    def __post_init__(self):
        _check_choices(self, "model")
        _positive("model", self, "vocab_size", allow_zero=True)
        _positive("model", self, "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        if self.init_from is not None and (not self.init_from.startswith("hf:") or self.init_from == "hf:"):
            raise FP8LabError(f"model.init_from={self.init_from!r}: expected hf:PATH, a local Hugging Face model folder")
        shape = [f"model.{k}={v}" for k, v in dataclasses.asdict(self).items()  # vocab_size 0: follow the data
                 if v is not None and k not in ("preset", "init_from") and (k, v) != ("vocab_size", 0)]
        if self.init_from is not None and shape:
            raise FP8LabError(f"{', '.join(shape)} cannot be combined with model.init_from: its config.json sets the shape")


@dataclass
class DataConfig:
    path: str = opt("embedded", "a prepared data directory (manifest.json + shards), or 'embedded' for the "
                                "built-in corpus (Python standard library source, byte-level)")
    seq_len: int = opt(512, "tokens per training sequence; must equal the prepared data's seq_len")
    micro_batch_size: int = opt(8, "sequences per forward/backward pass")
    seed: int = opt(0, "seed of the data order (separate from train.seed, the init seed)")
    embedded_bytes: int = opt(4_000_000, "byte budget of the embedded corpus")
    verify: str = opt("size", "checks on open: header and sizes, or also every shard's sha256",
                      choices=("size", "full"))
    document_mask: bool = opt(False, "documents packed into one sequence do not attend to each other (a "
                                     "boolean mask in SDPA, from the data's document starts or its EOS "
                                     "tokens); off: plain causal attention over the whole window")

    def __post_init__(self):
        _check_choices(self, "data")
        _positive("data", self, "seq_len", "micro_batch_size", "embedded_bytes")
        _positive("data", self, "seed", allow_zero=True)


# Signals that stop a run after saving a checkpoint (train/preempt.py); SIGINT (Ctrl-C) stops at once.
STOP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


@dataclass
class TrainConfig:
    steps: int = opt(100, "optimizer steps to train for (0: evaluate and save the step-0 checkpoint only)")
    grad_accum_steps: int = opt(1, "micro-batches per optimizer step")
    loss_head: str = opt("auto", "how the output layer and loss run: fused = chunk by chunk, the logits' "
                                 "gradient and both backward GEMMs computed in forward (no fp32 logits, no "
                                 "recompute); plain = all tokens at once on fp32 logits; checkpointed = chunks "
                                 "recomputed in backward; auto = fused on CUDA with compile, else checkpointed if "
                                 "train.loss_chunk_tokens is set, else plain (also for an FP8 output layer, which "
                                 "fused cannot run)",
                         choices=("auto", "fused", "plain", "checkpointed"))
    loss_chunk_tokens: int = opt(0, "tokens per chunk of the fused and checkpointed loss heads (0: as many as "
                                    "keep a chunk's logits under 512M values when the fused head's softmax pass is compiled, 64M when "
                                    "eager; chunks made equal)")
    deferred_sync: bool = opt(True, "read the loss and gradient norm after the optimizer step is queued, which "
                                    "skips a non-finite step on the device (fused AdamW's found_inf), so the GPU "
                                    "never waits mid-step; needs fused AdamW (optim.fused), else they are read "
                                    "first; false: always read first and skip on the host")
    activation_checkpoint: str = opt("none", "recompute activations in backward instead of keeping them, per "
                                             "transformer block: full = keep only the block's input, run its "
                                             "forward again in backward; selective = keep the matmul and attention "
                                             "outputs, recompute the element-wise work (norms, RoPE, SiLU, casts)",
                                     choices=("none", "full", "selective"))
    seed: int = opt(0, "seed of the model's initial weights")
    eval_interval: int = opt(50, "evaluate on the held-out batches every N steps (0: only at the end)")
    eval_batches: int = opt(4, "held-out micro-batches per evaluation (the same ones for every run)")
    device: str = opt("auto", "where to train; auto picks CUDA when present", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, "torch CPU threads (0: torch's default); fix it for bitwise-repeatable CPU runs")
    deterministic: str = opt("auto", "torch deterministic algorithms: auto = on for CPU (cheap there, and "
                                     "compiled embedding backward is otherwise run-to-run different), off "
                                     "for CUDA (slower kernels)", choices=("auto", "on", "off"))
    stop_signals: list[str] = opt(["SIGTERM", "SIGHUP"], "signals that save a checkpoint at the next step boundary "
                                  "and stop with exit code 75 (a second one stops at once); add SIGUSR1 for "
                                  "SLURM's `--signal=USR1@120`. Any of: " + ", ".join(STOP_SIGNALS))

    def __post_init__(self):
        _check_choices(self, "train")
        bad = [s for s in self.stop_signals if s not in STOP_SIGNALS]
        if bad:
            raise FP8LabError(f"train.stop_signals={self.stop_signals!r}: {', '.join(map(repr, bad))} cannot be "
                              f"caught to save and stop; choose from {', '.join(STOP_SIGNALS)} (Ctrl-C stops at once)")
        _positive("train", self, "grad_accum_steps", "eval_batches")
        _positive("train", self, "steps", "seed", "eval_interval", "threads", "loss_chunk_tokens", allow_zero=True)


@dataclass
class OptimConfig:
    name: str = opt("adamw", "AdamW (decay on matrices, none on norms) with its two moments in: fp32 (adamw, 8 "
                             "bytes/parameter), bf16 (adamw-bf16, 4), or TorchAO's block-quantized 8-bit, FP8 or "
                             "4-bit states (about 2, 2 and 1; FP8-LM's memory saving; the fp32 masters stay); moments "
                             "of tensors under 4096 values stay fp32",
                    choices=("adamw", "adamw-bf16", "adamw-8bit", "adamw-fp8", "adamw-4bit"))
    lr: float = opt(3e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine schedule)")
    warmup_steps: int = opt(10, "linear warm-up steps")
    schedule: str = opt("cosine", "decay after warm-up", choices=("cosine", "constant"))
    weight_decay: float = opt(0.1, "decoupled weight decay on 2-D weights")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: measure, do not clip)")
    fused: str = opt("auto", "torch's fused AdamW kernel (one launch for all parameters, CUDA and CPU): auto = "
                             "wherever the weights are plain tensors (not MXFP8's); optim.name=adamw only",
                     choices=("auto", "on", "off"))

    def __post_init__(self):
        _check_choices(self, "optim")
        if self.fused == "on" and self.name != "adamw":
            raise FP8LabError(f"optim.fused=on is torch's AdamW kernel; optim.name={self.name} has its own "
                              "update: set optim.fused=auto")
        _positive("optim", self, "lr", "eps")
        _positive("optim", self, "warmup_steps", "weight_decay", "grad_clip", allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:  # also false for NaN
            raise FP8LabError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise FP8LabError(f"optim.{name}={v} must lie in [0, 1)")


@dataclass
class PrecisionConfig:
    recipe: str = opt("bf16", "training recipe; `fp8lab recipes` describes them", choices=tuple(RECIPES))
    compute_dtype: str = opt("auto", "dtype of non-FP8 compute: auto = bf16 autocast, except FP8 recipes "
                                     "on CPU, which compute in fp32; master weights are always fp32",
                             choices=("auto", "bf16", "fp32"))
    emulate: str = opt("auto", "run FP8 through TorchAO's emulation: auto = on CPU only",
                       choices=("auto", "on", "off"))
    skip_modules: list[str] = opt(["output"], "linears left in high precision: exact names, name suffixes "
                                         "(e.g. 'w2') or fnmatch patterns (e.g. 'layers.0.*')")
    filter_mode: str = opt("all", "which eligible linears to convert: all; heuristic (TorchAO's H100 size "
                                  "rules); roofline (only shapes predicted to win on precision.filter_gpu); "
                                  "auto (time each shape on this GPU at start-up, cached; roofline on CPU)",
                           choices=("all", "heuristic", "auto", "roofline"))
    filter_gpu: str = opt("auto", "GPU the roofline filter judges for: auto = this device's (on CPU: h100-sxm, "
                                  "b200 for mxfp8)", choices=("auto", *GPUS))
    compile: str = opt("auto", "torch.compile the model: auto = on for CUDA, off for CPU",
                       choices=("auto", "on", "off"))
    residual_dtype: str = opt("fp32", "dtype of the residual stream between blocks: fp32, or compute (bf16 under "
                                      "bf16 autocast: half the bytes of every residual add and norm, as torchtitan "
                                      "keeps it)", choices=("fp32", "compute"))

    def __post_init__(self):
        _check_choices(self, "precision")
        if not all(isinstance(s, str) and s for s in self.skip_modules):
            raise FP8LabError(f"precision.skip_modules must be a list of non-empty names, got {self.skip_modules!r}")


@dataclass
class CheckpointConfig:
    interval: int = opt(50, "save a checkpoint every N steps, and at the end (0: only at the end)")
    keep: int = opt(3, "complete checkpoints kept, at least 2 (the newest complete one and the last "
                       "good one are never deleted, whatever this says)")
    at_end: bool = opt(True, "save a checkpoint when training ends (off for throughput benchmarks)")

    def __post_init__(self):
        _positive("checkpoint", self, "interval", allow_zero=True)
        if self.keep < 2:
            raise FP8LabError(f"checkpoint.keep={self.keep} must be >= 2: one to resume from while the next is written")


DEFAULT_LADDER = ["fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp", "bf16"]


@dataclass
class GuardConfig:
    skip_nonfinite: bool = opt(True, "a non-finite loss or gradient norm skips the optimizer step "
                                     "(parameters and optimizer state untouched) and is logged")
    rollback: bool = opt(True, "on a loss spike or repeated non-finite steps: restore the last good "
                               "checkpoint, skip the data that led there, go one rung down the ladder")
    spike_zscore: float = opt(6.0, "a spike lies this many standard deviations above the rolling mean ...")
    spike_ratio: float = opt(1.5, "... and at least this many times the rolling mean (batch-to-batch noise "
                                  "has heavy tails: a 6-sigma wiggle alone is not a divergence)")
    spike_window: int = opt(50, "steps in the rolling loss window")
    warmup_steps: int = opt(10, "no spike alarms before this many finite losses are in the window")
    min_rel_std: float = opt(0.01, "floor on the window's standard deviation, as a fraction of its mean "
                                   "(a very smooth curve must not make every wiggle a spike)")
    max_nonfinite_streak: int = opt(3, "this many non-finite steps in a row trigger a rollback")
    ladder: list[str] = opt(DEFAULT_LADDER, "recipes to fall back through, safest last")
    per_layer: bool = opt(False, "fall back per layer: move the converted layers with the worst FP8 "
                                 "telemetry to bf16 first, and change the recipe only when none are left")
    layers_per_rollback: float = opt(0.25, "with per_layer: the fraction of converted layers moved to bf16 "
                                           "per rollback")
    max_rollbacks: int = opt(3, "rollbacks allowed before the run stops cleanly")
    skip_steps: int = opt(5, "steps' worth of data skipped before the alarm step (the data that led to it)")
    good_after_steps: int = opt(20, "a checkpoint counts as good once this many alarm-free steps follow it; "
                                    "rollbacks go to the last good one")

    def __post_init__(self):
        _positive("guard", self, "spike_zscore", "spike_ratio", "spike_window", "max_nonfinite_streak")
        _positive("guard", self, "warmup_steps", "min_rel_std", "max_rollbacks", "skip_steps",
                  "good_after_steps", allow_zero=True)
        if not 0.0 < self.layers_per_rollback <= 1.0:
            raise FP8LabError(f"guard.layers_per_rollback={self.layers_per_rollback} must lie in (0, 1]")
        unknown = [r for r in self.ladder if r not in RECIPES]
        if unknown or not self.ladder:
            raise FP8LabError(f"guard.ladder={self.ladder!r}: unknown recipes {unknown}; known: {', '.join(RECIPES)}")


@dataclass
class ParallelConfig:
    data_parallel: str = opt("none", "data parallelism across torchrun ranks: fsdp = FSDP2 (parameters, "
                                     "gradients and optimizer state sharded over the ranks)",
                             choices=("none", "fsdp"))
    float8_all_gather: bool = opt(False, "with fsdp and fp8-tensorwise: all-gather the converted weights in "
                                         "FP8 (half the bytes of the bf16 gather used otherwise)")
    replicate: int = opt(1, "with fsdp: HSDP, the ranks as replicate x shard groups (e.g. nodes x GPUs per node); "
                            "1: plain FSDP over all ranks")
    reduce_every_micro_batch: bool = opt(False, "with fsdp and train.grad_accum_steps > 1: reduce-scatter the "
                                                "gradients after every micro-batch (sharded gradients, the least "
                                                "memory) instead of once per step (each rank keeps the whole fp32 "
                                                "gradient over the micro-batches: fewer collectives)")

    def __post_init__(self):
        _check_choices(self, "parallel")
        # A bool or float is not a group count (TOML true would pass `>= 1`); the runtime check that
        # it divides the rank count is in train/build.py, where the mesh is built.
        if not isinstance(self.replicate, int) or isinstance(self.replicate, bool) or self.replicate < 1:
            raise FP8LabError(f"parallel.replicate={self.replicate!r} must be an integer >= 1 (HSDP replica groups)")
        if self.replicate > 1 and self.data_parallel != "fsdp":
            raise FP8LabError(f"parallel.replicate={self.replicate} needs parallel.data_parallel=fsdp (HSDP is FSDP2 "
                              "sharded within groups and replicated across them)")


@dataclass
class LoggingConfig:
    log_interval: int = opt(10, "console line every N steps when the console is not a terminal")
    progress: str = opt("auto", "progress bar: auto = when the console is a terminal",
                        choices=("auto", "on", "off"))
    tensorboard: bool = opt(False, "also write the metrics to RUN/tensorboard (needs the tensorboard extra)")
    wandb: bool = opt(False, "also log the metrics to Weights & Biases (needs the wandb extra; WANDB_MODE=offline "
                             "logs without an account; the W&B run id is kept in RUN/wandb_id for resumes)")
    wandb_project: str = opt("fp8lab", "the Weights & Biases project, with logging.wandb")
    telemetry_interval: int = opt(0, "per-layer FP8 telemetry to RUN/telemetry.jsonl every N steps (0: off; "
                                     "it costs a few extra passes over each converted layer's tensors)")
    fingerprint: bool = opt(False, "record a sha256 of the initial weights in summary.json (fp8lab compare "
                                   "checks its runs start alike; it copies every weight to the host once)")

    def __post_init__(self):
        _check_choices(self, "logging")
        _positive("logging", self, "log_interval")
        _positive("logging", self, "telemetry_interval", allow_zero=True)


@dataclass
class DebugConfig:
    inject_nan_at_step: int = opt(0, "make the loss NaN on the data batch that this step first trains on "
                                     "(fault drill for the guard; it follows the data, so skipping that "
                                     "data after a rollback removes it; 0: off)")
    inject_spike_at_step: int = opt(0, "multiply the loss by inject_spike_factor on the data batch that this "
                                       "step first trains on (fault drill, like inject_nan_at_step; 0: off)")
    inject_spike_factor: float = opt(5.0, "loss multiplier of the injected spike")
    stop_at_step: int = opt(0, "stop after this step without the final checkpoint, as if interrupted "
                               "(resume drill; 0: off)")

    def __post_init__(self):
        _positive("debug", self, "inject_nan_at_step", "inject_spike_at_step", "stop_at_step", allow_zero=True)
        _positive("debug", self, "inject_spike_factor")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self):
        if self.parallel.float8_all_gather and (self.parallel.data_parallel != "fsdp"
                                                or self.precision.recipe != "fp8-tensorwise"):
            raise FP8LabError("parallel.float8_all_gather needs parallel.data_parallel=fsdp and "
                              f"precision.recipe=fp8-tensorwise (got {self.parallel.data_parallel}, "
                              f"{self.precision.recipe}); TorchAO all-gathers in FP8 for tensorwise scaling only")
        if self.parallel.data_parallel == "fsdp" and (self.logging.telemetry_interval or self.guard.per_layer):
            raise FP8LabError("logging.telemetry_interval and guard.per_layer do not work with "
                              "parallel.data_parallel=fsdp yet (telemetry hooks see sharded weights); turn them off")
        if self.optim.warmup_steps > self.train.steps > 0:
            raise FP8LabError(
                f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={self.train.steps}; "
                "lower the warm-up or train longer"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one rank: micro-batch x sequence length x accumulation."""
        return self.data.micro_batch_size * self.data.seq_len * self.train.grad_accum_steps

    def to_dict(self) -> dict[str, dict[str, Any]]:
        # None means "the preset's value"; TOML has no null, so such keys are left out.
        return {
            sec.name: {k: v for k, v in dataclasses.asdict(getattr(self, sec.name)).items() if v is not None}
            for sec in dataclasses.fields(self)
        }

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def compact(self) -> list[str]:
        """The resolved config, one line per section (`[train] steps=150 grad_accum_steps=1 ...`), for
        the console at the start of a run; None (the preset's value) is left out, as in config.toml."""
        def text(v: Any) -> str:
            return ",".join(map(str, v)) if isinstance(v, list) else str(v)

        return [f"[{name}] " + " ".join(f"{k}={text(v)}" for k, v in values.items())
                for name, values in self.to_dict().items()]

    def flat(self) -> dict[str, Any]:
        """{'section.key': value} for every field, None included."""
        return {
            f"{sec.name}.{f.name}": getattr(getattr(self, sec.name), f.name)
            for sec in dataclasses.fields(self)
            for f in dataclasses.fields(getattr(self, sec.name))
        }
