"""Resuming a run: which checkpoint loads, restoring it into freshly built parts, and setting
aside the newer checkpoints that do not (they failed verification, or verified and still did not
load: a manifest rewritten to match damage). A run with no loadable checkpoint is refused,
never quietly restarted from step 0."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from fp8lab.config import JobConfig
from fp8lab.data.loader import reshard_state
from fp8lab.data.shards import sha256_file
from fp8lab.errors import FP8LabError
from fp8lab.train.build import RunParts, build
from fp8lab.train.checkpoint import (
    DamagedCheckpoint,
    list_complete,
    load_tensors,
    quarantine,
    read_state,
    verify_checkpoint,
)
from fp8lab.train.guard import Guard
from fp8lab.train.optim_state import check_switch, switch_message
from fp8lab.train.rng import restore_rng
from fp8lab.train.rundir import with_recipe


def data_fingerprint(dataset) -> str:
    """sha256 of the data set's manifest, which lists every shard's sha256: a resumed run
    must continue on the data it started on."""
    return sha256_file(Path(dataset.path) / "manifest.json")


@dataclass
class Resumed:
    cfg: JobConfig  # the recipe may be the resumed checkpoint's
    parts: RunParts
    guard: Guard
    state: dict  # the checkpoint's state.json; {} for a fresh start
    path: Path | None = None  # the checkpoint resumed from
    passed_over: list[tuple[Path, str]] = field(default_factory=list)  # newer ones that did not load, and why

    @property
    def bf16_layers(self) -> list[str]:  # the guard's per-layer fallback, which shapes the model
        return self.state.get("bf16_layers", [])


def resume(run_dir: Path, cfg: JobConfig, newest: tuple[int, Path] | None, *, keep_recipe: bool,
           world_size: int, distributed: bool) -> Resumed:
    """Build the run's parts and load into them the newest checkpoint (at or before `newest`)
    that loads; a fresh start when `newest` is None. In one process a checkpoint that verifies
    but does not load is passed over for the one before; under torchrun the ranks cannot agree
    on that yet, so it is an error saying what to move."""
    if newest is None:
        return Resumed(cfg, build(cfg), Guard(cfg.guard), {})
    passed_over: list[tuple[Path, str]] = []
    for path in [p for s, p in reversed(list_complete(run_dir)) if s <= newest[0]]:
        if verify_checkpoint(path) is not None:  # hashed only when reached: the newest usually loads
            continue
        parts = None
        try:
            state = read_state(path)
            run_cfg = with_recipe(cfg, state["recipe"]) if not keep_recipe and state.get("recipe") else cfg
            # fresh=False: the checkpoint's weights replace the initial ones (model.init_from's are not read).
            parts = build(run_cfg, extra_skip=state.get("bf16_layers", []), fresh=False)
            guard = Guard(run_cfg.guard)
            restore(path, state, parts, guard, world_size=world_size)
        except DamagedCheckpoint as e:
            if distributed:
                raise DamagedCheckpoint(f"{e}; move {path} out of {run_dir / 'checkpoints'} to resume from the "
                                        "one before") from None
            passed_over.append((path, str(e)))
            if parts is not None:
                parts.loader.close()
            continue
        return Resumed(run_cfg, parts, guard, state, path, passed_over)
    first = passed_over[0][1] if passed_over else "none verifies"
    raise DamagedCheckpoint(f"no checkpoint in {run_dir} loads: {first}; move the damaged ones away (or start a new "
                            "--run-dir)")


def restore(path: Path, state: dict, parts: RunParts, guard: Guard, *, world_size: int) -> None:
    """Load checkpoint `path` (its `state`) into freshly built parts: weights, optimizer, data
    position, RNG and guard; one written on another rank count is resharded. A different model
    or data set, or a data position this run's global batch cannot continue from, is the user's
    error; content that does not restore is the checkpoint's (DamagedCheckpoint)."""
    saved_args = state.get("model_args", {})
    now = dataclasses.asdict(parts.model_args)
    diff = [k for k in now if k in saved_args and saved_args[k] != now[k]]
    if diff:
        raise FP8LabError(f"checkpoint {path} has a different model shape: "
                          + ", ".join(f"{k} {saved_args[k]} vs {now[k]}" for k in diff))
    # Another rank count: DCP reshards the tensors, and the data position carries over as the
    # sequences (tokens) of the epoch served, exact because the sequences of a global batch
    # depend on its size only (data/loader.py); a position that is not a whole number of this
    # run's global batches is refused. data.micro_batch_size cannot change on resume (rundir.py),
    # so the checkpoint's is this run's unless it records its own.
    saved_ranks, saved_micro = state.get("world_size", 1), state.get("micro_batch_size", parts.loader.batch_size)
    data = reshard_state(state.get("data"), global_batch=saved_ranks * saved_micro, to=parts.loader)
    if saved_ranks * saved_micro != parts.loader.global_batch and state.get("skip_windows"):
        raise FP8LabError(f"checkpoint {path} records data a rollback skipped, counted in global batches of "
                          f"{saved_ranks} rank(s) x {saved_micro} sequences; resume it with that global batch "
                          f"(--nproc_per_node={saved_ranks})")
    if state.get("data_fingerprint") not in (None, data_fingerprint(parts.dataset)):
        raise FP8LabError(f"the data at {parts.dataset.path} is not the data this run was trained on "
                          f"(its manifest changed since {path}); point data.path at the original data "
                          "or start a new --run-dir")
    saved_optim = state.get("optim", "adamw")  # checkpoints before optim.name hold torch's AdamW
    check_switch(path, saved_optim, parts.optimizer)
    # Another optim.name's state is converted into this one's (see optim_state.py); the header and summary say so.
    converted = load_tensors(path, model=parts.model, optimizer=parts.optimizer)
    if message := switch_message(saved_optim, parts.optimizer, converted, state["step"]):
        parts.notes.append(message)
    try:
        parts.loader.load_state_dict(data)
        restore_rng(state["rng"])
        if "guard" in state:
            guard.load_state_dict(state["guard"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DamagedCheckpoint(f"checkpoint {path}: state.json does not restore ({type(e).__name__}: {e})") from None


def set_aside_unusable(run_dir: Path, resumed_from: Path | None,
                       passed_over: list[tuple[Path, str]]) -> list[tuple[str, str, str]]:
    """Quarantine every complete checkpoint newer than the one resumed from (all of them when
    none was): each failed verification or did not load, and a later save or rollback must never
    meet it. Returns (name, new name, why) for the run's events."""
    done = [p for _, p in list_complete(run_dir)]
    start = done.index(resumed_from) + 1 if resumed_from in done else 0
    did_not_load = dict(passed_over)
    out = []
    for path in done[start:]:
        why = (f"verified but did not load ({did_not_load[path]})" if path in did_not_load
               else f"failed verification ({verify_checkpoint(path)})")
        out.append((path.name, quarantine(path).name, why))
    return out
