"""fp8lab prepare --input PATH_OR_GLOB ... --out DIR: text / JSON / Parquet / NumPy -> verified token shards.

Exit codes: 0 done; 2 bad input, output in use (DIR.lock held by another run) or not
writable; 130 Ctrl-C; 143 SIGTERM (128 + 15, as if the signal's default action had run). On
2, 130 and 143 the temporary output DIR.tmp-PID is removed and nothing is written at DIR.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

ORDER = 5  # position in `fp8lab --help`: data comes before training

EPILOG = """\
which files: a directory gives its files of the kinds above, or with --ext exactly the files
with those extensions; a path or glob must be of a kind above or have an --ext extension, so
-i 'src/**/*.py' needs --ext .py. --ext files are plain text, one document per file (empty
ones are skipped and listed); .txt, .jsonl, .json, .parquet and .npy keep their readers.

safety: DIR is built as DIR.tmp-PID and renamed when complete; DIR.lock keeps a second run on
the same DIR out (it names the PID holding it). Ctrl-C or SIGTERM removes DIR.tmp-PID; after
kill -9, the next run on DIR removes it (and says so).

instruction data (--format prompt-completion | chat, .jsonl / .jsonl.gz, one example per line):
prompt-completion lines are {"prompt": "...", "completion": "..."}, loss on the completion and
EOS; chat lines are {"messages": [{"role": "user", "content": "..."}, ...]}, rendered with the
chat template of --tokenizer FOLDER (tokenizer_config.json or chat_template.jinja), loss on the
assistant turns only. Examples are packed whole; per-token loss flags are stored with the shards.

