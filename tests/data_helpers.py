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


# Llama 3's chat template, as its tokenizer_config.json has it.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def make_tokenizer_folder(folder: Path, *, config: dict | None = None, vocab_size: int = 400) -> Path:
    """A Llama-3-style tokenizer folder: a byte-level BPE tokenizer.json trained here with Llama 3's
    special tokens, whose post-processor adds <|begin_of_text|> (as Llama 3's does), and a
    tokenizer_config.json (`config`, default: BOS, EOS <|eot_id|> and Llama 3's chat template;
    None values are left out)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHAT_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(make_docs(200, seed=3), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    settings = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
                **(config or {})}
    settings = {k: v for k, v in settings.items() if v is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return folder


def write_lines(path: Path, records: list) -> Path:
    """JSON lines, one record each (a str record is written as it is: for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path
