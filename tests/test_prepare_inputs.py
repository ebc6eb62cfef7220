"""`fp8lab prepare` inputs beyond the basic kinds: any text files with --ext, .json arrays, and
JSON lines read in linear time with a bounded line length (a file without newlines used to
take quadratic time and all of its size in memory)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from data_helpers import all_rows, listing, make_docs, write_jsonl
from fp8lab.cli import main
from fp8lab.data import open_dataset, readers
from fp8lab.data.prepare import prepare_dataset
from fp8lab.errors import FP8LabError
from helpers import tree_digest


def _read(path, **kw):
    stats = readers.FileStats()
    batches = list(readers.read_jsonl(path, field_name="text", decoder=readers.TextDecoder(), stats=stats, **kw))
    return [t for b in batches for t in b.texts], stats


def _source_tree(root):
    """A small project: Python and Markdown files in nested folders, plus files that are not text input."""
    docs = make_docs(12, seed=21, min_words=40)
    (root / "pkg" / "sub").mkdir(parents=True)
    for i, d in enumerate(docs[:8]):
        (root / "pkg" / ("sub" if i % 2 else "") / f"m{i}.py").write_text(f'"""{d}"""\n\ndef f{i}(x):\n    return x\n')
    (root / "pkg" / "__init__.py").write_text("")  # empty, as in many packages
    (root / "README.md").write_text("# Title\n\n" + "\n\n".join(docs[8:]))
    (root / "package.json").write_text('{"name": "not a corpus"}')
    (root / "pkg" / "m0.pyc").write_bytes(b"\x00\x01")
    return root


def test_ext_reads_exactly_those_files_of_a_directory_as_text(tmp_path, capsys):
    root = _source_tree(tmp_path / "proj")
    # Without --ext the directory's only known kind is package.json, which is no array of documents.
    assert main(["prepare", "-i", str(root), "-o", str(tmp_path / "o1")]) == 2
    assert "package.json: expected a JSON array" in capsys.readouterr().err
    assert main(["prepare", "-i", str(root), "--ext", ".py,md", "-o", str(tmp_path / "out"), "--seq-len", "32",
                 "--val-fraction", "0.2", "--progress", "off"]) == 0
    assert f"note: skipped 1 empty file(s): {root / 'pkg' / '__init__.py'}" in capsys.readouterr().out
    ds = open_dataset(tmp_path / "out", verify="full")
    files = sorted([*root.rglob("*.py"), root / "README.md"])
    assert [s["path"] for s in ds.sources] == [str(p) for p in files]
    assert {s["kind"] for s in ds.sources} == {"text"}
    assert [s["documents"] for s in ds.sources] == [0 if p.name == "__init__.py" else 1 for p in files]
    text = bytes(np.concatenate([all_rows(ds.path, n).reshape(-1) for n in ("train", "val")]).clip(0, 255)
                 .astype(np.uint8))
    assert b"def f3(x):\n    return x\n" in text and b"# Title" in text


def test_a_glob_of_unknown_files_needs_ext(tmp_path, capsys):
    root = _source_tree(tmp_path / "proj")
    pattern = str(root / "**" / "*.py")
    assert main(["prepare", "-i", pattern, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fp8lab: error: input {root / 'pkg' / '__init__.py'}: unsupported file type; fp8lab prepare reads "
                   ".jsonl.gz, .jsonl, .json, .txt, .parquet, .npy, and plain text with --ext .py")
    report = prepare_dataset(inputs=[pattern], ext=".py", out=tmp_path / "out", seq_len=16, val_fraction=0)
    assert len(open_dataset(report.path).sources) == 9
    with pytest.raises(FP8LabError, match=r"--ext '\.py,\*\.md': '\*\.md' is not a file extension"):
        prepare_dataset(inputs=[pattern], ext=".py,*.md", out=tmp_path / "o2")
    with pytest.raises(FP8LabError, match=r"--ext \.gz: compressed files cannot be read as plain text"):
        prepare_dataset(inputs=[pattern], ext="gz", out=tmp_path / "o2")


def test_json_array_of_records_or_strings(tmp_path):
    docs = make_docs(60, seed=22)
    (tmp_path / "a.json").write_text(json.dumps([{"body": d, "id": i} for i, d in enumerate(docs[:30])]))
    (tmp_path / "b.json").write_text(json.dumps(docs[30:] + [""]))  # strings; an empty one is counted, not kept
    write_jsonl(tmp_path / "ref.jsonl", docs, field="body")
    a = prepare_dataset(inputs=[str(tmp_path / "*.json")], text_field="body", out=tmp_path / "a", seq_len=16).path
    b = prepare_dataset(inputs=[str(tmp_path / "ref.jsonl")], text_field="body", out=tmp_path / "b", seq_len=16).path
    for split in ("train", "val"):  # the same documents in the same order as the JSON lines
        assert np.array_equal(all_rows(a, split), all_rows(b, split))
    assert [(s["kind"], s["documents"], s["empty_documents"]) for s in open_dataset(a).sources] == [
        ("json", 30, 0), ("json", 30, 1)]


@pytest.mark.parametrize(("content", "needle"), [
    ('{"text": "a"}', "expected a JSON array of objects with field 'text' (or of strings), got an object; "
                      "one JSON object per line belongs in a .jsonl file"),
    ('[{"text": "a"}, "b", {"body": "c"}]', "item 2: no field 'text' (fields: body)"),
    ('[{"text": "a"}, 7]', "item 1: expected a JSON object with field 'text' or a string, got a number"),
    ('[{"text": ["a"]}]', "item 0: field 'text' is an array, expected a string"),
    ("[]", "is empty: the JSON array has no items"),
    ('[{"text": "a"},\n {"text": }]', "not valid JSON (Expecting value at line 2 column 11)"),
])
def test_bad_json_array(tmp_path, content, needle):
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(FP8LabError) as e:
        prepare_dataset(inputs=[str(tmp_path / "x.json")], out=tmp_path / "out")
    assert str(tmp_path / "x.json") in str(e.value) and needle in str(e.value), str(e.value)
    assert listing(tmp_path) == ["x.json"]


def test_json_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(make_docs(20, seed=23)))
    monkeypatch.setattr(readers, "MAX_JSON_BYTES", 1000)
    with pytest.raises(FP8LabError) as e:
        prepare_dataset(inputs=[str(path)], out=tmp_path / "out")
    assert str(e.value) == (f"input {path} is {path.stat().st_size:,} bytes, over the 1,000-byte limit for a .json "
                            f"file (it is parsed whole in memory); convert it to JSON lines, which are streamed: "
                            f"jq -c '.[]' {path} > big.jsonl")


@pytest.mark.parametrize("gz", [False, True])
def test_a_file_without_newlines_stops_at_the_line_limit(tmp_path, capsys, gz):
    zeros = bytes(50_000)  # what `head -c 2G /dev/zero` looks like, scaled down
    path = tmp_path / ("z.jsonl.gz" if gz else "z.jsonl")
    path.write_bytes(gzip.compress(zeros, mtime=0) if gz else zeros)
    before = tree_digest(tmp_path)
    assert main(["prepare", "-i", str(path), "-o", str(tmp_path / "out"), "--max-line-bytes", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fp8lab: error: {path}: line 1 is longer than 4,096 bytes, the longest JSON line prepare reads; "
                   "JSON lines hold one document per line: check that this is a JSON lines file (a JSON array goes "
                   "in a .json file) or, if a document really is this long, raise --max-line-bytes")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_line_limit_is_exact_and_counts_lines(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)

    def line(n):  # a JSON line of exactly n bytes before its newline
        return json.dumps({"text": "x" * (n - 12)})

    ok = "\n".join([line(20), line(100), "", line(13)]) + "\n"
    path = tmp_path / "ok.jsonl"
    path.write_text(ok)
    texts, stats = _read(path, max_line_bytes=100)
    assert [len(t) for t in texts] == [8, 88, 1] and stats.documents == 3
    path.write_text(ok + line(20) + "\n" + line(101) + "\n" + line(20))
    with pytest.raises(FP8LabError, match=r"ok\.jsonl: line 6 is longer than 100 bytes"):
        _read(path, max_line_bytes=100)
    path.write_text(ok + line(101))  # the last line, without a newline
    with pytest.raises(FP8LabError, match=r"ok\.jsonl: line 5 is longer than 100 bytes"):
        _read(path, max_line_bytes=100)


def test_one_long_line_in_tiny_chunks_is_read_whole(tmp_path, monkeypatch):
    # 32768 chunks of 256 bytes. Re-copying the growing line at each chunk (as the reader once
    # did) took 15 s on this input, reading it linearly ~0.06 s (measured 2026-12-01, 2-core AVX2
    # machine); speed is not asserted here (the suite must not depend on how busy the machine is),
    # only that a line spanning thousands of chunks comes back whole.
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "a" * (8 << 20)}))
    monkeypatch.setattr(readers, "CHUNK_BYTES", 256)
    texts, _ = _read(path)
    assert [len(t) for t in texts] == [8 << 20]
