"""Tokenizer files for Hugging Face folders.

fp8lab's byte-level tokenizer (UTF-8 bytes as ids 0..255, EOS 256) has no file of its own. For
an export it is written as a `tokenizers` BPE whose vocabulary is the 256 byte symbols of GPT-2's
byte-level alphabet with no merges: the ByteLevel pre-tokenizer maps each byte to its symbol and
BPE, having nothing to merge, emits one id per byte, the byte's value. `AutoTokenizer` then
encodes text to the ids fp8lab trained on (and decodes them back).
"""

from __future__ import annotations

import json
from pathlib import Path

from fp8lab.data.corpus import BYTE_EOS_ID
from fp8lab.errors import FP8LabError

BYTE_EOS_TOKEN = "<|endoftext|>"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"  # transformers 5 keeps the chat template beside tokenizer_config.json


def byte_symbols() -> list[str]:
    """The printable symbol GPT-2's byte-level alphabet gives each byte 0..255: printable Latin-1
    bytes stand for themselves, the others take the code points from 256 up, in byte order."""
    own = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 256
    for b in range(256):
        if b in own:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer():
    """The byte-level tokenizer as a `tokenizers.Tokenizer` (ids = byte values, EOS = 256)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {sym: b for b, sym in enumerate(byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the text's bytes, all of them, in order.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS_TOKEN, special=True, normalized=False)])
    if tok.token_to_id(BYTE_EOS_TOKEN) != BYTE_EOS_ID:  # the vocabulary above fixes it; a guard, not a branch
        raise AssertionError("byte tokenizer EOS id")
    return tok


def byte_tokenizer_json() -> bytes:
    """tokenizer.json of the byte-level tokenizer (the same bytes every time)."""
    return byte_tokenizer().to_str(pretty=True).encode("utf-8")


def is_byte_tokenizer(path: Path) -> bool:
    """Whether the tokenizer.json at `path` encodes like fp8lab's byte-level tokenizer: the same
    vocabulary (256 byte symbols and the EOS) and one id per byte on a probe text."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - the Rust side raises plain Exception; not a byte tokenizer then
        return False
    if tok.get_vocab(with_added_tokens=True) != byte_tokenizer().get_vocab(with_added_tokens=True):
        return False
    probe = "fp8lab byte probe: ascii, ümlaut, 日本語, emoji \U0001F600, tab\t, newline\n"
    return tok.encode(probe, add_special_tokens=False).ids == list(probe.encode("utf-8"))


