"""The run directory: what it holds, who may write it, and the rules for resuming into it.

RUN/.lock            held by the one trainer writing RUN (its PID and command line inside)
RUN/config.toml      the resolved config (written at start, updated on resume)
RUN/checkpoints/     see checkpoint.py
RUN/tokenizer/       the run's tokenizer files, for fp8lab export (written at start)
RUN/*.jsonl          see logs.py
RUN/summary.json     written at the end
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
from pathlib import Path

from fp8lab.config import JobConfig, config_from_dict
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import atomic_write
from fp8lab.interop.hf_llama import hf_folder
from fp8lab.interop.hf_tokenizer import run_tokenizer_files
from fp8lab.lock import DirLock
from fp8lab.train.checkpoint import DamagedCheckpoint, newest_verified, read_state
from fp8lab.train.schedule import lr_at

# Keys that may change when a run is resumed: how long, how often to log, evaluate and
# save, how hard to check the data, how many CPU threads (bitwise repeatability needs the
# same count, but the run is the same run), the guard's thresholds (a run the guard stopped
# is resumed with a looser or stricter guard), and the fault drills (debug.*), which exist
# to be switched on for one attempt, the loss chunking (a memory knob: the same loss up
# to summation order), and which signals stop it. Anything else changes what is being
# trained, so it is a different run.
RESUMABLE_PREFIXES = ("train.steps", "train.eval_interval", "train.loss_chunk_tokens", "checkpoint.interval",
                      "checkpoint.keep", "logging.", "debug.", "data.verify", "train.threads", "guard.",
                      "train.stop_signals", "train.activation_checkpoint",  # a memory knob, like the chunked loss
                      "optim.name",  # another optimizer's state is converted on load
                      "train.loss_head", "train.deferred_sync", "optim.fused")  # the same step, computed otherwise


LOCK_NAME = ".lock"


class RunDirLock:
    """The run directory's lock: a second trainer on the same RUN is refused at once, naming the
    process that holds it, before it reads or writes anything there. A new RUN is created to
    hold the lock and removed again if the trainer fails before writing anything into it."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise FP8LabError(f"run directory {self.run_dir} is a file; choose a new --run-dir")
        self.created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FP8LabError(f"cannot create run directory {self.run_dir}: {e.strerror or e}; "
                              "choose a --run-dir you can write to") from None
        self.lock = DirLock(self.run_dir / LOCK_NAME, what=f"run directory {self.run_dir}")
        try:
            self.lock.acquire()
        except FP8LabError:
            self._remove_if_created()
            raise

    def release(self, *, failed: bool = False) -> None:
        """Drop the lock; after a failed start, remove the RUN this lock created if still empty."""
        self.lock.release()
        if failed:
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created:
            try:
                self.run_dir.rmdir()  # only if empty: never a file a run wrote
            except OSError:
                pass


def running_holder(run_dir: Path):
    """The lock's Holder when a live process holds RUN's lock now, else None."""
    return DirLock(Path(run_dir) / LOCK_NAME).probe()


def _load_saved(path: Path) -> JobConfig:
    try:
        return config_from_dict(tomllib.loads(path.read_text()), origin=str(path))
    except tomllib.TOMLDecodeError as e:
        raise FP8LabError(f"{path} is not valid TOML ({e}); this run directory is damaged") from None


