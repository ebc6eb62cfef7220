"""The on-disk packed token format: a 256-byte header, then a (count, seq_len + 1) token array.

Each shard describes itself (like llm.c's .bin files), so a shard can be checked on its own
without the manifest: the header says how to read the rest and how big the file must be.
All integers are little-endian; token ids are uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fp8lab.errors import FP8LabError
from fp8lab.fsutil import fsync_dir, os_error

HEADER_BYTES = 256
MAGIC = b"FP8LTOK\x00"
# Version 2 added pad_id (--no-pack data). A version-1 header has zeros where pad_id now sits
# and otherwise the same layout, so version-1 shards are still read (as shards without padding).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
NO_EOS = 0xFFFFFFFF
NO_PAD = 0xFFFFFFFF
# magic, version, itemsize, seq_len, count, vocab_size, eos_id, pad_id; the rest of the 256 bytes is zero.
_HEADER = struct.Struct("<8sIIIQIII")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_MAX_VOCAB = 2**32 - 1  # ids must fit uint32 and stay distinct from NO_EOS


@dataclass(frozen=True, eq=False)
class Shard:
    """One opened shard; `tokens` is a read-only memmap of shape (count, seq_len + 1)."""

    path: Path
    seq_len: int
    count: int
    vocab_size: int
    eos_id: int | None
    tokens: np.ndarray
    pad_id: int | None = None  # target positions holding this id carry no loss

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + self.tokens.nbytes


def token_dtype(*, vocab_size: int) -> np.dtype:
    """The narrowest on-disk dtype that holds every id below `vocab_size`."""
    return _DTYPES[2] if vocab_size <= 65536 else _DTYPES[4]


def shard_nbytes(*, count: int, seq_len: int, itemsize: int) -> int:
    """Exact file size of a shard with these dimensions."""
    return HEADER_BYTES + count * (seq_len + 1) * itemsize


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so big shards never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _check_vocab(*, path: Path, vocab_size: int, eos_id: int | None, pad_id: int | None = None) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= _MAX_VOCAB:
        raise FP8LabError(f"{path}: vocab_size must be an integer in [1, {_MAX_VOCAB}], got {vocab_size!r}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size):
            raise FP8LabError(f"{path}: {name} must be None or an integer in [0, {vocab_size}), got {value!r}")


def _check_tokens(*, path: Path, tokens: object, vocab_size: int) -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        desc = (
            f"{tokens.dtype} array of shape {tokens.shape}" if isinstance(tokens, np.ndarray) else type(tokens).__name__
        )
        raise FP8LabError(f"{path}: tokens must be a 2-D integer array (sequences, seq_len + 1), got {desc}")
    if tokens.shape[1] < 2:
        raise FP8LabError(f"{path}: each window needs at least 2 tokens (seq_len >= 1), got shape {tokens.shape}")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise FP8LabError(
                f"{path}: token id {bad} is outside [0, {vocab_size}); "
                "fix the tokenizer output or the vocab_size passed with it"
            )
    return np.ascontiguousarray(tokens, dtype=token_dtype(vocab_size=vocab_size))


def _pack_header(*, itemsize: int, seq_len: int, count: int, vocab_size: int, eos_id, pad_id) -> bytes:
    return _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        itemsize,
        seq_len,
        count,
        vocab_size,
        NO_EOS if eos_id is None else eos_id,
        NO_PAD if pad_id is None else pad_id,
    ).ljust(HEADER_BYTES, b"\x00")


class ShardStream:
    """A shard written piece by piece, so `prepare` never holds a shard in memory.

    The file grows under `<path>.tmp` with a zeroed header; `close` writes the real header (the
    count is known only then), syncs, checksums the file by reading it back, and renames it.
    """

    def __init__(
        self, path: str | os.PathLike, *, seq_len: int, vocab_size: int, eos_id: int | None, pad_id: int | None = None
    ) -> None:
        self.path = Path(path)
        _check_vocab(path=self.path, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id)
        if pad_id is not None and pad_id == eos_id:
            raise FP8LabError(f"{self.path}: pad_id and eos_id are both {pad_id}; padding must have its own id")
        self.seq_len, self.vocab_size, self.eos_id, self.pad_id = seq_len, vocab_size, eos_id, pad_id
        self.count = 0
        self.tmp = Path(f"{self.path}.tmp")
        try:
            self._file = open(self.tmp, "wb", buffering=1 << 20)
        except OSError as e:
            raise os_error(e, path=self.tmp, action="create") from None
        self._write(b"\x00" * HEADER_BYTES)

    def append(self, tokens: np.ndarray) -> None:
        """Add (n, seq_len + 1) windows; ids are checked against the vocabulary as in write_shard."""
        data = _check_tokens(path=self.path, tokens=tokens, vocab_size=self.vocab_size)
        if data.shape[1] != self.seq_len + 1:
            raise FP8LabError(f"{self.path}: windows of {data.shape[1]} tokens, expected {self.seq_len + 1}")
        self._write(memoryview(data.reshape(-1).view(np.uint8)))
        self.count += len(data)

    def _write(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            self.abort()
            raise os_error(e, path=self.tmp, nbytes=len(data)) from None

    def close(self) -> dict:
        """Finish the file and return its manifest entry."""
        itemsize = token_dtype(vocab_size=self.vocab_size).itemsize
        header = _pack_header(itemsize=itemsize, seq_len=self.seq_len, count=self.count,
                              vocab_size=self.vocab_size, eos_id=self.eos_id, pad_id=self.pad_id)
        nbytes = shard_nbytes(count=self.count, seq_len=self.seq_len, itemsize=itemsize)
        digest = finish_stream(self._file, header, tmp=self.tmp, path=self.path, nbytes=nbytes, abort=self.abort)
        return {"file": self.path.name, "sequences": self.count, "bytes": nbytes, "sha256": digest}

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._file.close()  # flushes what is buffered, which fails again on a full disk
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def write_shard(
    path: str | os.PathLike, tokens: np.ndarray, *, vocab_size: int, eos_id: int | None, pad_id: int | None = None
) -> dict:
    """Write `tokens` (sequences, seq_len + 1) as a shard, atomically; return its manifest entry.

    `pad_id`, when given, marks padding: the loader turns targets holding it into "no loss".
    """
    path = Path(path)
    _check_vocab(path=path, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id)
    if pad_id is not None and pad_id == eos_id:
        raise FP8LabError(f"{path}: pad_id and eos_id are both {pad_id}; padding must have its own id")
    data = _check_tokens(path=path, tokens=tokens, vocab_size=vocab_size)
    count, window = data.shape
    header = _pack_header(
        itemsize=data.itemsize, seq_len=window - 1, count=count, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id
    )
    payload = data.reshape(-1).view(np.uint8)
    digest = write_atomic(path, header, payload, action="write shard")
    return {"file": path.name, "sequences": count, "bytes": len(header) + payload.size, "sha256": digest}


def write_atomic(path: Path, header: bytes, payload: np.ndarray, *, action: str) -> str:
    """header + payload (uint8) as `path`: written to <path>.tmp, synced, renamed into place, so a
    crash never leaves a partial file under the real name; returns the file's sha256."""
    digest = hashlib.sha256(header)
    digest.update(payload)
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, path=path, action=action, nbytes=len(header) + payload.size) from e
    fsync_dir(path.parent)
    return digest.hexdigest()


