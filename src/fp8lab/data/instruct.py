"""Instruction data for fine-tuning: `fp8lab prepare --format prompt-completion | chat`.

Each JSON line is one example. prompt-completion: {"prompt": str, "completion": str} becomes
[BOS] + prompt + completion + EOS, loss on the completion and the EOS. chat: {"messages":
[{"role", "content"}, ...]} is rendered with the tokenizer's own chat template (fp8lab.data.chat)
and carries loss on the assistant turns only (plus the EOS after a conversation that ends with
one). The loss and where each example starts are stored as flags files beside the token shards
(fp8lab.data.flags); the loader turns targets without loss into IGNORE_INDEX.

Packing keeps examples whole: a window of seq_len + 1 tokens takes examples in input order
until the next one does not fit, the rest is padding (the EOS id, no loss), and that example
opens the next window. An example longer than a window is cut to its first seq_len + 1 tokens
(`overflow="truncate"`) or left out (`"drop"`); either way it is counted. The first token of an
example never carries loss: nothing of its own example comes before it.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fp8lab.data.chat import ASSISTANT, ChatTemplate
from fp8lab.data.dataset import DatasetWriter
from fp8lab.data.flags import FLAG_BITS, FLAG_DOC_START, FLAG_LOSS, FLAGS_VERSION
from fp8lab.data.pack import ShardSink, Splitter
from fp8lab.data.readers import MAX_LINE_BYTES, TextDecoder, _json_type, _line_blocks, _parse_json
from fp8lab.data.tokenizer import ByteTokenizer, load_tokenizer
from fp8lab.errors import FP8LabError

FORMATS = ("text", "prompt-completion", "chat")
OVERFLOW = ("truncate", "drop")
SPLITS = ("train", "val")
_KINDS = ("jsonl", "jsonl.gz")
_BUFFER_TOKENS = 1 << 22  # tokens of windows buffered before they go to the shard writer


def iter_records(path: Path, *, decoder: TextDecoder, max_line_bytes: int | None = None):
    """(list of (where, parsed JSON value, may hold surrogate escapes), input bytes consumed) per
    block of lines of a .jsonl / .jsonl.gz file; `where` is "FILE: line N". Blank lines are skipped."""
    limit = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    seen = 0
    try:
        raw = open(path, "rb")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.lower().endswith(".gz") else raw
        with raw, stream:
            offset, done = 0, 0
            for line_no, block in _line_blocks(stream, path=path, max_line_bytes=limit):
                text = decoder.decode(block, path=path, offset=offset, line=line_no)
                offset += len(block)
                items = []
                for i, line in enumerate(text.split("\n"), start=line_no):
                    if line.strip():
                        where = f"{path}: line {i}"
                        items.append((where, _parse_json(line, where=where), "\\ud" in line.lower()))
                seen += len(items)
                pos = raw.tell()
                yield items, pos - done
                done = pos
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise FP8LabError(f"input {path} is not a complete gzip file ({e}); re-download or re-compress it") from None
    if seen == 0:
        raise FP8LabError(f"input {path} is empty: no JSON lines in it")


def _string(obj: dict, key: str, *, where: str, what: str, hint: str) -> str:
    if key not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise FP8LabError(f"{where}: {what} has no field {key!r} (fields: {keys}); {hint}")
    value = obj[key]
    if not isinstance(value, str):
        raise FP8LabError(f"{where}: field {key!r} of {what} is {_json_type(value)}, expected a string; {hint}")
    return value


def prompt_completion(obj, *, where: str) -> tuple[str, str]:
    """The (prompt, completion) of one prompt-completion line."""
    hint = 'each line of --format prompt-completion is {"prompt": "...", "completion": "..."}'
    if not isinstance(obj, dict):
        raise FP8LabError(f"{where}: expected a JSON object, got {_json_type(obj)}; {hint}")
    return (_string(obj, "prompt", where=where, what="the line", hint=hint),
            _string(obj, "completion", where=where, what="the line", hint=hint))


def chat_messages(obj, *, where: str) -> list[dict]:
    """The messages of one chat line, each checked to have a string role and content."""
    hint = 'each line of --format chat is {"messages": [{"role": "user", "content": "..."}, ...]}'
    if not isinstance(obj, dict) or "messages" not in obj:
        got = _json_type(obj) if not isinstance(obj, dict) else f"an object with fields {', '.join(sorted(obj)[:8])}"
        raise FP8LabError(f"{where}: expected a JSON object with field 'messages', got {got}; {hint}")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else _json_type(messages)
        raise FP8LabError(f"{where}: field 'messages' is {got}, expected a non-empty array; {hint}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FP8LabError(f"{where}: messages[{i}] is {_json_type(m)}, expected an object; {hint}")
        for key in ("role", "content"):
            _string(m, key, where=where, what=f"messages[{i}]", hint=hint)
    return messages


def _clean(value, *, decoder: TextDecoder, where: str):
    """Strings with lone surrogate escapes replaced (or refused) under --encoding-errors."""
    if isinstance(value, str):
        return decoder.clean_surrogates(value, where=where)
    if isinstance(value, dict):
        return {k: _clean(v, decoder=decoder, where=where) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v, decoder=decoder, where=where) for v in value]
    return value


class Encoder:
    """JSON records -> (ids uint32, flags uint8) per example, for one tokenizer and format."""

    def __init__(self, *, fmt: str, tok, template: ChatTemplate | None, decoder: TextDecoder) -> None:
        self.fmt, self.tok, self.template, self.decoder = fmt, tok, template, decoder
        self.prefix = [tok.bos_id] if fmt == "prompt-completion" and tok.add_bos else []

    def pieces(self, where: str, obj, surrogates: bool) -> tuple[list[tuple[str, bool]], bool]:
        """(text pieces with their loss, whether the EOS after them carries loss) of one record."""
        if surrogates:
            obj = _clean(obj, decoder=self.decoder, where=where)
        if self.fmt == "prompt-completion":
            prompt, completion = prompt_completion(obj, where=where)
            return [(prompt, False), (completion, True)], True
        messages = chat_messages(obj, where=where)
        return self.template.segments(messages, where=where), messages[-1]["role"] == ASSISTANT

    def encode(self, items: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """The examples of `items` (as iter_records gives them), tokenized in one batch call."""
        parsed = [self.pieces(*item) for item in items]
        texts = [text for pieces, _ in parsed for text, _ in pieces]
        encoded = iter(self.tok.encode_plain(texts))
        eos, out = self.tok.eos_id, []
        for pieces, eos_loss in parsed:
            ids, loss = list(self.prefix), [False] * len(self.prefix)
            for _, piece_loss in pieces:
                part = next(encoded)
                ids += part
                loss += [piece_loss] * len(part)
            # A chat template may end the conversation with the EOS itself; one is enough.
            if self.fmt == "prompt-completion" or not ids or ids[-1] != eos:
                ids.append(eos)
                loss.append(eos_loss)
            flags = np.asarray(loss, dtype=np.uint8) * np.uint8(FLAG_LOSS)
            flags[0] = FLAG_DOC_START  # never loss: nothing of this example precedes its first token
            out.append((np.asarray(ids, dtype=np.uint32), flags))
        return out


class ExamplePacker:
    """Whole examples of one split into windows of `window` tokens (see the module docstring)."""

    def __init__(self, *, sink: ShardSink, window: int, overflow: str, fill_id: int, pack: bool) -> None:
        self.sink, self.window, self.overflow, self.fill_id, self.pack = sink, window, overflow, fill_id, pack
        self._rows = max(1, min(1024, _BUFFER_TOKENS // window))
        self._tokens = np.full((self._rows, window), fill_id, dtype=np.uint32)
        self._flags = np.zeros((self._rows, window), dtype=np.uint8)
        self._row, self._pos = 0, 0
        self.stats = dict.fromkeys(("documents", "tokens", "loss_tokens", "pad_targets", "dropped_tokens",
                                    "truncated_examples", "truncated_tokens", "dropped_examples",
                                    "no_loss_examples"), 0)

    def add(self, ids: np.ndarray, flags: np.ndarray) -> None:
        """Place one example (its ids and flags), or count why it is left out."""
        s, n = self.stats, len(ids)
        if not (flags & FLAG_LOSS).any():
            s["no_loss_examples"] += 1
            s["dropped_tokens"] += n
            return
        if n > self.window:
            kept = flags[: self.window]
            if self.overflow == "drop" or not (kept & FLAG_LOSS).any():  # nothing left to learn from: dropped
                s["dropped_examples"] += 1
                s["dropped_tokens"] += n
                return
            s["truncated_examples"] += 1
            s["truncated_tokens"] += n - self.window
            s["dropped_tokens"] += n - self.window
            ids, flags, n = ids[: self.window], kept, self.window
        if self._pos and (self._pos + n > self.window or not self.pack):
            self._next_row()
        self._tokens[self._row, self._pos : self._pos + n] = ids
        self._flags[self._row, self._pos : self._pos + n] = flags
        self._pos += n
        s["documents"] += 1
        s["tokens"] += n
        s["loss_tokens"] += int(np.count_nonzero(flags & FLAG_LOSS))

    def _next_row(self) -> None:
        # Every window holds at least one token, so the padding is all targets: window - filled of them.
        self.stats["pad_targets"] += self.window - self._pos
        self._row, self._pos = self._row + 1, 0
        if self._row == self._rows:
            self._flush()

    def _flush(self) -> None:
        if self._row:
            self.sink.add(self._tokens[: self._row], self._flags[: self._row])
        self._tokens.fill(self.fill_id)
        self._flags.fill(0)
        self._row = 0

    def finish(self) -> None:
        """End of input: the last window is padded and written, and its shard closed."""
        if self._pos:
            self._next_row()
        self._flush()
        self.sink.close()


def _tokenizer(opts: dict):
    if opts["train_tokenizer"]:
        raise FP8LabError(f"--train-tokenizer is for --format text; --format {opts['format']} needs the tokenizer of "
                          "the model to fine-tune: pass --tokenizer FOLDER (tokenizer.json, tokenizer_config.json)")
    for key, flag in (("vocab_size", "--vocab-size"), ("eos_id", "--eos-id")):
        if opts[key] is not None:
            raise FP8LabError(f"{flag} does not apply to --format {opts['format']} (the tokenizer fixes it)")
    if opts["tokenizer"] in (None, "byte"):
        tok = ByteTokenizer()
    else:
        tok = load_tokenizer(opts["tokenizer"], eos_token=opts["eos_token"])
    template = None
    if opts["format"] == "chat":
        if tok.chat_template is None:
            where = "the byte tokenizer" if isinstance(tok, ByteTokenizer) else f"tokenizer {opts['tokenizer']}"
            raise FP8LabError(f"--format chat renders conversations with the tokenizer's chat template and {where} has "
                              "none (no chat_template in tokenizer_config.json, no chat_template.jinja); pass "
                              "--tokenizer FOLDER of a chat model, or use --format prompt-completion")
        bos = tok.folder.bos_token
        template = ChatTemplate(tok.chat_template, origin=tok.template_origin, bos_token=bos,
                                eos_token=tok.folder.eos_token or tok.eos_token)
    return tok, template


def prepare_instruct(*, files, sources, out, opts, decoder, progress, total_bytes, seq_len: int):
    """prepare_dataset for --format prompt-completion / chat; returns (stats, writer, notes).

    Everything that can be refused before writing (input kinds, tokenizer, chat template) is.
    """
    fmt = opts["format"]
    for path, source in zip(files, sources, strict=True):
        if source["kind"] not in _KINDS:
            raise FP8LabError(f"--format {fmt} reads JSON lines (.jsonl, .jsonl.gz), one example per line; input "
                              f"{path} is a .{source['kind']} file: convert it, or prepare it with --format text")
    tok, template = _tokenizer(opts)
    encoder = Encoder(fmt=fmt, tok=tok, template=template, decoder=decoder)
    window = seq_len + 1
    with DatasetWriter(out, seq_len=seq_len, vocab_size=tok.vocab_size, eos_id=tok.eos_id) as writer:
        writer.add_files(tok.files())
        rows = max(1, opts["shard_tokens"] // window)
        packers = {n: ExamplePacker(sink=ShardSink(writer=writer, split=n, rows_per_shard=rows, flags=True),
                                    window=window, overflow=opts["overflow"], fill_id=tok.eos_id, pack=opts["pack"])
                   for n in SPLITS}
        splitter = Splitter(val_fraction=opts["val_fraction"])
        progress.phase("tokenizing", total_bytes=total_bytes)
        for path, source in zip(files, sources, strict=True):
            count = 0
            for items, nbytes in iter_records(path, decoder=decoder, max_line_bytes=opts["max_line_bytes"]):
                # Routed before tokenizing: an example's split does not depend on the tokenizer or seq_len.
                is_val = splitter.route(len(items)).tolist()
                examples = encoder.encode(items)
                for (ids, flags), val in zip(examples, is_val, strict=True):
                    packers["val" if val else "train"].add(ids, flags)
                count += len(items)
                progress.advance(nbytes=nbytes, tokens=sum(len(ids) for ids, _ in examples))
            source.update(examples=count)
        stats = _finish(writer, packers, opts=opts, what=f"--format {fmt} input")
        extra = {
            "prepare": {"format": fmt, "pack": opts["pack"], "split_level": "example", "overflow": opts["overflow"],
                        "val_fraction": opts["val_fraction"], "encoding_errors": opts["encoding_errors"],
                        "shard_tokens": opts["shard_tokens"]},
            "instruct": {"format": fmt, "loss_on": "completion" if fmt == "prompt-completion" else "assistant",
                         "add_bos": bool(encoder.prefix), "fill_id": tok.eos_id,
                         "flags": {"version": FLAGS_VERSION, "bits": FLAG_BITS}},
            "stats": stats,
        }
        writer.finish(tokenizer=tok.describe(), sources=sources, extra=extra)
    return stats, writer, _notes(stats, decoder=decoder, seq_len=seq_len, overflow=opts["overflow"])


def _finish(writer: DatasetWriter, packers: dict, *, opts: dict, what: str) -> dict:
    stats = {}
    for name in SPLITS:
        p = packers[name]
        p.finish()
        slots = p.sink.sequences * writer.seq_len
        stats[name] = {**p.stats, "sequences": p.sink.sequences,
                       "padding_fraction": round(p.stats["pad_targets"] / slots, 6) if slots else 0.0}
    t, v = stats["train"], stats["val"]
    if t["sequences"] == 0:
        raise FP8LabError(f"{what} gives no training example with loss tokens ({t['no_loss_examples']} without "
                          f"any, {t['dropped_examples']} too long for --seq-len {writer.seq_len}); check the input, "
                          "or raise --seq-len")
    if opts["val_fraction"] > 0 and v["sequences"] == 0:
        raise FP8LabError(f"{what} gives no validation example at --val-fraction={opts['val_fraction']} "
                          f"({t['documents'] + v['documents']} examples kept); raise it, give more examples, or pass 0")
    return stats


def _notes(stats: dict, *, decoder: TextDecoder, seq_len: int, overflow: str) -> list[str]:
    both = {k: stats["train"][k] + stats["val"][k] for k in stats["train"]}
    notes = []
    if both["no_loss_examples"]:
        notes.append(f"dropped {both['no_loss_examples']} example(s) with no loss token (a conversation without an "
                     "assistant message)")
    if both["truncated_examples"]:
        notes.append(f"truncated {both['truncated_examples']} example(s) longer than seq_len + 1 = {seq_len + 1} "
                     f"tokens ({both['truncated_tokens']} tokens cut); --overflow drop leaves them out instead")
    if both["dropped_examples"]:
        why = "--overflow drop" if overflow == "drop" else "no loss token within the first seq_len + 1"
        notes.append(f"dropped {both['dropped_examples']} example(s) longer than {seq_len + 1} tokens ({why})")
    if decoder.replaced:
        notes.append(f"replaced {decoder.replaced} invalid UTF-8 sequence(s) with U+FFFD (--encoding-errors=error "
                     "refuses them instead)")
    return notes
