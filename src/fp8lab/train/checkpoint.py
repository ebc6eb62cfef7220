"""Checkpoints: RUN/checkpoints/step-N/{dcp/, state.json, manifest.json, COMPLETE}.

- `dcp/` is a torch.distributed.checkpoint folder of plain fp32 tensors (a low-bit optimizer's
  moments as their plain components: optim_state.py) named as in the
  model *before* conversion and compile ("model.<fqn>", "optim.state.<fqn>.<key>"), so a
  checkpoint written under one recipe loads under any other, into a plain model with
  `dcp.load({"model": model.state_dict()})`, and later into sharded models.
- `state.json` holds everything else (step, RNG, data position, recipe): JSON, never pickle.
- `manifest.json` lists every other file with its size and sha256; `verify_checkpoint`
  checks it before DCP opens anything (a flipped byte inside a DCP payload loads silently).
- `COMPLETE` is written last, inside a temporary folder that is renamed into place, so a
  crash mid-write never leaves a folder that looks complete.
- `step-N-rK` is revision K of step N: a rollback re-saves its target with the new recipe
  and guard state under a new name, so no moment exists without a complete checkpoint.

Nothing we load can run code: DCP (torch 2.13) reads `.metadata` with plain pickle.load,
so `SafeFileSystemReader` reads it through an unpickler that admits only DCP's metadata
classes for *tensors*. Byte entries are refused outright (DCP would load their payload with
torch.load(weights_only=False), and an attacker who writes the metadata chooses which
entries are bytes), and every payload must be a plain file name inside the `dcp/` folder.
Tensor payloads are read by DCP with weights_only=True.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from fp8lab.data.shards import sha256_file
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import fsync_dir, write_durable
from fp8lab.precision.convert import to_plain
from fp8lab.train.dist import barrier, broadcast
from fp8lab.train.dist import current as dist_env
from fp8lab.train.faults import kill_point
from fp8lab.train.optim import init_optimizer_state
from fp8lab.train.optim_state import load_targets, state_tensors

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)(?:-r(\d+))?$")

# (module, name) pairs a DCP .metadata pickle may reference; anything else is refused.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata can only describe tensors stored in its own folder."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise pickle.UnpicklingError(f"entry {key!r} is not a tensor; fp8lab checkpoints hold only tensors")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise pickle.UnpicklingError(f"payload path {name!r} is not a file inside the checkpoint")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_complete(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first (a later revision of a step
    after the earlier ones)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), int(m.group(2) or 0), p))
    return [(step, p) for step, _, p in sorted(found)]


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): fqn for fqn, p in model.named_parameters()}  # a tied weight appears once, under its first name


def tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """Flat {name: plain tensor sharing storage with the live one}: saving reads them,
    loading writes into them in place. A quantized optimizer state is its plain components
    (optim_state.py)."""
    out: dict[str, torch.Tensor] = {f"model.{fqn}": to_plain(p) for fqn, p in model.named_parameters()}
    if optimizer is not None:
        out |= state_tensors(optimizer, _param_names(model))
    return out


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns on every call that it "assumes the intent is to save in a single process":
    # that is our intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _file_manifest(folder: Path) -> dict[str, dict]:
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MARKER, MANIFEST)
    }


def save_checkpoint(run_dir: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int, protect: tuple[int, ...] = (), new_revision: bool = False) -> Path:
    """Write step-N atomically, then keep the newest `keep` complete checkpoints (and the
    steps in `protect`). `new_revision` writes step-N-rK beside an existing step-N.

    Under FSDP2 every rank calls this: each writes its shards into the same DCP folder, and
    rank 0 alone names the folder and writes state.json, the manifest and the marker."""
    env = dist_env()
    root = checkpoints_root(run_dir)
    if env.main:
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    if new_revision:
        revs = [int(m.group(2) or 0) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
                and int(m.group(1)) == step]
        final = root / f"step-{step}-r{max(revs, default=0) + 1}"
    elif (final / MARKER).is_file():
        # Only a resumed run that has already reached its last step gets here: the step's
        # state is on disk, and replacing it would open a window with no checkpoint.
        return final
    final, tmp = broadcast((final, root / f"{final.name}.tmp-{os.getpid()}"))  # rank 0's names
    if env.main:
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of a killed writer
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    tensors = tensor_state(model, optimizer)
    failure = None  # a full disk, inside DCP or out
    try:
        with _quiet_single_process():  # under FSDP2 DCP raises on every rank when one rank failed
            dcp.save(tensors, storage_writer=FileSystemWriter(tmp / "dcp"), no_dist=_no_dist())
    except (OSError, RuntimeError, CheckpointException) as e:
        failure = e
    kill_point("ckpt-after-dcp", step)
    if failure is None:
        barrier()  # every rank's shards are on disk
        if env.main:
            try:
                write_durable(tmp / "state.json", json.dumps(state, indent=1, sort_keys=True))
                kill_point("ckpt-after-state", step)
                fsync_dir(tmp / "dcp")
                write_durable(tmp / MANIFEST, json.dumps(_file_manifest(tmp), indent=1, sort_keys=True))
                kill_point("ckpt-after-manifest", step)
                write_durable(tmp / MARKER, f"{step}\n")
                fsync_dir(tmp)
                kill_point("ckpt-after-marker", step)
            except OSError as e:
                failure = e
        # Rank 0's files are its own: every rank learns whether they were written, and all stop alike.
        said = broadcast(str(_write_failed(failure, final, tensors, run_dir)) if failure else None)
    else:
        said = str(_write_failed(failure, final, tensors, run_dir))
    if said:
        if env.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise FP8LabError(said)
    if env.main:
        os.rename(tmp, final)
        fsync_dir(root)
        kill_point("ckpt-after-rename", step)
        prune(run_dir, keep=keep, protect=protect)
    barrier()
    return final


def _write_failed(e: BaseException, final: Path, tensors: dict[str, torch.Tensor], run_dir: Path) -> FP8LabError:
    """One line for a checkpoint that could not be written: where, why, about how many bytes it
    needs, and that the run resumes from the newest complete checkpoint once there is room."""
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    done = list_complete(run_dir)
    keep = (f"the newest complete checkpoint, {done[-1][1].name}, is intact" if done
            else "no checkpoint was complete yet")
    return FP8LabError(f"could not write checkpoint {final}: {_cause(e)}; it needs about {need:,} bytes "
                       f"({need / 1e9:.2f} GB) on that disk; {keep}: free space there and run the same command "
                       "again to resume")


def remove_stale(run_dir: Path) -> list[str]:
    """Delete what killed writers left behind (step-N.tmp-PID folders, incomplete step-N
    folders); one trainer owns a run directory, so nothing else can be writing them.
    Returns the names removed."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir()
             if p.is_dir() and not p.name.endswith(".damaged") and (".tmp-" in p.name or not (p / MARKER).is_file())]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in stale)