def finish_stream(f, header: bytes, *, tmp: Path, path: Path, nbytes: int, abort) -> str:
    """End a file grown under `tmp` behind a zeroed header: write the real `header` (known only
    now), sync, checksum it by reading it back, rename it to `path`; returns the sha256. On an
    OSError `abort()` removes the partial file first."""
    try:
        f.seek(0)
        f.write(header)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        abort()
        raise os_error(e, path=tmp, nbytes=nbytes) from e
    fsync_dir(path.parent)
    return digest


def open_shard(path: str | os.PathLike) -> Shard:
    """Open and validate a shard; the tokens are memory-mapped read-only, not loaded."""
    path = Path(path)
    if not path.is_file():
        raise FP8LabError(f"data shard {path} not found: check `data.path` or prepare the data again")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise FP8LabError(
            f"data shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header: "
            "the file is truncated; prepare the data again"
        )
    magic, version, itemsize, seq_len, count, vocab_size, eos, pad = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise FP8LabError(
            f"{path} is not an fp8lab token shard (magic {magic!r}, expected {MAGIC!r}); "
            "point `data.path` at a prepared fp8lab data directory"
        )
    if version not in READABLE_VERSIONS:
        raise FP8LabError(
            f"data shard {path} has format version {version}, this fp8lab reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; prepare the data again with this version"
        )
    if version == 1:
        pad = NO_PAD
    if itemsize not in _DTYPES:
        raise FP8LabError(f"data shard {path} has token itemsize {itemsize}, expected 2 or 4: the header is corrupt")
    if (
        seq_len < 1
        or vocab_size < 1
        or (eos != NO_EOS and eos >= vocab_size)
        or (pad != NO_PAD and (pad >= vocab_size or pad == eos))
    ):
        raise FP8LabError(
            f"data shard {path} has an inconsistent header (seq_len={seq_len}, vocab_size={vocab_size}, "
            f"eos_id={eos}, pad_id={pad}); prepare the data again"
        )
    expected = shard_nbytes(count=count, seq_len=seq_len, itemsize=itemsize)
    if size != expected:
        what = "truncated" if size < expected else "has extra bytes"
        raise FP8LabError(
            f"data shard {path} {what}: it is {size} bytes but its header ({count} x {seq_len + 1} tokens of "
            f"{itemsize} bytes) needs {expected}; prepare the data again"
        )
    tokens = np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(count, seq_len + 1))
    return Shard(
        path=path,
        seq_len=seq_len,
        count=count,
        vocab_size=vocab_size,
        eos_id=None if eos == NO_EOS else eos,
        tokens=tokens,
        pad_id=None if pad == NO_PAD else pad,
    )
