"""Input files for `fp8lab prepare`: which files, and the documents in them.

Every reader but .json streams: text files in chunks, JSON lines chunk by chunk (gzip included),
Parquet in record batches of one column, so a corpus many times larger than RAM prepares in
constant memory. Two limits keep that true for bad input: a JSON line longer than
MAX_LINE_BYTES (a file without newlines is not JSON lines) and a .json array file larger than
MAX_JSON_BYTES (it is parsed whole) are refused. Every error names the file (and line or key).

Which reader: by name (.txt, .jsonl, .jsonl.gz, .json, .parquet, .npy); files with the
extensions given to --ext are read as plain text, one document per file, like .txt.
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

SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".txt", ".parquet", ".npy")  # longest first: .jsonl.gz, then .jsonl
NEWLINE = b"\n"
CHUNK_BYTES = 4 << 20  # text read per step: big enough for the tokenizer's threads, small for RAM
# A line is held whole until it ends; this bounds the memory one line may take (and a file
# with no newline at all, which is no JSON lines file, fails after this many bytes).
MAX_LINE_BYTES = 64 << 20
# A .json array is parsed whole, and Python objects take several times the file's size.
MAX_JSON_BYTES = 256 << 20
# Compressed files read as plain text would be noise: --ext refuses these.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".tar", ".tgz")

_replaced = [0]


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    # Same output as errors="replace" (one U+FFFD per maximal invalid subsequence), but counted.
    _replaced[0] += 1
    return "\ufffd", exc.end


codecs.register_error("fp8lab-count-replace", _count_and_replace)


def parse_exts(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """--ext ".py,.md" (or a list) as (".py", ".md"): lower case, a leading dot added if missing."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    exts = []
    for item in items:
        ext = item.strip().lower()
        if not ext or ext == "." or any(c in ext for c in "/\\*?["):
            raise FP8LabError(f"--ext {spec!r}: {item.strip()!r} is not a file extension; write e.g. --ext .py,.md")
        ext = ext if ext.startswith(".") else "." + ext
        if ext.endswith(_COMPRESSED):
            raise FP8LabError(f"--ext {ext}: compressed files cannot be read as plain text; decompress them first")
        exts.append(ext)
    return tuple(dict.fromkeys(exts))


def input_kind(path: str | Path, text_exts: tuple[str, ...] = ()) -> str | None:
    """"txt", "jsonl", "jsonl.gz", "json", "parquet", "npy"; "text" for a name ending in one of
    `text_exts` (plain text like .txt); None for an unsupported name. A known suffix keeps its
    reader even when listed in `text_exts`."""
    name = str(path).lower()
    known = next((s[1:] for s in SUFFIXES if name.endswith(s)), None)
    if known is None and name.endswith(tuple(text_exts)):
        return "text"
    return known


def expand_inputs(patterns: list[str], text_exts: tuple[str, ...] = ()) -> list[Path]:
    """Files named by paths, globs (`**` recursive) and directories, sorted per pattern, without repeats.

    A directory contributes the files of a known kind under it, or, when `text_exts` (--ext) is
    given, exactly the files ending in one of those. A path or glob match must be of a known kind
    or end in one of `text_exts`: a glob is never narrowed silently.
    """
    if not patterns:
        raise FP8LabError("no --input given; name files, globs or directories to prepare")
    out: dict[Path, None] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise FP8LabError(f"--input {pattern!r}: no file matches this pattern")
        elif Path(pattern).is_dir():
            matches = _directory_files(Path(pattern), text_exts)
        elif Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            raise FP8LabError(f"--input {pattern}: no such file or directory")
        for m in matches:
            if input_kind(m, text_exts) is None:
                raise FP8LabError(f"input {m}: unsupported file type; fp8lab prepare reads {', '.join(SUFFIXES)}, "
                                  f"and plain text with --ext {m.suffix or '.EXT'}")
            out.setdefault(m, None)
    return list(out)


