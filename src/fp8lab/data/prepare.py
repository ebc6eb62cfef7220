"""`fp8lab prepare` as a library call: input files -> tokenizer -> split -> windows -> shards.

The output is built in a temporary directory, OUT.tmp-PID, and renamed when complete
(DatasetWriter), so any error, Ctrl-C or SIGTERM leaves no directory that looks like data, and
removes the temporary one. A SIGTERM becomes the exception `Terminated` for the duration of
`prepare_dataset` (when called from the main thread and SIGTERM has its default action), so
the same cleanup runs; the CLI then exits with 143 (128 + SIGTERM), as the default action
would (Ctrl-C: KeyboardInterrupt, exit 130).
kill -9 cannot be caught: the next run on the same output removes the temporary directories of
writers that no longer run, and says so in the report's notes.

Two runs on one output cannot race: a run holds the lock OUT.lock (fp8lab.lock.DirLock) from
before it looks at the output until it has renamed it into place; a second run fails at once,
naming the PID that holds it.

The manifest records the options, the tokenizer, every source file's sha256 and the
statistics, but no time or host, so the same inputs and options give the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fp8lab.data.arrays import iter_documents, iter_rows, open_npy
from fp8lab.data.dataset import DatasetWriter, check_out_dir, make_parent
from fp8lab.data.instruct import FORMATS, OVERFLOW, prepare_instruct
from fp8lab.data.pack import Packer, ShardSink, Splitter, row_is_val
from fp8lab.data.readers import (
    FileStats,
    TextDecoder,
    expand_inputs,
    input_kind,
    parse_exts,
    read_json,
    read_jsonl,
    read_parquet,
    read_txt,
)
from fp8lab.data.shards import sha256_file
from fp8lab.data.tempdirs import remove_stale_temps
from fp8lab.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import NO_SPACE, os_error
from fp8lab.lock import DirLock

DEFAULT_SEQ_LEN = 512
# 1G tokens (2 GB of uint16) per shard: our user's 850M-token set is one file per split, and the
# loader gathers a batch from one memmap with one numpy call (each extra shard costs a call).
DEFAULT_SHARD_TOKENS = 1_000_000_000
SPLITS = ("train", "val")
SIGTERM_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived during prepare_dataset. A BaseException like KeyboardInterrupt, so no
    `except Exception` on the way up swallows it before the temporary output is removed."""


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, the first SIGTERM raises Terminated in the main thread.

    Does nothing outside the main thread (Python runs handlers there only) or when the program
    already handles or ignores SIGTERM: its choice stands. Later SIGTERMs are ignored until the
    block ends, so they cannot cut the cleanup short.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    fired = False

    def on_sigterm(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def output_lock(out: Path) -> DirLock:
    """The lock that one `prepare` run on `out` holds: OUT.lock beside the output directory (the
    directory itself must stay empty until it is renamed into place)."""
    return DirLock(out.parent / f"{out.name}.lock", what=f"output {out}")


class Progress:
    """What prepare reports while it runs; the CLI draws a bar from it. The default does nothing."""

    def phase(self, name: str, *, total_bytes: int) -> None:
        """A new pass over the input begins (tokenizer training, then tokenizing)."""

    def advance(self, *, nbytes: int, tokens: int) -> None:
        """`nbytes` more input bytes were read and `tokens` more tokens produced."""


@dataclass
class PrepareReport:
    """What `prepare_dataset` did; `seconds` is not in the manifest (it would break reproducibility)."""

    path: Path
    seq_len: int
    vocab_size: int
    stats: dict
    seconds: float
    input_bytes: int
    replaced: int
    notes: list[str] = field(default_factory=list)


def _positive(name: str, value: object, *, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise FP8LabError(f"{name} must be an integer >= {0 if zero else 1}, got {value!r}")


def _text_docs(path: Path, kind: str, *, decoder: TextDecoder, stats: FileStats, opts: dict):
    if kind in ("txt", "text"):
        return read_txt(path, decoder=decoder, stats=stats, allow_empty=kind == "text")
    if kind == "parquet":
        return read_parquet(path, column=opts["text_column"], decoder=decoder, stats=stats)
    if kind == "json":
        return read_json(path, field_name=opts["text_field"], decoder=decoder, stats=stats)
    return read_jsonl(path, field_name=opts["text_field"], decoder=decoder, stats=stats,
                      max_line_bytes=opts["max_line_bytes"])


def prepare_dataset(
    *,
    inputs: list[str],
    out: str | Path,
    tokenizer: str = "byte",
    train_tokenizer: bool = False,
    vocab_size: int | None = None,
    eos_token: str | None = None,
    eos_id: int | None = None,
    text_field: str = "text",
    text_column: str = "text",
    seq_len: int | None = None,
    pack: bool = True,
    val_fraction: float = 0.01,
    encoding_errors: str = "replace",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: Progress | None = None,
    ext: str | list[str] | None = None,
    max_line_bytes: int | None = None,
    format: str = "text",
    overflow: str = "truncate",
) -> PrepareReport:
    """Tokenize (or take pre-tokenized) `inputs` into a verified data directory at `out`.

    Text (.txt: one document per file; .jsonl/.jsonl.gz: `text_field` per line; .json: an
    array of objects with `text_field`, or of strings; .parquet: `text_column` per row; files
    ending in an `ext` extension such as ".py,.md": plain text, one document per file) goes
    through `tokenizer` ("byte", or a local tokenizer.json), or a BPE of `vocab_size` trained on
    the input when `train_tokenizer`. `.npy` inputs are token ids (`vocab_size` or a tokenizer
    file gives the vocabulary): 1-D streams are split into documents at `eos_id`; 2-D (N, L)
    arrays keep their rows (seq_len = L - 1, row-level split). A JSON line longer than
    `max_line_bytes` (default readers.MAX_LINE_BYTES, 64 MiB) is an error. `format`
    "prompt-completion" or "chat" reads instruction data instead (fp8lab.data.instruct), with
    `overflow` ("truncate" or "drop") for examples longer than a window.

    Raises FP8LabError for bad input or an unwritable output (also when another run holds
    OUT.lock), Terminated on SIGTERM (see the module docstring); nothing is left at `out` then.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    out = Path(out)
    check_out_dir(out)  # before any work: an existing dataset is never touched
    if seq_len is not None:
        _positive("--seq-len", seq_len)
    _positive("--shard-tokens", shard_tokens)
    if max_line_bytes is not None:
        _positive("--max-line-bytes", max_line_bytes)
    for name, value, allowed in (("--format", format, FORMATS), ("--overflow", overflow, OVERFLOW)):
        if value not in allowed:
            raise FP8LabError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise FP8LabError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    decoder = TextDecoder(encoding_errors)
    text_exts = parse_exts(ext)
    files = expand_inputs(inputs, text_exts)
    kinds = {input_kind(p, text_exts) for p in files}
    if "npy" in kinds and kinds != {"npy"}:
        raise FP8LabError(
            "cannot mix pre-tokenized .npy inputs with text inputs "
            f"({', '.join(str(p) for p in files if input_kind(p) != 'npy')[:200]}); prepare them separately"
        )
    opts = dict(tokenizer=tokenizer, train_tokenizer=train_tokenizer, vocab_size=vocab_size, eos_token=eos_token,
                eos_id=eos_id, text_field=text_field, text_column=text_column, seq_len=seq_len, pack=pack,
                val_fraction=float(val_fraction), shard_tokens=shard_tokens, encoding_errors=encoding_errors,
                max_line_bytes=max_line_bytes, format=format, overflow=overflow)
    make_parent(out)
    try:
        with sigterm_raises(), output_lock(out):
            check_out_dir(out)  # the run that held the lock before us may have written it
            notes = _remove_stale(out)
            stats, writer, run_notes, total_bytes = _run(files=files, kinds=kinds, text_exts=text_exts, out=out,
                                                         decoder=decoder, progress=progress, opts=opts)
    except OSError as e:
        raise _os_error(e, out) from e
    return PrepareReport(
        path=out,
        seq_len=writer.seq_len,
        vocab_size=writer.vocab_size,
        stats=stats,
        seconds=time.perf_counter() - started,
        input_bytes=total_bytes,
        replaced=decoder.replaced,
        notes=notes + run_notes,
    )


def _remove_stale(out: Path) -> list[str]:
    removed = remove_stale_temps(out)
    if not removed:
        return []
    names = ", ".join(p.name for p in removed)
    return [f"removed {names} beside {out}: temporary output of a prepare run that no longer runs (killed)"]


def _os_error(e: OSError, out: Path) -> FP8LabError:
    """An OSError no write site turned into a message (a read of an input, for instance)."""
    if e.errno in NO_SPACE:
        return os_error(e, path=e.filename or out)
    return FP8LabError(f"{e.filename or out}: {e.strerror or e} (while preparing {out})")


def _run(*, files, kinds, text_exts, out, decoder, progress, opts):
    sources = [
        {"path": str(p), "kind": input_kind(p, text_exts), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
    ]
    total_bytes = sum(s["bytes"] for s in sources)
    run = _prepare_arrays if kinds == {"npy"} else _prepare_text
    if opts["format"] != "text":
        run = functools.partial(prepare_instruct, seq_len=opts["seq_len"] or DEFAULT_SEQ_LEN)
    stats, writer, notes = run(files=files, sources=sources, out=out, opts=opts, decoder=decoder, progress=progress,
                               total_bytes=total_bytes)
    return stats, writer, notes, total_bytes


def _describe(files: list[Path]) -> str:
    names = ", ".join(str(p) for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"input {names}"


def _finish(writer: DatasetWriter, *, packers: dict, sinks: dict, val_fraction: float, what: str) -> dict:
    for p in packers.values():
        p.finish()
    for s in sinks.values():
        s.close()
    stats = {}
    for name in SPLITS:
        p, sink = packers.get(name), sinks[name]
        slots = sink.sequences * writer.seq_len
        stats[name] = {
            "documents": p.documents if p else sink.sequences,
            "tokens": p.tokens if p else sink.sequences * (writer.seq_len + 1),
            "sequences": sink.sequences,
            "pad_targets": p.pad_targets if p else 0,
            "padding_fraction": round((p.pad_targets if p else 0) / slots, 6) if slots else 0.0,
            "dropped_tokens": p.dropped if p else 0,
        }
    if stats["train"]["sequences"] == 0:
        raise FP8LabError(
            f"{what} gives no training sequence of seq_len + 1 = {writer.seq_len + 1} tokens "
            f"({stats['train']['tokens'] + stats['train']['dropped_tokens']} tokens in all); "
            "give more input or lower --seq-len"
        )
    if val_fraction > 0 and stats["val"]["sequences"] == 0:
        raise FP8LabError(
            f"{what} gives no validation sequence at --val-fraction={val_fraction} "
            f"({stats['train']['documents'] + stats['val']['documents']} documents, "
            f"{stats['val']['documents']} to val with {stats['val']['dropped_tokens']} tokens, "
            f"short of one window of {writer.seq_len + 1}); "
            "raise it, give more documents, or pass 0"
        )
    return stats


def _prepare_text(*, files, sources, out, opts, decoder, progress, total_bytes):
    if opts["train_tokenizer"]:
        if opts["tokenizer"] not in (None, "byte"):
            raise FP8LabError("--train-tokenizer trains a new tokenizer; do not also pass --tokenizer")
        if opts["vocab_size"] is None:
            raise FP8LabError("--train-tokenizer needs --vocab-size N (the size of the BPE vocabulary to learn)")
        progress.phase("training tokenizer", total_bytes=total_bytes)
        tok = train_bpe(texts=_training_texts(files, sources, opts, progress), vocab_size=opts["vocab_size"])
    elif opts["vocab_size"] is not None:
        raise FP8LabError("--vocab-size applies to --train-tokenizer or .npy inputs; a tokenizer file fixes its own")
    elif opts["tokenizer"] in (None, "byte"):
        tok = ByteTokenizer()
    else:
        tok = load_tokenizer(opts["tokenizer"], eos_token=opts["eos_token"])
    if opts["eos_id"] is not None:
        raise FP8LabError("--eos-id is for .npy token streams; for text the tokenizer's EOS is used (--eos-token)")
    seq_len = opts["seq_len"] or DEFAULT_SEQ_LEN
    vocab, pad_id = tok.vocab_size, None
    if not opts["pack"]:
        pad_id = tok.pad_id if tok.pad_id is not None else vocab
        vocab = max(vocab, pad_id + 1)  # a pad id of our own extends the vocabulary by one
    tok_record = {**tok.describe(), **({"pad_id": pad_id} if pad_id is not None else {})}
    window = seq_len + 1
    with DatasetWriter(out, seq_len=seq_len, vocab_size=vocab, eos_id=tok.eos_id, pad_id=pad_id) as writer:
        writer.add_files(tok.files())  # none for byte
        rows = max(1, opts["shard_tokens"] // window)
        sinks = {n: ShardSink(writer=writer, split=n, rows_per_shard=rows) for n in SPLITS}
        packers = {n: Packer(sink=sinks[n], window=window, pad_id=pad_id) for n in SPLITS}
        splitter = Splitter(val_fraction=opts["val_fraction"])
        progress.phase("tokenizing", total_bytes=total_bytes)
        open_in = None  # the split holding a document still open across batches
        skipped: list[Path] = []
        for path, source in zip(files, sources, strict=True):
            fstats = FileStats()
            before = decoder.replaced
            for batch in _text_docs(path, source["kind"], decoder=decoder, stats=fstats, opts=opts):
                if not batch.texts:
                    progress.advance(nbytes=batch.nbytes, tokens=0)
                    continue
                is_val = splitter.route(len(batch.texts) - int(batch.first_continues))
                if batch.first_continues:  # a document already routed when it began
                    is_val = np.concatenate([[open_in == "val"], is_val])
                flat, lengths = tok.encode(batch.texts)
                if batch.last_open:  # the document goes on in the next batch: no EOS yet
                    flat, lengths[-1] = flat[:-1], lengths[-1] - 1
                _route(packers, flat, lengths, is_val, batch.first_continues, batch.last_open)
                open_in = ("val" if is_val[-1] else "train") if batch.last_open else None
                progress.advance(nbytes=batch.nbytes, tokens=int(lengths.sum()))
            if fstats.documents == 0 and source["kind"] == "text":
                skipped.append(path)  # an empty __init__.py in a source tree is normal, not a mistake
            elif fstats.documents == 0:
                raise FP8LabError(f"input {path} holds no text: all its {fstats.empty} documents are empty")
            source.update(documents=fstats.documents, empty_documents=fstats.empty,
                          replaced_invalid_utf8=decoder.replaced - before)
        stats = _finish(writer, packers=packers, sinks=sinks, val_fraction=opts["val_fraction"], what=_describe(files))
        stats["replaced_invalid_utf8"] = decoder.replaced
        extra = {
            "prepare": {
                "pack": opts["pack"],
                "split_level": "document",
                "val_fraction": opts["val_fraction"],
                "encoding_errors": opts["encoding_errors"],
                "text_field": opts["text_field"],
                "text_column": opts["text_column"],
                "shard_tokens": opts["shard_tokens"],
            },
            "stats": stats,
        }
        writer.finish(tokenizer=tok_record, sources=sources, extra=extra)
    notes = []
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        notes.append(f"skipped {len(skipped)} empty file(s): {', '.join(map(str, skipped[:3]))}{more}")
    if decoder.replaced:
        notes.append(f"replaced {decoder.replaced} invalid UTF-8 sequence(s) with U+FFFD (--encoding-errors=error "
                     "refuses them instead)")
    return stats, writer, notes


def _route(packers: dict, flat, lengths, is_val, first_continues: bool, last_open: bool) -> None:
    """Hand each split its documents, keeping continuation flags only where the open document went."""
    n = len(lengths)
    ends = np.cumsum(lengths)
    for name, mask in (("val", is_val), ("train", ~is_val)):
        if not mask.any():
            continue
        if mask.all():
            sub_flat, sub_len = flat, lengths
        else:
            # Copy runs of consecutive documents: val documents are few, so the runs are long.
            edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
            first, stop = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            starts = (ends - lengths)[first].tolist()
            sub_flat = np.concatenate([flat[a:b] for a, b in zip(starts, ends[stop - 1].tolist(), strict=True)])
            sub_len = lengths[mask]
        packers[name].add(sub_flat, sub_len, first_continues=first_continues and bool(mask[0]),
                          last_open=last_open and bool(mask[n - 1]))


def _training_texts(files, sources, opts, progress):
    """Every document once, for BPE training (its own decoder: replacements are counted on the real pass)."""
    decoder = TextDecoder(opts["encoding_errors"])
    for path, source in zip(files, sources, strict=True):
        for batch in _text_docs(path, source["kind"], decoder=decoder, stats=FileStats(), opts=opts):
            progress.advance(nbytes=batch.nbytes, tokens=0)
            yield from batch.texts


def _prepare_arrays(*, files, sources, out, opts, decoder, progress, total_bytes):
    if opts["train_tokenizer"]:
        raise FP8LabError("--train-tokenizer does not apply to pre-tokenized .npy inputs (they are tokenized already)")
    tok = None
    if opts["tokenizer"] not in (None, "byte"):
        tok = load_tokenizer(opts["tokenizer"], eos_token=opts["eos_token"])
    vocab = opts["vocab_size"] if opts["vocab_size"] is not None else (tok.vocab_size if tok else None)
    if vocab is None:
        raise FP8LabError(".npy inputs need --vocab-size N (or --tokenizer FILE): the file does not say the vocabulary")
    _positive("--vocab-size", vocab)
    if tok is not None and vocab < tok.vocab_size:
        raise FP8LabError(f"--vocab-size {vocab} is smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    eos = opts["eos_id"] if opts["eos_id"] is not None else (tok.eos_id if tok else None)
    if eos is not None and not (isinstance(eos, int) and 0 <= eos < vocab):
        raise FP8LabError(f"--eos-id must be an integer in [0, {vocab}), got {eos!r}")
    arrays = [open_npy(p) for p in files]
    ndims = {a.ndim for a in arrays}
    if len(ndims) > 1:
        raise FP8LabError("cannot mix 1-D token streams and 2-D sequence arrays; prepare them separately")
    tok_record = tok.describe() if tok else {"type": "pretokenized", "vocab_size": vocab, "eos_id": eos}
    if 2 in ndims:
        return _prepare_rows(files=files, arrays=arrays, sources=sources, out=out, opts=opts, vocab=vocab, eos=eos,
                             tok=tok, tok_record=tok_record, progress=progress)
    if eos is None:
        raise FP8LabError(
            f"{files[0]} is a 1-D token stream; pass --eos-id N, the id that ends each document in it "
            "(documents are split there for the train/val split and packing)"
        )
    seq_len = opts["seq_len"] or DEFAULT_SEQ_LEN
    window = seq_len + 1
    pad_id = None if opts["pack"] else vocab
    file_vocab = vocab + (0 if opts["pack"] else 1)
    with DatasetWriter(out, seq_len=seq_len, vocab_size=file_vocab, eos_id=eos, pad_id=pad_id) as writer:
        if tok is not None:
            writer.add_files(tok.files())
        rows = max(1, opts["shard_tokens"] // window)
        sinks = {n: ShardSink(writer=writer, split=n, rows_per_shard=rows) for n in SPLITS}
        packers = {n: Packer(sink=sinks[n], window=window, pad_id=pad_id) for n in SPLITS}
        splitter = Splitter(val_fraction=opts["val_fraction"])
        progress.phase("packing", total_bytes=total_bytes)
        open_val = False
        for path, arr, source in zip(files, arrays, sources, strict=True):
            docs = 0
            for flat, lengths, first_continues, last_open in iter_documents(path, arr, vocab_size=vocab, eos_id=eos):
                is_val = splitter.route(len(lengths) - int(first_continues))
                if first_continues:  # a document already routed when it began
                    is_val = np.concatenate([[open_val], is_val])
                _route(packers, flat, lengths, is_val, first_continues, last_open)
                open_val = bool(is_val[-1]) and last_open
                docs += len(lengths) - int(first_continues)
                progress.advance(nbytes=int(flat.size) * arr.itemsize, tokens=int(flat.size))
            source.update(documents=docs, tokens=int(arr.shape[0]))
        stats = _finish(writer, packers=packers, sinks=sinks, val_fraction=opts["val_fraction"], what=_describe(files))
        extra = {"prepare": {"pack": opts["pack"], "split_level": "document", "val_fraction": opts["val_fraction"],
                             "shard_tokens": opts["shard_tokens"]}, "stats": stats}
        writer.finish(tokenizer=tok_record, sources=sources, extra=extra)
    return stats, writer, []


def _prepare_rows(*, files, arrays, sources, out, opts, vocab, eos, tok, tok_record, progress):
    widths = {a.shape[1] for a in arrays}
    if len(widths) > 1:
        raise FP8LabError(f"2-D inputs have rows of different lengths {sorted(widths)}: "
                          + ", ".join(f"{p} {a.shape}" for p, a in zip(files, arrays, strict=True))[:300])
    (width,) = widths
    if opts["seq_len"] is not None and opts["seq_len"] != width - 1:
        raise FP8LabError(f"{files[0]} has rows of {width} tokens (seq_len {width - 1}); --seq-len {opts['seq_len']} "
                          "cannot apply: rows are kept as they are (leave --seq-len out)")
    if not opts["pack"]:
        raise FP8LabError(f"{files[0]} already holds fixed rows of {width} tokens; --no-pack does not apply")
    with DatasetWriter(out, seq_len=width - 1, vocab_size=vocab, eos_id=eos) as writer:
        if tok is not None:
            writer.add_files(tok.files())
        rows = max(1, opts["shard_tokens"] // width)
        sinks = {n: ShardSink(writer=writer, split=n, rows_per_shard=rows) for n in SPLITS}
        progress.phase("copying rows", total_bytes=sum(s["bytes"] for s in sources))
        seen = 0
        for path, arr, source in zip(files, arrays, sources, strict=True):
            for start, chunk in iter_rows(path, arr, vocab_size=vocab):
                val = row_is_val(seen + start, len(chunk), val_fraction=opts["val_fraction"])
                sinks["val"].add(chunk[val])
                sinks["train"].add(chunk[~val])
                progress.advance(nbytes=chunk.size * arr.itemsize, tokens=int(chunk.size))
            seen += arr.shape[0]
            source.update(rows=int(arr.shape[0]), row_tokens=int(width))
        stats = _finish(writer, packers={}, sinks=sinks, val_fraction=opts["val_fraction"], what=_describe(files))
        extra = {"prepare": {"pack": True, "split_level": "row", "val_fraction": opts["val_fraction"],
                             "shard_tokens": opts["shard_tokens"]}, "stats": stats}
        writer.finish(tokenizer=tok_record, sources=sources, extra=extra)
    return stats, writer, []
