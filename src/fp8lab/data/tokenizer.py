"""Tokenizers for `fp8lab prepare`: built-in byte-level, a local Hugging Face tokenizer.json
(or a tokenizer folder: tokenizer.json with tokenizer_config.json and chat_template.jinja),
or a byte-level BPE trained on the input itself.

All of them encode a batch of documents to one flat id array, each document followed by its
EOS, plus per-document lengths (EOS included): what the packer wants, with no per-document
arrays and no insertion pass afterwards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
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
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS 256: no file, no training, never out of vocabulary."""

    kind = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    pad_id = None  # none defined; --no-pack appends one (257)
    json_bytes = None
    bos_id = None
    add_bos = False
    chat_template = None
    template_origin = None

    def files(self) -> dict[str, bytes]:
        """The files saved with the data: none."""
        return {}

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, nothing added."""
        return [list(t.encode("utf-8")) for t in texts]

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
        self, tok, *, kind: str, origin: str, eos_token: str | None = None, json_bytes: bytes | None = None,
        folder: TokenizerFolder | None = None,
    ) -> None:
        self._tok = tok
        self.kind = kind
        self.origin = origin
        self.folder = folder or TokenizerFolder()
        vocab = tok.get_vocab(with_added_tokens=True)
        eos_token = eos_token or self.folder.eos_token  # --eos-token, else tokenizer_config.json's, else detected
        # Ids need not be dense; the largest one decides how big the embedding must be.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        if self.vocab_size < 2:
            raise FP8LabError(f"tokenizer {origin} has {len(vocab)} tokens; that is not a usable vocabulary")
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        eos = next((vocab[n] for n in names if n in vocab), None)
        if eos is None:
            what = f"has no token {eos_token!r}" if eos_token else f"has none of the usual EOS tokens {EOS_CANDIDATES}"
            if eos_token and eos_token == self.folder.eos_token and not self.folder.eos_from_cli:
                what += f" (the eos_token of {self.folder.config_origin})"
            raise FP8LabError(f"tokenizer {origin} {what}; name the one that ends a document with --eos-token")
        self.eos_token = next(n for n in names if n in vocab)
        self.eos_id = eos
        self.pad_id = next((vocab[n] for n in PAD_CANDIDATES if n in vocab and vocab[n] != eos), None)
        # Saved with the data: the user's file byte for byte, or the trained tokenizer as serialized here.
        self.json_bytes = json_bytes if json_bytes is not None else tok.to_str(pretty=True).encode("utf-8")
        # encode_batch_fast skips offset tracking we never use (tokenizers >= 0.20).
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        self.bos_id, self.add_bos = self._bos(vocab)
        self.chat_template, self.template_origin = self.folder.chat_template, self.folder.template_origin

    def _bos(self, vocab: dict) -> tuple[int | None, bool]:
        """(BOS id, whether a prompt gets one): as `tokenizer(prompt)` in transformers does, that is
        tokenizer_config.json's add_bos_token when it says, else whatever tokenizer.json's own
        post-processor adds (Llama 3: <|begin_of_text|>; a GPT-2 style BPE: nothing)."""
        name = self.folder.bos_token
        if name is None or name not in vocab:  # a config naming a token its tokenizer lacks adds none
            return None, False
        bos = vocab[name]
        if self.folder.add_bos_token is not None:
            return bos, self.folder.add_bos_token
        probe = self._tok.encode("a", add_special_tokens=True).ids
        return bos, probe[:1] == [bos]

    def files(self) -> dict[str, bytes]:
        """The files saved with the data, by name: tokenizer.json and the folder's config and template."""
        return {TOKENIZER_FILE: self.json_bytes, **self.folder.files}

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text: no BOS, EOS or post-processing; special tokens written in the text
        (a chat template's <|start_header_id|>) are still read as those tokens."""
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

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
            **self.folder.describe(),
            **({"bos_token": self.folder.bos_token, "bos_id": self.bos_id} if self.bos_id is not None else {}),
        }


