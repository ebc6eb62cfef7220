"""Pre-tokenized NumPy inputs: 1-D token streams and 2-D (N, L) sequence arrays.

Arrays are memory-mapped and walked in chunks, so a 1.7 GB array is checked and copied into
shards without ever being loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fp8lab.errors import FP8LabError

CHUNK_TOKENS = 1 << 24  # 16M tokens per step: 32-64 MB of ids, a few hundred MB of temporaries at most


def open_npy(path: Path) -> np.ndarray:
    """The array in `path`, memory-mapped read-only, checked to be 1-D or 2-D integer ids."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FP8LabError(f"input {path} is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise FP8LabError(f"input {path} is not a single .npy array")
    if arr.dtype.kind not in "iu":
        raise FP8LabError(
            f"input {path} holds {arr.dtype} values; token ids must be integers (save the array as uint16/uint32/int64)"
        )
    if arr.ndim not in (1, 2):
        raise FP8LabError(f"input {path} has shape {arr.shape}; expected a 1-D token stream or 2-D (N, L) sequences")
    if arr.size == 0:
        raise FP8LabError(f"input {path} is empty (shape {arr.shape})")
    if arr.ndim == 2 and arr.shape[1] < 2:
        raise FP8LabError(
            f"input {path} has rows of {arr.shape[1]} token; a sequence needs at least 2 (L = seq_len + 1)"
        )
    return arr


def check_ids(chunk: np.ndarray, *, path: Path, vocab_size: int, start: int) -> np.ndarray:
    """`chunk` (elements from flat index `start` of `path`) as uint32, after checking 0 <= id < vocab_size."""
    lo, hi = int(chunk.min()), int(chunk.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        at = start + int(np.flatnonzero(chunk.reshape(-1) == bad)[0])
        what = "a negative token id" if bad < 0 else f"token id {bad}, outside the vocabulary of {vocab_size}"
        hint = "ids must be >= 0" if bad < 0 else "pass the right --vocab-size (or --tokenizer)"
        raise FP8LabError(f"input {path} has {what} at flat index {at} (value {bad}); {hint}")
    return chunk.astype(np.uint32, copy=False)


def iter_rows(path: Path, arr: np.ndarray, *, vocab_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row index, checked uint32 rows) of a 2-D array, chunk by chunk."""
    rows = max(1, CHUNK_TOKENS // arr.shape[1])
    for start in range(0, arr.shape[0], rows):
        chunk = np.asarray(arr[start : start + rows])
        yield start, check_ids(chunk, path=path, vocab_size=vocab_size, start=start * arr.shape[1])


def iter_documents(
    path: Path, arr: np.ndarray, *, vocab_size: int, eos_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray, bool, bool]]:
    """Documents of a 1-D stream: the runs up to and including each EOS.

    Yields (flat ids, lengths, first_continues, last_open) per chunk, as the packer takes them;
    a run crossing a chunk edge is continued rather than copied along, and the run after the
    last EOS of the file is a document too (its EOS is added). Empty documents (EOS EOS) are
    skipped, as empty texts are.
    """
    n = arr.shape[0]
    open_doc = False
    for start in range(0, n, CHUNK_TOKENS):
        chunk = check_ids(np.asarray(arr[start : start + CHUNK_TOKENS]), path=path, vocab_size=vocab_size, start=start)
        last_chunk = start + len(chunk) >= n
        eos = np.flatnonzero(chunk == eos_id)
        starts = np.concatenate([[0], eos + 1])
        lengths = np.concatenate([eos + 1, [len(chunk)]]) - starts  # closed runs include their EOS
        keep = lengths > 0
        keep[:-1] &= lengths[:-1] > 1  # a lone EOS is an empty document...
        keep[0] |= open_doc and lengths[0] > 0  # ...unless it closes the one left open by the last chunk
        tail = int(lengths[-1])
        flat = chunk
        if not keep.all():
            flat = np.delete(chunk, starts[:-1][~keep[:-1]])  # the EOS tokens of skipped empty runs
        lengths = lengths[keep]
        tail_open = tail > 0 and not last_chunk
        if tail > 0 and last_chunk:
            flat = np.append(flat, np.uint32(eos_id))
            lengths[-1] += 1
        if len(lengths):
            yield flat, lengths, open_doc and bool(keep[0]), tail_open
        open_doc = tail_open
