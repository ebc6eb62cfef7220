"""Helpers for the `fp8lab prepare` tests: real input files (gzip, Parquet, .npy) and a real
tokenizer.json, all generated here from a seeded RNG, so no test depends on a download or on
this Python's standard library."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from fp8lab.data import open_dataset

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have not "
    "data model token train loss step batch sequence window shard manifest header vocab split seed "
    "gradient precision float eight scale tensor matrix layer head block norm rope attention "
    "café naïve über straße 東京 데이터 ürün ñandú"
).split()


def make_docs(n: int, *, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """`n` documents of seeded pseudo-English (with some non-ASCII words), lines and punctuation."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(min_words, max_words + 1)))
        parts = []
        for w in words:
            parts.append(str(w))
            r = rng.random()
            parts.append(".\n" if r < 0.05 else ", " if r < 0.12 else " ")
        docs.append("".join(parts).strip())
    return docs


def write_jsonl(path: Path, docs: list[str], *, field: str = "text", gz: bool = False, extra: bool = True) -> Path:
    """JSON lines {field: doc, "id": i}; gzip-compressed when `gz` (mtime 0 for stable bytes)."""
    lines = "".join(json.dumps({"id": i, field: d} if extra else {field: d}) + "\n" for i, d in enumerate(docs))
    data = lines.encode("utf-8")
    if gz:
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_parquet(path: Path, docs: list[str], *, column: str = "text", row_group_size: int = 16) -> Path:
    """A Parquet file with `column` and an int column, in several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(range(len(docs)), pa.int64()), column: pa.array(docs, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def train_tokenizer_file(path: Path, docs: list[str], *, vocab_size: int = 500) -> Path:
    """A real byte-level BPE tokenizer.json trained with the `tokenizers` library, with </s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(str(path))
    return path


def all_rows(path: Path, split: str) -> np.ndarray:
    """Every window of `split` in file order, as int64."""
    s = open_dataset(path, verify="full").split(split)
    return s.gather(np.arange(len(s))).astype(np.int64)


def listing(root: Path) -> list[str]:
    """Names directly under `root` (to see that nothing, not even a temporary dir, was left)."""
    return sorted(p.name for p in Path(root).iterdir())
