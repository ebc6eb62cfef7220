"""Per-token flags stored beside the token shards of instruction data: one uint8 per token.

A flags file has the shape of its token shard, (count, seq_len + 1), behind its own 256-byte
header (magic, version, seq_len, count), so it can be checked on its own like a shard. Bit 0
(FLAG_LOSS): the token is a target that carries loss. Bit 1 (FLAG_DOC_START): the token starts
a document (an example). Padding has neither. Text data has no flags files: every target
carries loss there and documents are told apart by EOS.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from fp8lab.data.shards import Shard, finish_stream, sha256_file, write_atomic
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import os_error

FLAG_LOSS = 1
FLAG_DOC_START = 2
FLAG_BITS = {"loss": FLAG_LOSS, "doc_start": FLAG_DOC_START}  # recorded in the manifest
FLAGS_MAGIC = b"FP8LFLG\x00"
FLAGS_VERSION = 1
FLAGS_SUFFIX = ".flags"
HEADER_BYTES = 256
# magic, version, seq_len, count; the rest of the 256 bytes is zero.
_HEADER = struct.Struct("<8sIIQ")
_KNOWN = FLAG_LOSS | FLAG_DOC_START


def flags_name(shard_file: str) -> str:
    """The flags file of token shard `shard_file`: train_00000.bin -> train_00000.flags."""
    return Path(shard_file).with_suffix(FLAGS_SUFFIX).name


def flags_nbytes(*, count: int, seq_len: int) -> int:
    """Exact file size of a flags file with these dimensions."""
    return HEADER_BYTES + count * (seq_len + 1)


def _header(*, seq_len: int, count: int) -> bytes:
    return _HEADER.pack(FLAGS_MAGIC, FLAGS_VERSION, seq_len, count).ljust(HEADER_BYTES, b"\x00")


def _check(path: Path, flags: object, *, seq_len: int) -> np.ndarray:
    if not isinstance(flags, np.ndarray) or flags.ndim != 2 or not np.issubdtype(flags.dtype, np.integer):
        raise FP8LabError(f"{path}: flags must be a 2-D integer array (sequences, seq_len + 1)")
    if flags.shape[1] != seq_len + 1:
        raise FP8LabError(f"{path}: flags rows of {flags.shape[1]} tokens, expected seq_len + 1 = {seq_len + 1}")
    if flags.size and (int(flags.min()) < 0 or int(flags.max()) & ~_KNOWN):
        raise FP8LabError(f"{path}: flags may only set bits {FLAG_BITS}, got values up to {int(flags.max())}")
    return np.ascontiguousarray(flags, dtype=np.uint8)


class FlagsStream:
    """A flags file written piece by piece beside a ShardStream: <path>.tmp grows with a zeroed
    header, `close` writes the real one, syncs, checksums and renames (as ShardStream does)."""

    def __init__(self, path: str | os.PathLike, *, seq_len: int) -> None:
        self.path, self.seq_len, self.count = Path(path), seq_len, 0
        self.tmp = Path(f"{self.path}.tmp")
        try:
            self._file = open(self.tmp, "wb", buffering=1 << 20)
            self._file.write(b"\x00" * HEADER_BYTES)
        except OSError as e:
            raise os_error(e, path=self.tmp, action="create") from None

    def append(self, flags: np.ndarray) -> None:
        """Add (n, seq_len + 1) rows of flags."""
        data = _check(self.path, flags, seq_len=self.seq_len)
        try:
            self._file.write(memoryview(data.reshape(-1)))
        except OSError as e:
            self.abort()
            raise os_error(e, path=self.tmp, nbytes=data.size) from None
        self.count += len(data)

    def close(self) -> dict:
        """Finish the file and return its manifest entry."""
        nbytes = flags_nbytes(count=self.count, seq_len=self.seq_len)
        digest = finish_stream(self._file, _header(seq_len=self.seq_len, count=self.count), tmp=self.tmp,
                               path=self.path, nbytes=nbytes, abort=self.abort)
        return {"file": self.path.name, "sequences": self.count, "bytes": nbytes, "sha256": digest}

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def write_flags(path: str | os.PathLike, flags: np.ndarray, *, seq_len: int) -> dict:
    """Write (sequences, seq_len + 1) `flags` as one file, atomically; return its manifest entry."""
    path = Path(path)
    data = _check(path, flags, seq_len=seq_len)
    header = _header(seq_len=seq_len, count=len(data))
    digest = write_atomic(path, header, data.reshape(-1), action="write flags")
    return {"file": path.name, "sequences": len(data), "bytes": len(header) + data.size, "sha256": digest}


def open_flags(path: str | os.PathLike) -> np.ndarray:
    """Open and validate a flags file; a read-only memmap of shape (count, seq_len + 1), uint8."""
    path = Path(path)
    if not path.is_file():
        raise FP8LabError(f"flags file {path} not found: the data directory is incomplete; prepare the data again")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise FP8LabError(f"flags file {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header: "
                          "the file is truncated; prepare the data again")
    magic, version, seq_len, count = _HEADER.unpack_from(raw)
    if magic != FLAGS_MAGIC:
        raise FP8LabError(f"{path} is not an fp8lab flags file (magic {magic!r}, expected {FLAGS_MAGIC!r}); "
                          "prepare the data again")
    if version != FLAGS_VERSION:
        raise FP8LabError(f"flags file {path} has format version {version}, this fp8lab reads {FLAGS_VERSION}; "
                          "prepare the data again with this version")
    expected = flags_nbytes(count=count, seq_len=seq_len)
    if seq_len < 1 or size != expected:
        raise FP8LabError(f"flags file {path} is {size} bytes but its header ({count} x {seq_len + 1}) needs "
                          f"{expected}: the file is truncated or corrupt; prepare the data again")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(count, seq_len + 1))


def open_flags_entry(*, path: Path, mpath: Path, entry: object, shard: Shard, verify: str) -> np.ndarray:
    """The flags listed as `entry` (a shard entry's "flags") in manifest `mpath`, checked against
    `shard` (always) and the manifest's sha256 (verify="full")."""
    if not isinstance(entry, dict) or not all(k in entry for k in ("file", "sequences", "bytes", "sha256")):
        raise FP8LabError(f"{mpath}: flags entry {entry!r} of {shard.path.name} needs keys file, sequences, bytes, "
                          "sha256; prepare the data again")
    name = entry["file"]
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise FP8LabError(f"{mpath}: flags file {name!r} must be a plain file name inside {path}")
    flags = open_flags(path / name)
    for what, got, want in (("shape", flags.shape, shard.tokens.shape), ("sequence count", len(flags),
                            entry["sequences"]), ("size in bytes", (path / name).stat().st_size, entry["bytes"])):
        if got != want:
            source = f"its token shard {shard.path.name}" if what == "shape" else mpath.name
            raise FP8LabError(f"flags file {path / name} does not match {source}: {what} is {got}, expected {want}; "
                              "the directory was modified; prepare the data again")
    if verify == "full":
        digest = sha256_file(path / name)
        if digest != entry["sha256"]:
            raise FP8LabError(f"flags file {path / name} changed: sha256 is {digest[:16]}..., {mpath.name} says "
                              f"{str(entry['sha256'])[:16]}...; the file is corrupt or was edited; prepare the data "
                              "again")
    return flags