def tokenizer_config(*, eos_token: str | None, bos_token: str | None = None, pad_token: str | None = None,
                     model_max_length: int) -> dict:
    """A tokenizer_config.json for a bare tokenizer.json: PreTrainedTokenizerFast (transformers 4
    and 5 load it) with the special tokens named, adding no BOS/EOS of its own (fp8lab's data has
    none but the EOS after each document)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
    }


def token_id(tokenizer_json: bytes, token: str | None) -> int | None:
    """The id of `token` (a special token's text) in a tokenizer.json's vocabulary, or None."""
    if token is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json.decode("utf-8")).token_to_id(token)


def special_token(config: dict, key: str) -> str | None:
    """tokenizer_config.json's `key` ("bos_token", ...): a string, or the content of the token
    object older files store (an AddedToken serialized as a dict)."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_data_tokenizer(folder: Path, dataset) -> None:
    """Refuse data tokenized otherwise than the Hugging Face model in `folder` expects: data with
    a tokenizer file needs FOLDER/tokenizer.json, byte for byte; byte-level data needs a folder
    whose tokenizer.json is fp8lab's byte tokenizer (an fp8lab export). Pre-tokenized data
    carries no tokenizer to compare: only its vocabulary is checked (by the caller)."""
    from fp8lab.data.shards import sha256_file

    folder = Path(folder)
    theirs = folder / TOKENIZER_JSON
    fix = f"prepare the data with the model's tokenizer: fp8lab prepare --tokenizer {folder} ..."
    ours = dataset.tokenizer_file
    if ours is not None:
        if not theirs.is_file():
            raise FP8LabError(f"the data at {dataset.path} was tokenized with its {ours.name}, and {folder} has no "
                              f"{TOKENIZER_JSON} to check it against; add the model's tokenizer there, then {fix}")
        if sha256_file(ours) != sha256_file(theirs):
            raise FP8LabError(f"the data at {dataset.path} was tokenized with another tokenizer than {theirs}; {fix}")
    elif dataset.tokenizer.get("type") == "byte" and not (theirs.is_file() and is_byte_tokenizer(theirs)):
        raise FP8LabError(f"the data at {dataset.path} is byte-level, the model at {folder} has "
                          f"{'its own tokenizer' if theirs.is_file() else 'no fp8lab byte tokenizer'}; {fix}")


SPECIAL_IDS = "special_ids.json"  # fp8lab's own record in a run's tokenizer folder, not exported as a file


def run_tokenizer_files(*, dataset, hf_dir: Path | None, max_len: int) -> dict[str, bytes]:
    """What a run keeps of its tokenizer for `fp8lab export` ({file name: bytes}): tokenizer.json
    and tokenizer_config.json when there is a tokenizer (the Hugging Face model's own with
    model.init_from; the data's; or fp8lab's byte tokenizer written as files), and SPECIAL_IDS:
    the bos/eos/pad ids (and generation config) config.json and generation_config.json get."""
    files: dict[str, bytes] = {}
    ids = {"bos_token_id": None, "eos_token_id": dataset.eos_id, "pad_token_id": None, "generation_config": None}
    if hf_dir is not None:
        hf_dir = Path(hf_dir)
        config = read_json(hf_dir / "config.json", what="model config")
        ids.update({k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        if (hf_dir / "generation_config.json").is_file():
            ids["generation_config"] = read_json(hf_dir / "generation_config.json", what="generation config")
        for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE):
            if (hf_dir / name).is_file():
                files[name] = (hf_dir / name).read_bytes()
    elif dataset.tokenizer_file is not None:
        files[TOKENIZER_JSON] = dataset.tokenizer_file.read_bytes()
        # Data prepared from a Hugging Face tokenizer folder keeps its config and chat template.
        for name, own in ((TOKENIZER_CONFIG, dataset.tokenizer_config_file), (CHAT_TEMPLATE, dataset.chat_template_file)):
            if own is not None:
                files[name] = own.read_bytes()
    elif dataset.tokenizer.get("type") == "byte":
        files[TOKENIZER_JSON] = byte_tokenizer_json()
        files[TOKENIZER_CONFIG] = _json_bytes(tokenizer_config(eos_token=BYTE_EOS_TOKEN, model_max_length=max_len))
    if TOKENIZER_JSON in files and TOKENIZER_CONFIG not in files:  # a bare tokenizer.json: name its EOS
        eos = dataset.tokenizer.get("eos_token")
        files[TOKENIZER_CONFIG] = _json_bytes(tokenizer_config(eos_token=eos, model_max_length=max_len))
    if hf_dir is None and TOKENIZER_JSON in files:
        tok_cfg = json.loads(files[TOKENIZER_CONFIG])
        ids["bos_token_id"] = token_id(files[TOKENIZER_JSON], special_token(tok_cfg, "bos_token"))
        ids["pad_token_id"] = token_id(files[TOKENIZER_JSON], special_token(tok_cfg, "pad_token"))
    files[SPECIAL_IDS] = _json_bytes(ids)
    return files


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def read_json(path: Path, *, what: str) -> dict:
    """A JSON object from `path`, or a one-line FP8LabError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FP8LabError(f"{what} {path} is unreadable: {e}") from None
    if not isinstance(value, dict):
        raise FP8LabError(f"{what} {path} holds a {type(value).__name__}, not a JSON object")
    return value
