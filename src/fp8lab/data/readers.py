"""Input files for `fp8lab prepare`: which files, and the documents in them.

Every reader streams: text files in chunks, JSON lines chunk by chunk (gzip included), Parquet
in record batches of one column. Nothing holds a whole file in memory, so a corpus many times
larger than RAM prepares in constant memory. Every error names the file (and line or key).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fp8lab.errors import FP8LabError

SUFFIXES = (".jsonl.gz", ".jsonl", ".txt", ".parquet", ".npy")  # longest first: .jsonl.gz before .jsonl
NEWLINE = b"\n"
CHUNK_BYTES = 4 << 20  # text read per step: big enough for the tokenizer's threads, small for RAM

_replaced = [0]


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    # Same output as errors="replace" (one U+FFFD per maximal invalid subsequence), but counted.
    _replaced[0] += 1
    return "\ufffd", exc.end


codecs.register_error("fp8lab-count-replace", _count_and_replace)


def input_kind(path: str | Path) -> str | None:
    """"txt", "jsonl", "jsonl.gz", "parquet", "npy", or None for an unsupported name."""
    name = str(path).lower()
    return next((s[1:] for s in SUFFIXES if name.endswith(s)), None)


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, globs (`**` recursive) and directories, sorted per pattern, without repeats."""
    if not patterns:
        raise FP8LabError("no --input given; name files, globs or directories to prepare")
    out: dict[Path, None] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise FP8LabError(f"--input {pattern!r}: no file matches this pattern")
        elif Path(pattern).is_dir():
            matches = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and input_kind(p))
            if not matches:
                raise FP8LabError(f"--input {pattern}: directory holds no {'/'.join(SUFFIXES)} file")
        elif Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            raise FP8LabError(f"--input {pattern}: no such file or directory")
        for m in matches:
            if input_kind(m) is None:
                raise FP8LabError(f"input {m}: unsupported file type; fp8lab prepare reads {', '.join(SUFFIXES)}")
            out.setdefault(m, None)
    return list(out)


class TextDecoder:
    """UTF-8 decoding under the --encoding-errors policy: "replace" (counted) or "error"."""

    def __init__(self, policy: str = "replace") -> None:
        if policy not in ("replace", "error"):
            raise FP8LabError(f"--encoding-errors must be 'replace' or 'error', got {policy!r}")
        self.policy = policy
        self.replaced = 0

    def decode(
        self, data: bytes, *, path: Path, offset: int = 0, line: int | None = None, row: int | None = None
    ) -> str:
        """`data` (read at byte `offset` of `path`, starting on line `line`, or Parquet row `row`) as text."""
        if self.policy == "error":
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as e:
                if row is not None:
                    where = f"row {row}"
                else:
                    where = f"byte {offset + e.start}"
                    if line is not None:
                        where += f" (line {line + data.count(NEWLINE, 0, e.start)})"
                raise FP8LabError(
                    f"{path}: {where} is not valid UTF-8 ({data[e.start:e.end]!r}); fix the file or pass "
                    "--encoding-errors=replace to substitute U+FFFD and count the replacements"
                ) from None
        before = _replaced[0]
        text = data.decode("utf-8", "fp8lab-count-replace")
        self.replaced += _replaced[0] - before
        return text

    def clean_surrogates(self, text: str, *, path: Path, line: int) -> str:
        """JSON may spell lone UTF-16 surrogates (\\ud800) that no UTF-8 encoder accepts."""
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
        if self.policy == "error":
            raise FP8LabError(
                f"{path}: line {line} holds a lone UTF-16 surrogate escape, which is not valid Unicode text; "
                "fix the file or pass --encoding-errors=replace"
            )
        bad = sum(1 for ch in text if "\ud800" <= ch <= "\udfff")
        self.replaced += bad
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


@dataclass
class DocBatch:
    """Documents read in one step. `first_continues`: texts[0] goes on with the previous batch's
    last document; `last_open`: texts[-1] goes on in the next batch (a long .txt file)."""

    texts: list[str]
    nbytes: int  # input bytes consumed (compressed bytes for .gz), for progress
    first_continues: bool = False
    last_open: bool = False


@dataclass
class FileStats:
    """What one input file contributed; ends up in the manifest's `sources`."""

    documents: int = 0
    empty: int = 0


def _utf8_cut(data: bytes) -> int:
    """Where to end a chunk: after the last newline, else before a trailing incomplete UTF-8 character."""
    nl = data.rfind(NEWLINE)
    if nl >= 0:
        return nl + 1
    i = len(data) - 1
    while i >= 0 and len(data) - i <= 4 and (data[i] & 0xC0) == 0x80:  # continuation bytes
        i -= 1
    if i >= 0 and data[i] >= 0xC0:  # a lead byte: is its character complete?
        need = 2 if data[i] < 0xE0 else 3 if data[i] < 0xF0 else 4
        if len(data) - i < need:
            return i
    return len(data)