def _directory_files(root: Path, text_exts: tuple[str, ...]) -> list[Path]:
    if text_exts:
        matches = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(text_exts))
        wanted = ",".join(text_exts)
    else:
        matches = sorted(p for p in root.rglob("*") if p.is_file() and input_kind(p))
        wanted = "/".join(SUFFIXES)
    if not matches:
        others = sorted({p.suffix for p in root.rglob("*") if p.is_file() and p.suffix})[:8]
        hint = f" (it holds {', '.join(others)}: read such files as plain text with --ext)" if others else ""
        raise FP8LabError(f"--input {root}: directory holds no {wanted} file{hint}")
    return matches


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

    def clean_surrogates(self, text: str, *, where: str) -> str:
        """JSON may spell lone UTF-16 surrogates (\\ud800) that no UTF-8 encoder accepts; `where`
        ("FILE: line N") starts the error message."""
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
        if self.policy == "error":
            raise FP8LabError(
                f"{where} holds a lone UTF-16 surrogate escape, which is not valid Unicode text; "
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


def read_txt(path: Path, *, decoder: TextDecoder, stats: FileStats, allow_empty: bool = False) -> Iterator[DocBatch]:
    """The whole file is one document, read in chunks cut at line ends (the tokenizer sees the
    chunks separately: a BPE may merge across a chunk's last newline differently than it would
    in one piece; CHUNK_BYTES is fixed, so the output is still reproducible). An empty file is an
    error, or with `allow_empty` (files picked by --ext, such as an empty __init__.py) one empty
    document in `stats` and no batch."""
    if path.stat().st_size == 0:
        if allow_empty:
            stats.empty = 1
            return
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


def read_jsonl(
    path: Path, *, field_name: str, decoder: TextDecoder, stats: FileStats, max_line_bytes: int | None = None
) -> Iterator[DocBatch]:
    """One document per JSON line, the text under `field_name`; blank lines are skipped. A line
    longer than `max_line_bytes` (default MAX_LINE_BYTES) is an error."""
    limit = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    gz = path.name.lower().endswith(".gz")
    try:
        raw = open(path, "rb")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        with raw, stream:
            offset, done_bytes = 0, 0
            for line_no, block in _line_blocks(stream, path=path, max_line_bytes=limit):
                texts = _jsonl_texts(block, path=path, line_no=line_no, offset=offset, field_name=field_name,
                                     decoder=decoder, stats=stats)
                offset += len(block)
                pos = raw.tell()
                stats.documents += len(texts)
                if texts:
                    yield DocBatch(texts, pos - done_bytes)
                    done_bytes = pos
            yield DocBatch([], raw.tell() - done_bytes)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise FP8LabError(f"input {path} is not a complete gzip file ({e}); re-download or re-compress it") from None
    if path.stat().st_size == 0 or stats.documents + stats.empty == 0:
        raise FP8LabError(f"input {path} is empty: no JSON lines in it")


def _line_blocks(stream, *, path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, the complete lines read in one step) until the end of `stream`.

    Only each new chunk is searched for newlines and a line in progress is kept as a list of
    pieces, joined once when it ends: linear time, however long the lines. Reading at most
    max_line_bytes + 1 bytes per step means any line inside one chunk is within the limit, so
    only lines spanning chunks need counting.
    """
    step = max(1, min(CHUNK_BYTES, max_line_bytes + 1))
    line_no, pending, pending_len = 1, [], 0
    while chunk := stream.read(step):
        last = chunk.rfind(NEWLINE)
        if last < 0:
            pending.append(chunk)
            pending_len += len(chunk)
            if pending_len > max_line_bytes:
                raise _line_too_long(path, line_no, max_line_bytes)
            continue
        if pending_len + chunk.find(NEWLINE) > max_line_bytes:
            raise _line_too_long(path, line_no, max_line_bytes)
        pending.append(chunk[: last + 1])
        block = b"".join(pending)
        yield line_no, block
        line_no += block.count(NEWLINE)
        tail = chunk[last + 1 :]
        pending, pending_len = [tail], len(tail)
    if pending_len:
        yield line_no, b"".join(pending)


def _line_too_long(path: Path, line_no: int, limit: int) -> FP8LabError:
    return FP8LabError(
        f"{path}: line {line_no} is longer than {limit:,} bytes, the longest JSON line prepare reads; "
        "JSON lines hold one document per line: check that this is a JSON lines file (a JSON array goes in a "
        ".json file) or, if a document really is this long, raise --max-line-bytes"
    )


def _jsonl_texts(block: bytes, *, path: Path, line_no: int, offset: int, field_name: str, decoder: TextDecoder,
                 stats: FileStats) -> list[str]:
    texts = []
    for i, line in enumerate(decoder.decode(block, path=path, offset=offset, line=line_no).split("\n"), start=line_no):
        if not line.strip():
            continue
        where = f"{path}: line {i}"
        text = _record_text(_parse_json(line, where=where), where=where, field_name=field_name)
        if "\\u" in line and ("\\ud" in line.lower()):
            text = decoder.clean_surrogates(text, where=where)
        if text:
            texts.append(text)
        else:
            stats.empty += 1
    return texts


def _parse_json(text: str, *, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise FP8LabError(f"{where}: not valid JSON ({e.msg} at {at})") from None


def _record_text(obj, *, where: str, field_name: str, strings: bool = False) -> str:
    """The text of one record: obj[field_name], or obj itself when it is a string and `strings`."""
    if strings and isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        also = " or a string" if strings else ""
        raise FP8LabError(
            f"{where}: expected a JSON object with field {field_name!r}{also}, got {_json_type(obj)}"
        )
    if field_name not in obj:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        raise FP8LabError(
            f"{where}: no field {field_name!r} (fields: {keys}); choose the text field with --text-field"
        )
    text = obj[field_name]
    if not isinstance(text, str):
        raise FP8LabError(f"{where}: field {field_name!r} is {_json_type(text)}, expected a string")
    return text


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages about the file."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def read_json(
    path: Path, *, field_name: str, decoder: TextDecoder, stats: FileStats, max_bytes: int | None = None
) -> Iterator[DocBatch]:
    """A JSON array whose items are documents: objects holding `field_name`, or strings. It is
    parsed whole, so a file over `max_bytes` (default MAX_JSON_BYTES) is refused; JSON lines
    (.jsonl) are streamed instead. Items are numbered from 0 in messages, as in jq's .[N]."""
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    size = path.stat().st_size
    if size > limit:
        raise FP8LabError(
            f"input {path} is {size:,} bytes, over the {limit:,}-byte limit for a .json file (it is parsed whole "
            f"in memory); convert it to JSON lines, which are streamed: jq -c '.[]' {path} > {path.stem}.jsonl"
        )
    if size == 0:
        raise FP8LabError(f"input {path} is empty")
    items = _parse_json(decoder.decode(path.read_bytes(), path=path, line=1), where=str(path))
    if not isinstance(items, list):
        raise FP8LabError(
            f"{path}: expected a JSON array of objects with field {field_name!r} (or of strings), got "
            f"{_json_type(items)}; one JSON object per line belongs in a .jsonl file"
        )
    if not items:
        raise FP8LabError(f"input {path} is empty: the JSON array has no items")
    texts, chars, done = [], 0, 0
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        text = decoder.clean_surrogates(_record_text(item, where=where, field_name=field_name, strings=True),
                                        where=where)
        if not text:
            stats.empty += 1
            continue
        texts.append(text)
        chars += len(text)
        if chars >= CHUNK_BYTES or i == len(items) - 1:
            pos = size * (i + 1) // len(items)
            stats.documents += len(texts)
            yield DocBatch(texts, pos - done)
            texts, chars, done = [], 0, pos
    if texts:
        stats.documents += len(texts)
        yield DocBatch(texts, size - done)


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
