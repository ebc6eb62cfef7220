"""Tokenizers for `fp8lab prepare`: built-in byte-level, a local Hugging Face tokenizer.json,
or a byte-level BPE trained on the input itself.

All of them encode a batch of documents to one flat id array, each document followed by its
EOS, plus per-document lengths (EOS included): what the packer wants, with no per-document
arrays and no insertion pass afterwards.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fp8lab.data.corpus import BYTE_EOS_ID, BYTE_VOCAB_SIZE
from fp8lab.errors import FP8LabError

# Looked up in this order when the tokenizer file does not say which token ends a document.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
TRAINED_SPECIALS = ("<|endoftext|>", "<|pad|>")  # ids 0 and 1 of a trained tokenizer
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS 256: no file, no training, never out of vocabulary."""

    kind = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    pad_id = None  # none defined; --no-pack appends one (257)
    json_bytes = None

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids uint32 with an EOS after each document, lengths int64 with the EOS) of `texts`."""
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1
        encoded.append(b"")
        # A zero byte holds each EOS slot; it becomes EOS_ID below (a byte cannot hold 256).
        flat = np.frombuffer(b"\x00".join(encoded), dtype=np.uint8).astype(np.uint32)
        flat[np.cumsum(lengths) - 1] = self.eos_id
        return flat, lengths

    def describe(self) -> dict:
        """The manifest's record of this tokenizer."""
        return {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A `tokenizers.Tokenizer`; batch encoding runs on all cores in Rust (the GIL is released)."""

    def __init__(
        self, tok, *, kind: str, origin: str, eos_token: str | None = None, json_bytes: bytes | None = None
    ) -> None:
        self._tok = tok
        self.kind = kind
        self.origin = origin
        vocab = tok.get_vocab(with_added_tokens=True)
        # Ids need not be dense; the largest one decides how big the embedding must be.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        if self.vocab_size < 2:
            raise FP8LabError(f"tokenizer {origin} has {len(vocab)} tokens; that is not a usable vocabulary")
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        eos = next((vocab[n] for n in names if n in vocab), None)
        if eos is None:
            what = f"has no token {eos_token!r}" if eos_token else f"has none of the usual EOS tokens {EOS_CANDIDATES}"
            raise FP8LabError(f"tokenizer {origin} {what}; name the one that ends a document with --eos-token")
        self.eos_token = next(n for n in names if n in vocab)
        self.eos_id = eos
        self.pad_id = next((vocab[n] for n in PAD_CANDIDATES if n in vocab and vocab[n] != eos), None)
        # Saved with the data: the user's file byte for byte, or the trained tokenizer as serialized here.
        self.json_bytes = json_bytes if json_bytes is not None else tok.to_str(pretty=True).encode("utf-8")
        # encode_batch_fast skips offset tracking we never use (tokenizers >= 0.20).
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids uint32 with an EOS after each document, lengths int64 with the EOS) of `texts`."""
        # No BOS/EOS from the tokenizer's post-processor: exactly one EOS after each document, ours.
        ids = [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        eos = (self.eos_id,)
        chained = itertools.chain.from_iterable(itertools.chain.from_iterable((i, eos) for i in ids))
        flat = np.fromiter(chained, dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths

    def describe(self) -> dict:
        """The manifest's record of this tokenizer (the file itself is saved next to it)."""
        return {
            "type": self.kind,
            "file": TOKENIZER_FILE,
            "sha256": hashlib.sha256(self.json_bytes).hexdigest(),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "origin": self.origin,
        }


def load_tokenizer(path: str | Path, *, eos_token: str | None = None) -> HFTokenizer:
    """A Hugging Face tokenizer.json from a local file (no hub access)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FP8LabError(f"tokenizer file {path} not found; pass a local tokenizer.json (or 'byte')")
    data = path.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the Rust side raises plain Exception with serde's message
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FP8LabError(f"tokenizer file {path} could not be read as a Hugging Face tokenizer.json: {first}") from e
    return HFTokenizer(tok, kind="huggingface", origin=str(path), eos_token=eos_token, json_bytes=data)


def train_bpe(*, texts: Iterable[str], vocab_size: int, origin: str = "trained on the input") -> HFTokenizer:
    """Train a byte-level BPE on `texts` (deterministic for the same texts); ids 0, 1 are EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = 256 + len(TRAINED_SPECIALS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not floor <= vocab_size <= 2**31:
        raise FP8LabError(
            f"--vocab-size must be an integer >= {floor} (256 byte tokens + {len(TRAINED_SPECIALS)} specials) "
            f"for --train-tokenizer, got {vocab_size!r}"
        )
    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenization covers every input (no unknown token) and round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, kind="bpe-trained", origin=origin, eos_token=TRAINED_SPECIALS[0])