exit codes: 0 done; 2 bad input, DIR in use or not writable; 130 Ctrl-C; 143 SIGTERM."""


def register(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize and pack a corpus into a data directory for `fp8lab train --data.path=DIR`",
        description=textwrap.fill(
            "Read .txt (one document per file), .jsonl / .jsonl.gz (one per line), .json (an array of objects or "
            "strings, one per item), .parquet (one per row), any text file with --ext (one per file) or "
            "pre-tokenized .npy (1-D stream, or 2-D (N, L) rows kept as they are); tokenize, split train/val by "
            "document, pack into windows of seq_len + 1 and write shards + manifest.json to DIR.", 92),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the epilog's paragraphs
    )
    p.add_argument("--input", "-i", action="extend", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="files, directories or globs (quote them; ** is recursive); repeatable")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--tokenizer", default="byte", metavar="byte|FILE|DIR",
                   help="'byte' (built-in, 256 bytes + EOS), a local Hugging Face tokenizer.json, or a tokenizer "
                        "folder (tokenizer.json + tokenizer_config.json / chat_template.jinja, saved with the data; "
                        "its eos_token, bos_token and chat template are used) (default: byte)")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="train a byte-level BPE of --vocab-size on the input itself; saved with the data")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="vocabulary of --train-tokenizer, or of the ids in .npy inputs")
    p.add_argument("--eos-token", metavar="TOKEN", help="the tokenizer's end-of-document token (default: detected)")
    p.add_argument("--eos-id", type=int, metavar="N", help="the id ending each document in a 1-D .npy stream")
    p.add_argument("--ext", metavar=".EXT,...",
                   help="read files with these extensions (comma-separated, e.g. .py,.md) as plain text, one "
                        "document per file; a directory then gives exactly those files")
    p.add_argument("--format", default="text", choices=("text", "prompt-completion", "chat"),
                   help="text: documents for pretraining (default); prompt-completion: JSON lines with prompt and "
                        "completion, loss on the completion; chat: JSON lines with messages, rendered with the "
                        "tokenizer's chat template, loss on assistant turns")
    p.add_argument("--overflow", default="truncate", choices=("truncate", "drop"),
                   help="an instruction example longer than --seq-len + 1 tokens: keep its first seq_len + 1 "
                        "tokens (default) or leave it out; counted either way")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--text-column", default="text", help="Parquet column holding the text (default: text)")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="tokens per training sequence (default 512; 2-D .npy: L - 1)")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one document (instruction example) per sequence, padded; padding carries no loss")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="share of documents (rows for 2-D .npy) held out for validation (default 0.01)")
    p.add_argument("--encoding-errors", choices=("replace", "error"), default="replace",
                   help="bytes that are not UTF-8: replace with U+FFFD and count them (default), or stop")
    p.add_argument("--shard-tokens", type=int, default=1_000_000_000, metavar="N",  # = prepare.DEFAULT_SHARD_TOKENS
                   help="tokens per shard file (default 1G: 2 GB of uint16; fewer shards, faster batches)")
    p.add_argument("--max-line-bytes", type=int, metavar="N",
                   help="longest JSON line read (default 64 MiB); a longer one is an error, not a memory blow-up")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar: auto = on a terminal only")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.table import Table
    from rich.text import Text

    from fp8lab.data import prepare as prep

    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)

    class TokensPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
            shown = f"{rate / 1e6:,.2f}M" if rate >= 1e6 else f"{rate / 1e3:,.1f}K"
            return Text(f"{shown} tok/s", style="progress.data.speed")

    class Bar(prep.Progress):
        def __init__(self) -> None:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TokensPerSecond(), TimeRemainingColumn(), console=err)
            self.task = None
            self.tokens = 0

        def phase(self, name: str, *, total_bytes: int) -> None:
            if self.task is not None:
                self.bar.update(self.task, completed=self.bar.tasks[-1].total)
            self.tokens = 0
            self.task = self.bar.add_task(name, total=max(total_bytes, 1), tokens=0)

        def advance(self, *, nbytes: int, tokens: int) -> None:
            self.tokens += tokens
            self.bar.update(self.task, advance=nbytes, tokens=self.tokens)

    show_bar = args.progress == "on" or (args.progress == "auto" and err.is_terminal)
    bar = Bar() if show_bar else None
    if bar:
        bar.bar.start()
    stopped = None
    try:
        report = prep.prepare_dataset(
            inputs=args.input, out=args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
            vocab_size=args.vocab_size, eos_token=args.eos_token, eos_id=args.eos_id, text_field=args.text_field,
            text_column=args.text_column, seq_len=args.seq_len, pack=args.pack, val_fraction=args.val_fraction,
            encoding_errors=args.encoding_errors, shard_tokens=args.shard_tokens, progress=bar, ext=args.ext,
            max_line_bytes=args.max_line_bytes, format=args.format, overflow=args.overflow,
        )
    except (prep.Terminated, KeyboardInterrupt) as e:
        # Handled here, not by the CLI's generic Ctrl-C message (which speaks of checkpoints).
        stopped = e
    finally:
        if bar:
            bar.bar.stop()
    if stopped is not None:
        how = "stopped by SIGTERM" if isinstance(stopped, prep.Terminated) else "interrupted"
        print(f"fp8lab: prepare {how}; its temporary output was removed; run it again to prepare {args.out}",
              file=sys.stderr)
        return prep.SIGTERM_EXIT if isinstance(stopped, prep.Terminated) else 130

    s = report.stats
    t = Table(title=f"fp8lab prepare -> {report.path}")
    for col in ("", "train", "val", "total"):
        t.add_column(col, justify="right" if col else "left")
    for label, key in (("documents", "documents"), ("tokens", "tokens"), ("sequences", "sequences"),
                       ("dropped tokens", "dropped_tokens"), *INSTRUCT_ROWS):
        if key not in s["train"]:
            continue  # instruction-data rows, for text data
        a, b = s["train"][key], s["val"][key]
        t.add_row(label, f"{a:,d}", f"{b:,d}", f"{a + b:,d}")
    slots = (s["train"]["sequences"] + s["val"]["sequences"]) * report.seq_len
    pads = s["train"]["pad_targets"] + s["val"]["pad_targets"]
    t.add_row("padding fraction", *(f"{s[n]['padding_fraction']:.2%}" for n in ("train", "val")),
              f"{pads / slots if slots else 0:.2%}")
    t.add_row("seconds", "", "", f"{report.seconds:.2f}")
    out.print(t)
    tokens = s["train"]["tokens"] + s["val"]["tokens"]
    out.print(f"{report.input_bytes / 1e6 / max(report.seconds, 1e-9):,.1f} MB/s of input, "
              f"{tokens / max(report.seconds, 1e-9) / 1e6:,.2f}M tokens/s; seq_len {report.seq_len}, "
              f"vocab {report.vocab_size}")
    for note in [*report.notes, *_eval_notes(s["val"]["sequences"])]:
        out.print(f"[yellow]note: {escape(note)}[/]")
    out.print(f"train with: fp8lab train --data.path={report.path} --data.seq_len={report.seq_len}")
    return 0


INSTRUCT_ROWS = (("loss tokens", "loss_tokens"), ("truncated examples", "truncated_examples"),
                 ("dropped: too long", "dropped_examples"), ("dropped: no loss", "no_loss_examples"))


def _eval_notes(val_sequences: int) -> list[str]:
    """A warning when the validation split holds fewer sequences than a default evaluation reads
    (training would quietly evaluate on fewer batches, a noisier eval loss)."""
    from fp8lab.config import JobConfig

    d = JobConfig()
    need = d.data.micro_batch_size * d.train.eval_batches
    if val_sequences >= need:
        return []
    return [f"the val split holds {val_sequences} sequences, fewer than the {need} a default evaluation reads "
            f"(data.micro_batch_size {d.data.micro_batch_size} x train.eval_batches {d.train.eval_batches}); raise "
            "--val-fraction, or train with smaller data.micro_batch_size or train.eval_batches"]
