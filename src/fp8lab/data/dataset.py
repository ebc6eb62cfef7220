"""A prepared data directory: `manifest.json` plus one shard file per token array.

The directory is built under a temporary sibling and renamed into place only when complete,
so anything found at the final path with a manifest is a finished write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fp8lab.data.flags import FlagsStream, flags_name, open_flags_entry, write_flags
from fp8lab.data.shards import Shard, ShardStream, open_shard, sha256_file, write_shard
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import fsync_dir, os_error

MANIFEST = "manifest.json"
DATASET_FORMAT = "fp8lab-tokens"
DATASET_VERSION = 1
_PREPARE_HINT = "check `data.path` or prepare the data again"
TMP_INFIX = ".tmp-"  # a build of OUT grows in OUT.tmp-PID beside it


class DatasetExistsError(FP8LabError):
    """The output directory of `write_dataset` already holds something."""


class Split:
    """The sequences of one split, in file order, across all of its shards; with `flags` (one
    (count, seq_len + 1) uint8 array per shard, instruction data) the per-token flags too."""

    def __init__(
        self, *, name: str, path: Path, seq_len: int, vocab_size: int, shards: list[Shard], pad_id: int | None = None,
        eos_id: int | None = None, flags: list[np.ndarray] | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.pad_id = pad_id  # targets holding it carry no loss (data prepared with --no-pack)
        self.eos_id = eos_id  # where flags are absent, the token after it starts a new document
        self.shards = tuple(shards)
        # Plain ndarray views: indexing an np.memmap subclass costs extra Python on the hot path.
        self._arrays = [s.tokens.view(np.ndarray) for s in shards]
        self._flags = None if flags is None else [f.view(np.ndarray) for f in flags]
        counts = np.array([s.count for s in shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        self._len = int(self._ends[-1]) if len(shards) else 0

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"Split(name={self.name!r}, sequences={self._len}, shards={len(self.shards)}, path={str(self.path)!r})"

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Windows at `indices` (global over the split) as a new (n, seq_len + 1) array."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"split {self.name!r} has {self._len} sequences; indices span [{idx.min()}, {idx.max()}]")
        return self.take(idx)

    @property
    def has_flags(self) -> bool:
        """Whether per-token flags (loss and document starts, fp8lab.data.flags) come with the tokens."""
        return self._flags is not None

    def gather_flags(self, indices: np.ndarray) -> np.ndarray:
        """The flags of the windows at `indices`, as a new (n, seq_len + 1) uint8 array."""
        if self._flags is None:
            raise FP8LabError(f"split {self.name!r} of {self.path} has no flags files (it is not instruction data)")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"split {self.name!r} has {self._len} sequences; indices span [{idx.min()}, {idx.max()}]")
        return self.take_flags(idx)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """gather() without the bounds check, for int64 indices known to be valid (the loader's own
        permutation): two reductions less per batch on the hot path."""
        return self._take(self._arrays, idx)

    def take_flags(self, idx: np.ndarray) -> np.ndarray:
        """gather_flags() without the checks, for valid int64 indices of a split that has flags."""
        return self._take(self._flags, idx)

    def _take(self, arrays: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
        if len(arrays) == 1:
            return arrays[0][idx]
        dtype = arrays[0].dtype if arrays else np.uint16
        out = np.empty((idx.size, self.seq_len + 1), dtype=dtype)
        # Group the rows by shard with one stable argsort, then one gather per shard present:
        # a few numpy calls per batch instead of a boolean mask over the batch per shard.
        which = np.searchsorted(self._ends, idx, side="right")
        order = np.argsort(which, kind="stable")
        grouped = which[order]
        local = idx[order] - self._starts[grouped]
        bounds = np.searchsorted(grouped, np.arange(len(arrays) + 1)).tolist()
        for s in range(len(arrays)):
            lo, hi = bounds[s], bounds[s + 1]
            if lo < hi:
                out[order[lo:hi]] = arrays[s][local[lo:hi]]
        return out


@dataclass(eq=False)
class Dataset:
    """An opened, validated data directory."""

    path: Path
    seq_len: int
    vocab_size: int
    eos_id: int | None
    tokenizer: dict
    sources: list
    splits: dict[str, Split] = field(repr=False)
    pad_id: int | None = None

    @property
    def tokenizer_file(self) -> Path | None:
        """The tokenizer saved with the data (tokenizer.json), or None for byte-level / unknown."""
        name = self.tokenizer.get("file")
        return self.path / name if name else None

    @property
    def tokenizer_config_file(self) -> Path | None:
        """The tokenizer_config.json saved with the data (from a tokenizer folder), or None."""
        name = self.tokenizer.get("config_file")
        return self.path / name if name else None

    @property
    def chat_template_file(self) -> Path | None:
        """The chat_template.jinja saved with the data (from a tokenizer folder that has one), or None."""
        name = self.tokenizer.get("chat_template_file")
        return self.path / name if name else None

    def split(self, name: str) -> Split:
        """The split called `name` (for example "train" or "val")."""
        if name not in self.splits:
            raise FP8LabError(
                f"data {self.path} has no split {name!r}; available: {', '.join(sorted(self.splits)) or 'none'}"
            )
        return self.splits[name]


class DatasetWriter:
    """Builds a data directory shard by shard under a temporary sibling; `finish` renames it into place.

    Use as a context manager: leaving the block by an exception (or Ctrl-C) removes the temporary
    directory, so an interrupted write never leaves anything that looks like data.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        seq_len: int,
        vocab_size: int,
        eos_id: int | None,
        pad_id: int | None = None,
    ) -> None:
        out_dir = Path(out_dir)
        check_out_dir(out_dir)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise FP8LabError(f"{out_dir}: seq_len must be a positive integer, got {seq_len!r}")
        self.out_dir, self.seq_len, self.vocab_size = out_dir, seq_len, vocab_size
        self.eos_id, self.pad_id = eos_id, pad_id
        self.splits: dict[str, list[dict]] = {"train": [], "val": []}
        make_parent(out_dir)
        # Named by pid so a crashed writer's leftovers are recognisable and never mistaken for data.
        self.tmp = out_dir.parent / f"{out_dir.name}{TMP_INFIX}{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise os_error(e, path=self.tmp, action="create directory") from None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add_shard(self, split: str, tokens: np.ndarray, *, flags: np.ndarray | None = None) -> dict:
        """Write `tokens` (sequences, seq_len + 1) as the next shard of `split`, with its per-token
        `flags` (same shape, fp8lab.data.flags) when given; return its entry."""
        # write_shard gives non-arrays and bad token ids their own messages; the width is ours to check.
        if isinstance(tokens, np.ndarray) and tokens.ndim == 2 and tokens.shape[1] != self.seq_len + 1:
            raise FP8LabError(
                f"{self.out_dir}: {split} array {len(self.splits.get(split, []))} has windows of {tokens.shape[1]} "
                f"tokens, expected seq_len + 1 = {self.seq_len + 1}"
            )
        entries = self.splits.setdefault(split, [])
        entry = write_shard(
            self.tmp / f"{split}_{len(entries):05d}.bin",
            tokens,
            vocab_size=self.vocab_size,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
        )
        if flags is not None:
            if not isinstance(flags, np.ndarray) or flags.shape[:1] != (entry["sequences"],):
                raise FP8LabError(f"{self.out_dir}: flags for {entry['file']} must have {entry['sequences']} rows")
            entry["flags"] = write_flags(self.tmp / flags_name(entry["file"]), flags, seq_len=self.seq_len)
        entries.append(entry)
        return entry

    def open_shard(self, split: str) -> ShardStream:
        """Start the next shard of `split` for writing piece by piece; hand it to `close_shard` when done."""
        entries = self.splits.setdefault(split, [])
        return ShardStream(self.tmp / f"{split}_{len(entries):05d}.bin", seq_len=self.seq_len,
                           vocab_size=self.vocab_size, eos_id=self.eos_id, pad_id=self.pad_id)

    def open_flags(self, stream: ShardStream) -> FlagsStream:
        """Start the flags file of shard `stream` (from `open_shard`); hand both to `close_shard`."""
        return FlagsStream(stream.path.with_name(flags_name(stream.path.name)), seq_len=self.seq_len)

    def close_shard(self, split: str, stream: ShardStream, *, flags: FlagsStream | None = None) -> dict:
        """Finish a shard from `open_shard` (and its flags from `open_flags`) and list it in the manifest."""
        entry = stream.close()
        if flags is not None:
            if flags.count != stream.count:
                raise FP8LabError(f"{stream.path}: {stream.count} windows but {flags.count} rows of flags")
            entry["flags"] = flags.close()
        self.splits[split].append(entry)
        return entry

    def add_files(self, files: dict[str, bytes]) -> None:
        """add_file for each {name: bytes} (a tokenizer's files, say)."""
        for name, data in files.items():
            self.add_file(name, data)

    def add_file(self, name: str, data: bytes) -> str:
        """Store `data` as `name` next to the shards (e.g. tokenizer.json); return its sha256."""
        path = self.tmp / name
        try:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise os_error(e, path=path, nbytes=len(data)) from None
        return hashlib.sha256(data).hexdigest()

    def finish(self, *, tokenizer: dict, sources: list, extra: dict | None = None) -> Path:
        """Write manifest.json and rename the directory into place; return the final path."""
        manifest = {
            "format": DATASET_FORMAT,
            "version": DATASET_VERSION,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "tokenizer": tokenizer,
            "sources": sources,
            "splits": self.splits,
        }
        clash = sorted(set(extra or {}) & set(manifest))
        if clash:
            raise FP8LabError(f"{self.out_dir}: extra manifest keys {clash} would replace core keys")
        manifest.update(extra or {})
        text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
        try:
            try:
                with open(self.tmp / MANIFEST, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise os_error(e, path=self.tmp / MANIFEST, nbytes=len(text.encode())) from None
            fsync_dir(self.tmp)
            try:
                # rename() replaces an empty directory but never a non-empty one: that is the race check.
                os.rename(self.tmp, self.out_dir)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise DatasetExistsError(
                        f"output directory {self.out_dir} was created by another writer meanwhile"
                    ) from e
                raise FP8LabError(f"could not move {self.tmp} to {self.out_dir}: {e.strerror or e}") from e
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.out_dir.parent)
        return self.out_dir

    def abort(self) -> None:
        """Remove the temporary directory (nothing at the final path is touched)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_out_dir(out_dir: Path) -> None:
    """Raise DatasetExistsError unless `out_dir` is absent or an empty directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetExistsError(
            f"output {out_dir} is an existing file, not a directory; choose a new directory path (it is not touched)"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetExistsError(
            f"output directory {out_dir} already exists and is not empty; remove it or choose another path"
        )


def make_parent(out_dir: Path) -> None:
    """Create the folders above `out_dir`, as one clear error when that is impossible."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path=out_dir.parent, action="create directory") from None


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    train: list[np.ndarray],
    val: list[np.ndarray],
    seq_len: int,
    vocab_size: int,
    eos_id: int | None,
    tokenizer: dict,
    sources: list,
    pad_id: int | None = None,
) -> Path:
    """Write a data directory (one shard per array) atomically; return its path.

    Raises DatasetExistsError when `out_dir` already holds anything, including when another
    writer finished first while this one was writing.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise FP8LabError(f"{out_dir}: seq_len must be a positive integer, got {seq_len!r}")
    for split_name, arrays in (("train", train), ("val", val)):
        for i, a in enumerate(arrays):
            if isinstance(a, np.ndarray) and a.ndim == 2 and a.shape[1] != seq_len + 1:
                raise FP8LabError(
                    f"{out_dir}: {split_name} array {i} has windows of {a.shape[1]} tokens, "
                    f"expected seq_len + 1 = {seq_len + 1}"
                )
    with DatasetWriter(out_dir, seq_len=seq_len, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id) as writer:
        for split_name, arrays in (("train", train), ("val", val)):
            for a in arrays:
                writer.add_shard(split_name, a)
        return writer.finish(tokenizer=tokenizer, sources=sources)


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise FP8LabError(f"data directory {path} not found: {_PREPARE_HINT}")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FP8LabError(
            f"data directory {path} has no {MANIFEST}: it is not a prepared (or completely written) data directory; "
            f"{_PREPARE_HINT}"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FP8LabError(f"{mpath} is not valid JSON ({e}); prepare the data again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FP8LabError(f"{mpath} has format {got!r}, expected {DATASET_FORMAT!r}; {_PREPARE_HINT}")
    if manifest.get("version") != DATASET_VERSION:
        raise FP8LabError(
            f"{mpath} has version {manifest.get('version')!r}, this fp8lab reads {DATASET_VERSION}; "
            "prepare the data again"
        )
    for key, ok in (
        ("seq_len", lambda v: type(v) is int and v >= 1),
        ("vocab_size", lambda v: type(v) is int and v >= 1),
        ("eos_id", lambda v: v is None or type(v) is int),
        ("pad_id", lambda v: v is None or type(v) is int),
        ("tokenizer", lambda v: isinstance(v, dict)),
        ("splits", lambda v: isinstance(v, dict) and all(isinstance(s, list) for s in v.values())),
    ):
        # pad_id arrived with shard format 2; manifests written before it have none.
        if key not in manifest and key == "pad_id":
            manifest["pad_id"] = None
        if key not in manifest or not ok(manifest[key]):
            raise FP8LabError(
                f"{mpath}: key {key!r} is missing or invalid ({manifest.get(key)!r}); prepare the data again"
            )
    return manifest


def _open_entry(*, path: Path, manifest: dict, entry: object, verify: str) -> Shard:
    mpath = path / MANIFEST
    if not isinstance(entry, dict) or not all(k in entry for k in ("file", "sequences", "bytes", "sha256")):
        raise FP8LabError(f"{mpath}: shard entry {entry!r} needs keys file, sequences, bytes, sha256")
    name = entry["file"]
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise FP8LabError(f"{mpath}: shard file {name!r} must be a plain file name inside {path}")
    shard = open_shard(path / name)
    for what, got, want in (
        ("seq_len", shard.seq_len, manifest["seq_len"]),
        ("vocab_size", shard.vocab_size, manifest["vocab_size"]),
        ("eos_id", shard.eos_id, manifest["eos_id"]),
        ("pad_id", shard.pad_id, manifest["pad_id"]),
        ("sequence count", shard.count, entry["sequences"]),
        ("size in bytes", shard.nbytes, entry["bytes"]),
    ):
        if got != want:
            raise FP8LabError(
                f"data shard {shard.path} does not match {mpath}: {what} is {got}, manifest says {want}; "
                "the directory was modified; prepare the data again"
            )
    if verify == "full":
        digest = sha256_file(shard.path)
        if digest != entry["sha256"]:
            raise FP8LabError(
                f"data shard {shard.path} changed: sha256 is {digest[:16]}..., "
                f"{MANIFEST} says {str(entry['sha256'])[:16]}...; "
                "the file is corrupt or was edited; prepare the data again"
            )
    return shard


def _check_tokenizer_files(*, path: Path, tokenizer: dict, verify: str) -> None:
    # tokenizer.json, and from a tokenizer folder tokenizer_config.json and chat_template.jinja.
    for key, sha_key in (("file", "sha256"), ("config_file", "config_sha256"),
                         ("chat_template_file", "chat_template_sha256")):
        name = tokenizer.get(key)
        if name is None:
            continue
        mpath = path / MANIFEST
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise FP8LabError(f"{mpath}: tokenizer file {name!r} must be a plain file name inside {path}")
        if not (path / name).is_file():
            raise FP8LabError(f"tokenizer file {path / name} listed in {mpath} is missing; prepare the data again")
        if verify == "full" and sha256_file(path / name) != tokenizer.get(sha_key):
            raise FP8LabError(f"tokenizer file {path / name} changed since it was prepared (sha256 differs); "
                              "prepare the data again")


def open_dataset(path: str | os.PathLike, *, verify: str = "size") -> Dataset:
    """Open a data directory, checking every shard against the manifest.

    verify="size" checks headers and file sizes (cheap); verify="full" also recomputes every sha256.
    """
    if verify not in ("size", "full"):
        raise FP8LabError(f"verify must be 'size' or 'full', got {verify!r}")
    path = Path(path)
    manifest = _read_manifest(path)
    _check_tokenizer_files(path=path, tokenizer=manifest["tokenizer"], verify=verify)
    entries = [e for es in manifest["splits"].values() for e in es]
    with_flags = sum(isinstance(e, dict) and "flags" in e for e in entries)
    if with_flags not in (0, len(entries)):  # the loader's loss mask must cover all of the data or none
        raise FP8LabError(f"{path / MANIFEST} lists flags for {with_flags} of {len(entries)} shards; "
                          "prepare the data again")
    splits = {}
    for name, entries in manifest["splits"].items():
        shards = [_open_entry(path=path, manifest=manifest, entry=e, verify=verify) for e in entries]
        flags = [open_flags_entry(path=path, mpath=path / MANIFEST, entry=e["flags"], shard=s, verify=verify)
                 for e, s in zip(entries, shards, strict=True)] if with_flags else None
        splits[name] = Split(name=name, path=path, seq_len=manifest["seq_len"], vocab_size=manifest["vocab_size"],
                             shards=shards, pad_id=manifest["pad_id"], eos_id=manifest["eos_id"], flags=flags)
    return Dataset(
        path=path,
        seq_len=manifest["seq_len"],
        vocab_size=manifest["vocab_size"],
        eos_id=manifest["eos_id"],
        tokenizer=manifest["tokenizer"],
        sources=manifest.get("sources", []),
        splits=splits,
        pad_id=manifest["pad_id"],
    )