def read_txt(path: Path, *, decoder: TextDecoder, stats: FileStats) -> Iterator[DocBatch]:
    """The whole file is one document, read in chunks cut at line ends (the tokenizer sees the
    chunks separately: a BPE may merge across a chunk's last newline differently than it would
    in one piece; CHUNK_BYTES is fixed, so the output is still reproducible)."""
    if path.stat().st_size == 0:
        raise FP8LabError(f"input {path} is empty")
    offset, carry, first = 0, b"", True
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            data = carry + chunk
            if not chunk:
                cut = len(data)
            else:
                cut = _utf8_cut(data)
            carry = data[cut:]
            text = decoder.decode(data[:cut], path=path, offset=offset, line=None)
            offset += cut
            last = not chunk
            if text or last:
                yield DocBatch([text], len(chunk), first_continues=not first, last_open=not last)
                first = False
            if last:
                break
    stats.documents = 1


def read_jsonl(path: Path, *, field_name: str, decoder: TextDecoder, stats: FileStats) -> Iterator[DocBatch]:
    """One document per JSON line, the text under `field_name`; blank lines are skipped."""
    gz = path.name.lower().endswith(".gz")
    try:
        raw = open(path, "rb")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        with raw, stream:
            line_no, offset, carry, done_bytes = 1, 0, b"", 0
            while True:
                chunk = stream.read(CHUNK_BYTES)
                data = carry + chunk
                cut = len(data) if not chunk else data.rfind(b"\n") + 1
                carry = data[cut:]
                texts = []
                for i, line in enumerate(
                    decoder.decode(data[:cut], path=path, offset=offset, line=line_no).split("\n"), start=line_no
                ):
                    if line.strip():
                        text = _json_text(line, path=path, line=i, field_name=field_name)
                        if "\\u" in line and ("\\ud" in line.lower()):
                            text = decoder.clean_surrogates(text, path=path, line=i)
                        if text:
                            texts.append(text)
                        else:
                            stats.empty += 1
                line_no += data.count(b"\n", 0, cut)
                offset += cut
                pos = raw.tell()
                stats.documents += len(texts)
                if texts or not chunk:
                    yield DocBatch(texts, pos - done_bytes)
                    done_bytes = pos
                if not chunk:
                    break
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise FP8LabError(f"input {path} is not a complete gzip file ({e}); re-download or re-compress it") from None
    if path.stat().st_size == 0 or stats.documents + stats.empty == 0:
        raise FP8LabError(f"input {path} is empty: no JSON lines in it")


def _json_text(text_line: str, *, path: Path, line: int, field_name: str) -> str:
    try:
        obj = json.loads(text_line)
    except json.JSONDecodeError as e:
        raise FP8LabError(f"{path}: line {line}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise FP8LabError(
            f"{path}: line {line}: expected a JSON object with field {field_name!r}, got {type(obj).__name__}"
        )
    if field_name not in obj:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        raise FP8LabError(
            f"{path}: line {line}: no field {field_name!r} (fields: {keys}); choose the text field with --text-field"
        )
    text = obj[field_name]
    if not isinstance(text, str):
        raise FP8LabError(f"{path}: line {line}: field {field_name!r} is {type(text).__name__}, expected a string")
    return text


def read_parquet(path: Path, *, column: str, decoder: TextDecoder, stats: FileStats) -> Iterator[DocBatch]:
    """One document per row of `column` (string or binary), in record batches of about CHUNK_BYTES."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise FP8LabError(f"input {path} is not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise FP8LabError(
            f"{path}: no column {column!r} (columns: {', '.join(names[:12])}); choose it with --text-column"
        )
    ctype = pf.schema_arrow.field(column).type
    textual = pa.types.is_string(ctype) or pa.types.is_large_string(ctype)
    if not (textual or pa.types.is_binary(ctype) or pa.types.is_large_binary(ctype)):
        raise FP8LabError(f"{path}: column {column!r} has type {ctype}, expected a string column")
    meta = pf.metadata
    rows = meta.num_rows
    if rows == 0:
        raise FP8LabError(f"input {path} is empty: the Parquet file has no rows")
    raw_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    batch_rows = max(1, min(65536, CHUNK_BYTES * rows // max(raw_bytes, 1)))
    size, done, seen = path.stat().st_size, 0, 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
            col = batch.column(0)
            try:
                values = col.to_pylist() if textual else None
            except UnicodeDecodeError:
                values = None  # Arrow does not validate UTF-8 on read; decode byte by byte below
            if values is None:
                values = [
                    None if b is None else decoder.decode(b, path=path, row=seen + i)
                    for i, b in enumerate(col.cast(pa.large_binary()).to_pylist())
                ]
            texts = [v for v in values if v]
            stats.documents += len(texts)
            stats.empty += len(values) - len(texts)
            seen += len(values)
            pos = size * seen // rows
            yield DocBatch(texts, pos - done)
            done = pos
    except pa.ArrowException as e:
        raise FP8LabError(f"input {path}: reading column {column!r} failed: {e}") from None