class TokenizerFolder:
    """What a tokenizer folder adds to its tokenizer.json: tokenizer_config.json (EOS, BOS and
    whether to add it, the chat template) and chat_template.jinja (which wins over the config's
    template, as in transformers). Empty for a lone tokenizer.json."""

    def __init__(self, folder: Path | None = None, *, eos_from_cli: bool = False) -> None:
        self.files: dict[str, bytes] = {}
        self.config: dict = {}
        self.config_origin = None
        self.eos_from_cli = eos_from_cli
        self.chat_template, self.template_origin = None, None
        self.eos_token = self.bos_token = self.add_bos_token = None
        if folder is None:
            return
        if (folder / CONFIG_FILE).is_file():
            self.config_origin = str(folder / CONFIG_FILE)
            data = (folder / CONFIG_FILE).read_bytes()
            try:
                self.config = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FP8LabError(f"{self.config_origin} is not valid JSON ({e}); fix or remove it") from None
            if not isinstance(self.config, dict):
                raise FP8LabError(f"{self.config_origin} holds a JSON {type(self.config).__name__}, expected an object")
            self.files[CONFIG_FILE] = data
            self.chat_template, self.template_origin = self._config_template(), self.config_origin
        if (folder / TEMPLATE_FILE).is_file():
            data = (folder / TEMPLATE_FILE).read_bytes()
            try:
                self.chat_template = data.decode("utf-8")
            except UnicodeDecodeError:
                raise FP8LabError(f"{folder / TEMPLATE_FILE} is not UTF-8 text; fix or remove it") from None
            self.template_origin = str(folder / TEMPLATE_FILE)
            self.files[TEMPLATE_FILE] = data
        self.eos_token = self._token("eos_token")
        self.bos_token = self._token("bos_token")
        add = self.config.get("add_bos_token")
        if add is not None and not isinstance(add, bool):
            raise FP8LabError(f"{self.config_origin}: add_bos_token is {add!r}, expected true, false or absent")
        self.add_bos_token = add

    def _token(self, key: str) -> str | None:
        """A special token named in the config: a string, or an AddedToken object {"content": ...}."""
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and (not isinstance(value, str) or not value):
            raise FP8LabError(f"{self.config_origin}: {key} is {self.config.get(key)!r}, expected a token string")
        return value

    def _config_template(self) -> str | None:
        value = self.config.get("chat_template")
        if isinstance(value, list):  # several named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
            if value is None:
                raise FP8LabError(f"{self.config_origin}: chat_template lists templates {sorted(map(str, named))} "
                                  "but none named 'default'; keep the one to use as chat_template.jinja")
        if value is not None and not isinstance(value, str):
            raise FP8LabError(f"{self.config_origin}: chat_template is {type(value).__name__}, expected a string")
        return value

    def describe(self) -> dict:
        """The manifest's record of the extra files (name and sha256 of each)."""
        out = {}
        for key, name in (("config", CONFIG_FILE), ("chat_template", TEMPLATE_FILE)):
            if name in self.files:
                out[f"{key}_file"] = name
                out[f"{key}_sha256"] = hashlib.sha256(self.files[name]).hexdigest()
        return out


def load_tokenizer(path: str | Path, *, eos_token: str | None = None) -> HFTokenizer:
    """A Hugging Face tokenizer.json from a local file or folder (no hub access); a folder's
    tokenizer_config.json and chat_template.jinja come with it (TokenizerFolder)."""
    from tokenizers import Tokenizer

    path = Path(path)
    folder = None
    if path.is_dir():
        folder = TokenizerFolder(path, eos_from_cli=eos_token is not None)
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FP8LabError(f"tokenizer file {path} not found; pass a local tokenizer.json (or 'byte')")
    data = path.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the Rust side raises plain Exception with serde's message
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FP8LabError(f"tokenizer file {path} could not be read as a Hugging Face tokenizer.json: {first}") from e
    return HFTokenizer(tok, kind="huggingface", origin=str(path), eos_token=eos_token, json_bytes=data, folder=folder)


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