def check_run_dir(run_dir: Path, cfg: JobConfig, *, allow_recipe_change: bool = False,
                  ) -> tuple[JobConfig, tuple[int, Path] | None, list[str]]:
    """Check, without writing anything, that `cfg` may start a new run in `run_dir` or
    resume the run already there.

    Returns the config to run with (a checkpoint's recipe wins over the command line, unless
    `allow_recipe_change`: then the command line's recipe trains from the checkpoint on),
    the checkpoint to resume from (if any), and messages for the console.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FP8LabError(f"run directory {run_dir} is a file; choose a new --run-dir")
    config_path = run_dir / "config.toml"
    if not config_path.exists():
        if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            raise FP8LabError(f"run directory {run_dir} is not empty and holds no fp8lab run (no config.toml); "
                              "choose a new --run-dir")
        return cfg, None, []

    saved = _load_saved(config_path)
    ckpts = run_dir / "checkpoints"
    if ckpts.exists() and not ckpts.is_dir():
        raise FP8LabError(f"{ckpts} is a file, where this run keeps its checkpoints; move it out of {run_dir} "
                          "and run again")
    newest, damaged = newest_verified(run_dir)
    messages = [f"checkpoint {p} is damaged ({why}); passed over" for p, why in damaged]
    if allow_recipe_change:  # the trainer records the change as an event (old and new recipe)
        saved = with_recipe(saved, cfg.precision.recipe)
    elif newest is not None:
        try:
            ckpt_recipe = read_state(newest[1]).get("recipe", saved.precision.recipe)
        except DamagedCheckpoint:  # the trainer passes over it to an older one, and says so
            ckpt_recipe = saved.precision.recipe
        if cfg.precision.recipe != ckpt_recipe:
            messages.append(f"precision.recipe={cfg.precision.recipe} ignored: the checkpoint at step "
                            f"{newest[0]} was trained with {ckpt_recipe}, which wins on resume; pass "
                            f"--allow-recipe-change to train with {cfg.precision.recipe} from here")
        cfg, saved = with_recipe(cfg, ckpt_recipe), with_recipe(saved, ckpt_recipe)
    now, before = cfg.flat(), saved.flat()
    changed = [k for k in now if now[k] != before[k]]
    refused = [k for k in changed if not k.startswith(RESUMABLE_PREFIXES)]
    if refused:
        diffs = "; ".join(f"{k}: run has {before[k]!r}, command gives {now[k]!r}" for k in refused)
        raise FP8LabError(f"run directory {run_dir} holds a different run ({diffs}); "
                          "resume with the run's settings or choose a new --run-dir")
    if newest is not None and cfg.train.steps < newest[0]:
        raise FP8LabError(f"train.steps={cfg.train.steps} is below the step of the newest checkpoint "
                          f"({newest[0]}) in {run_dir}; give at least {newest[0]}")
    if changed:
        messages.append("resume changes " + ", ".join(f"{k}={now[k]!r}" for k in changed))
    if newest is not None and "train.steps" in changed and cfg.optim.schedule == "cosine":
        step = newest[0] + 1
        old = lr_at(step, cfg=saved.optim, total_steps=saved.train.steps)
        new = lr_at(step, cfg=cfg.optim, total_steps=cfg.train.steps)
        messages.append(f"train.steps {saved.train.steps} -> {cfg.train.steps} rescales the cosine schedule: "
                        f"the learning rate at step {step} becomes {new:.3g} (was {old:.3g})")
    return cfg, newest, messages


def with_recipe(cfg: JobConfig, recipe: str) -> JobConfig:
    """cfg training `recipe`; FP8 all-gather stays on only where it exists (tensorwise), as the
    guard's fallback left it."""
    parallel = dataclasses.replace(cfg.parallel, float8_all_gather=cfg.parallel.float8_all_gather
                                   and recipe == "fp8-tensorwise")
    return dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, recipe=recipe), parallel=parallel)


def write_run_config(run_dir: Path, cfg: JobConfig) -> None:
    """Create the run directory (if new) and record the resolved config in it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / "config.toml", cfg.to_toml())


TOKENIZER_DIR = "tokenizer"


def save_run_tokenizer(run_dir: Path, cfg: JobConfig, parts) -> None:
    """Keep the tokenizer of the run built as `parts` (RunParts) in RUN/tokenizer/ (what `fp8lab
    export` writes next to the weights; see interop/hf_tokenizer.py), replacing an earlier copy."""
    hf_dir = hf_folder(cfg.model.init_from) if cfg.model.init_from else None
    files = run_tokenizer_files(dataset=parts.dataset, hf_dir=hf_dir, max_len=parts.model_args.max_seq_len)
    final = Path(run_dir) / TOKENIZER_DIR
    tmp = Path(run_dir) / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    for stale in [*Path(run_dir).glob(f".{TOKENIZER_DIR}.tmp-*"), tmp]:  # a killed writer's (one trainer per RUN)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


def prepare_run_dir(run_dir: Path, cfg: JobConfig, *, allow_recipe_change: bool = False,
                    ) -> tuple[JobConfig, tuple[int, Path] | None, list[str]]:
    """check_run_dir, then write_run_config."""
    cfg, resume, messages = check_run_dir(run_dir, cfg, allow_recipe_change=allow_recipe_change)
    write_run_config(run_dir, cfg)
    return cfg, resume, messages