def prune(run_dir: Path, *, keep: int, protect: tuple[int, ...] = ()) -> None:
    """Delete the oldest complete checkpoints beyond `keep`; the newest always stays, and
    so does the newest checkpoint of each step in `protect` (the last good one). The
    marker goes first, so a deletion cut short leaves an incomplete folder, never a
    complete-looking half checkpoint."""
    found = list_complete(run_dir)
    kept = {path for _, path in found[-max(keep, 1):]}
    for step in protect:
        revisions = [path for s, path in found if s == step]
        kept |= set(revisions[-1:])
    for _, path in found:
        if path not in kept:
            (path / MARKER).unlink()
            shutil.rmtree(path, ignore_errors=True)


def delete_after(run_dir: Path, step: int) -> list[str]:
    """Delete the complete checkpoints newer than `step` (a timeline a rollback abandoned)."""
    gone = [path for s, path in list_complete(run_dir) if s > step]
    for path in gone:
        (path / MARKER).unlink()
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in gone]


_verified: dict[tuple[str, int], str | None] = {}


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the checkpoint's manifest (size and sha256) and nothing
    else is there; otherwise what is wrong, in words. Reads no file through pickle or DCP.
    Remembered per process, keyed by every file's size and mtime: resume hashes a
    checkpoint once, and any change to a file is verified afresh."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker"
    key = (str(path.resolve()), tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                             for p in path.rglob("*") if p.is_file())))
    if key not in _verified:
        _verified[key] = _verify(path)
    return _verified[key]


def _verify(path: Path) -> str | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*")
               if p.is_file() and p.name not in (MARKER, MANIFEST)}
    if on_disk != set(manifest):
        return f"files differ from the manifest (extra: {sorted(on_disk - set(manifest))}, " \
               f"missing: {sorted(set(manifest) - on_disk)})"
    for rel, want in manifest.items():
        f = path / rel
        if f.stat().st_size != want["bytes"]:
            return f"{rel} is {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if sha256_file(f) != want["sha256"]:
            return f"{rel} does not match its sha256 (a changed byte)"
    return None


