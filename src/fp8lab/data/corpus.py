"""The embedded default corpus: this Python's own standard library sources, byte-tokenized.

It needs no download and is real code text, so a small model trained on it shows a real
loss curve. Everything is deterministic for a given Python installation: files are walked in
sorted order, taken whole until the byte budget is reached, and split by running byte share.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sysconfig
from pathlib import Path

import numpy as np

from fp8lab.data.dataset import DatasetExistsError, open_dataset, write_dataset
from fp8lab.env import cache_dir
from fp8lab.errors import FP8LabError

BYTE_VOCAB_SIZE = 257
BYTE_EOS_ID = 256
# Bump when the selection, split or packing below changes, so stale caches are not reused.
CORPUS_VERSION = 1
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


def byte_tokenize(data: bytes) -> np.ndarray:
    """Token ids of `data`: one per byte, values 0..255, as uint16."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def byte_detokenize(tokens: np.ndarray | list[int], *, eos: bytes = b"") -> bytes:
    """Bytes of byte-level token ids; each EOS id becomes `eos`."""
    ids = np.asarray(tokens).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > BYTE_EOS_ID):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise FP8LabError(f"byte tokens must lie in [0, {BYTE_EOS_ID}], got token id {bad}")
    segments = np.split(ids, np.flatnonzero(ids == BYTE_EOS_ID))
    # Every segment after the first starts with the EOS that split it off.
    return eos.join(seg[1 if i else 0 :].astype(np.uint8).tobytes() for i, seg in enumerate(segments))


def stdlib_root() -> Path:
    """Directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(*, byte_budget: int, root: Path | None = None) -> list[tuple[str, int]]:
    """(relative posix path, size) of the stdlib `.py` files, sorted, whole files until the budget is reached."""
    root = stdlib_root() if root is None else root
    selected: list[tuple[str, int]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk itself deterministic; pruning skips vendored and test trees.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            full = Path(dirpath) / name
            size = full.stat().st_size
            if size == 0:
                continue
            if total + size > byte_budget:
                return selected
            selected.append((full.relative_to(root).as_posix(), size))
            total += size
    return selected


def _split_documents(sizes: list[int], *, val_fraction: float) -> list[bool]:
    """True for documents that go to val: each goes where it brings val closer to its byte share."""
    is_val, val_bytes, total = [], 0, 0
    for size in sizes:
        total += size
        to_val = val_bytes + size / 2 < val_fraction * total
        val_bytes += size if to_val else 0
        is_val.append(to_val)
    return is_val


def pack_documents(docs: list[bytes], *, seq_len: int) -> np.ndarray:
    """Byte-tokenize docs, end each with EOS, and cut into non-overlapping (n, seq_len + 1) windows."""
    window = seq_len + 1
    stream = np.empty(sum(len(d) + 1 for d in docs), dtype=np.uint16)
    pos = 0
    for d in docs:
        stream[pos : pos + len(d)] = np.frombuffer(d, dtype=np.uint8)
        stream[pos + len(d)] = BYTE_EOS_ID
        pos += len(d) + 1
    n = stream.size // window  # the tail that does not fill a window is dropped
    return stream[: n * window].reshape(n, window)


default_cache_dir = cache_dir  # kept under its old name: fp8lab.data exports it


def embedded_dataset(
    *, seq_len: int, byte_budget: int = 4_000_000, val_fraction: float = 0.05, cache_dir: Path | None = None
) -> Path:
    """Path of the prepared stdlib corpus for these parameters, building it on first use."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise FP8LabError(f"seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(byte_budget, bool) or not isinstance(byte_budget, int) or byte_budget < 1:
        raise FP8LabError(f"byte_budget must be a positive integer, got {byte_budget!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise FP8LabError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    root = stdlib_root()
    if not root.is_dir():
        raise FP8LabError(
            f"Python standard library sources not found at {root}; set data.path to a prepared dataset instead"
        )
    files = stdlib_files(byte_budget=byte_budget, root=root)
    if not files:
        raise FP8LabError(f"no standard library .py file under {root} fits byte_budget={byte_budget}; raise the budget")

    key = hashlib.sha256(
        repr((CORPUS_VERSION, platform.python_implementation(), platform.python_version(), files)).encode()
    ).hexdigest()[:10]
    out = (cache_dir or default_cache_dir()) / "data" / f"stdlib-s{seq_len}-b{byte_budget}-v{val_fraction!r}-{key}"
    if (out / "manifest.json").exists():
        return _reuse(out)

    docs = [(root / rel).read_bytes() for rel, _ in files]
    is_val = _split_documents([len(d) for d in docs], val_fraction=val_fraction)
    train = pack_documents([d for d, v in zip(docs, is_val, strict=True) if not v], seq_len=seq_len)
    val = pack_documents([d for d, v in zip(docs, is_val, strict=True) if v], seq_len=seq_len)
    if len(train) == 0 or (val_fraction > 0 and len(val) == 0):
        raise FP8LabError(
            f"byte_budget={byte_budget} gives {len(train)} train and {len(val)} val sequences of seq_len={seq_len}; "
            "raise the byte budget or val_fraction, or lower seq_len"
        )
    total = sum(len(d) for d in docs)
    # A concurrent builder may finish first (DatasetExistsError); its result is identical.
    with contextlib.suppress(DatasetExistsError):
        write_dataset(
            out,
            train=[train],
            val=[val],
            seq_len=seq_len,
            vocab_size=BYTE_VOCAB_SIZE,
            eos_id=BYTE_EOS_ID,
            tokenizer={"type": "byte", "vocab_size": BYTE_VOCAB_SIZE, "eos_id": BYTE_EOS_ID},
            sources=[
                {
                    "kind": "python-stdlib",
                    "python": platform.python_version(),
                    "root": str(root),
                    "files": len(docs),
                    "bytes": total,
                    "val_files": sum(is_val),
                    "val_bytes": sum(len(d) for d, v in zip(docs, is_val, strict=True) if v),
                }
            ],
        )
    return _reuse(out)


def _reuse(out: Path) -> Path:
    try:
        open_dataset(out)
    except FP8LabError as e:
        raise FP8LabError(f"cached corpus {out} is unusable ({e}); delete that directory and rerun") from e
    return out