def newest_verified(run_dir: Path) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that verifies, and the damaged ones passed over."""
    damaged = []
    for step, path in reversed(list_complete(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return (step, path), damaged
        damaged.append((path, problem))
    return None, damaged


def quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never loaded)."""
    target = path.with_name(f"{path.name}.damaged")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
    return target


class DamagedCheckpoint(FP8LabError):
    """A checkpoint whose files verify against its manifest but whose content does not load (a
    manifest rewritten to match damage, or a bug): resume passes over it to an older one."""


# What resuming reads from state.json, and the type each must have.
_STATE_FIELDS = {"step": int, "rng": dict, "data": dict}


def read_state(path: Path) -> dict:
    """A checkpoint's state.json; a missing marker is an FP8LabError, unreadable or malformed
    content a DamagedCheckpoint."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FP8LabError(f"checkpoint {path} is incomplete (no {MARKER} marker); it was interrupted while being written")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {path}: state.json is unreadable ({e})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"checkpoint {path}: state.json holds a {type(state).__name__}, not a checkpoint state")
    for key, kind in _STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "step" and value < 0):
            raise DamagedCheckpoint(f"checkpoint {path}: state.json has {key}={value!r}; expected a "
                                    f"{'non-negative int' if key == 'step' else kind.__name__}")
    return state


def _inner(e: BaseException) -> BaseException:
    """The real failure inside DCP's wrapper exception (the first rank's)."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _cause(e: BaseException) -> str:
    """One line naming the real failure inside DCP's wrapper exception."""
    e = _inner(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}"


def _verified_reader(path: Path) -> SafeFileSystemReader:
    """The checkpoint's DCP reader, once every file matches the manifest (a flipped byte inside a
    DCP payload would otherwise load silently)."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise FP8LabError(f"checkpoint {path} is damaged: {problem}")
    return SafeFileSystemReader(Path(path) / "dcp")


def load_tensors(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[str]:
    """Verify the checkpoint against its manifest, then load its tensors in place into
    `model` (and `optimizer`'s state). Returns the names of the optimizer states the checkpoint
    held in another form (another optim.name), converted into the live one."""
    reader = _verified_reader(path)
    try:
        # Read the metadata ourselves first: DCP would swallow a refused pickle and retry
        # a per-rank file, hiding the reason. A crafted pickle may fail in many ways.
        metadata = reader.read_metadata()
    except OSError as e:  # reading failed: the machine's trouble, not necessarily the checkpoint's
        raise FP8LabError(f"checkpoint {path}: cannot read its DCP metadata ({_cause(e)})") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DamagedCheckpoint(f"checkpoint {path}: unreadable DCP metadata ({_cause(e)})") from None
    if optimizer is not None and not any(k.startswith("optim.") for k in metadata.state_dict_metadata):
        # Step 0 (a rollback to the start saves it again) has no optimizer state: nothing has
        # stepped yet, and a fresh optimizer is exactly what training from step 0 starts with.
        optimizer = None
    targets, convert = tensor_state(model, None), list
    if optimizer is not None:
        init_optimizer_state(optimizer)
        state, convert = load_targets(optimizer, _param_names(model), metadata.state_dict_metadata)
        targets |= state
    try:
        with _quiet_single_process():
            dcp.load(targets, storage_reader=reader, no_dist=_no_dist())
        return convert()
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:
        # CheckpointException derives from BaseException: `except Exception` would miss it.
        inner = _inner(e)
        if isinstance(inner, (OSError, torch.OutOfMemoryError)):  # the machine's trouble, not the checkpoint's
            raise FP8LabError(f"checkpoint {path} could not be loaded: {_cause(e)}") from None
        raise DamagedCheckpoint(f"checkpoint {path} could not be loaded: {_cause(e)}") from None


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights as plain CPU tensors {fqn: tensor} (the "model." prefix
    dropped), verified first; no model is built and TorchAO is not needed (export reads this)."""
    reader = _verified_reader(path)
    try:
        metadata = reader.read_metadata()
        targets = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
                   for k, m in metadata.state_dict_metadata.items() if k.startswith("model.")}
        with _quiet_single_process():
            dcp.load(targets, storage_reader=reader, no_dist=True)
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError, AttributeError, TypeError,
            EOFError, pickle.UnpicklingError) as e:
        raise FP8LabError(f"checkpoint {path} could not be read: {_cause(e)}") from None
    return {k.removeprefix("model."): t for k, t in targets.items()}


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model weights of a checkpoint into `model` (plain or converted, any
    recipe): what evaluation, export and fine-tuning start from."""
    load_tensors(path, model=model, optimizer=None)
