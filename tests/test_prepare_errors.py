"""Bad input to `fp8lab prepare` and to the loader: one clear line naming the file (and key or
value), exit code 2, and nothing left behind that looks like data."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from data_helpers import listing, make_docs, write_jsonl, write_parquet
from fp8lab.cli import main
from fp8lab.data import TokenLoader, open_dataset, readers
from fp8lab.data import prepare as prep
from fp8lab.data.prepare import prepare_dataset
from fp8lab.errors import FP8LabError
from helpers import run_cli, tree_digest


def _empty_txt(d):
    (d / "empty.txt").write_bytes(b"")
    return ["-i", str(d / "empty.txt")], ["empty.txt", "is empty"]


def _blank_jsonl(d):
    (d / "blank.jsonl").write_text("\n  \n\n")
    return ["-i", str(d / "blank.jsonl")], ["blank.jsonl", "is empty"]


def _empty_parquet(d):
    write_parquet(d / "none.parquet", [])
    return ["-i", str(d / "none.parquet")], ["none.parquet", "no rows"]


def _no_match(d):
    return ["-i", str(d / "*.jsonl")], ["*.jsonl", "no file matches"]


def _bad_utf8(d):
    (d / "bad.txt").write_bytes(b"hello \xff\xfe world")
    return ["-i", str(d / "bad.txt"), "--encoding-errors", "error"], ["bad.txt", "byte 6", "not valid UTF-8"]


def _missing_field(d):
    # The bad line is last in the second file and shards are small: shards were already written when it fails.
    write_jsonl(d / "a.jsonl", make_docs(50, seed=1))
    (d / "b.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x", "id": 3}) + "\n")
    return ["-i", str(d / "a.jsonl"), str(d / "b.jsonl"), "--seq-len", "16", "--shard-tokens", "100"], [
        "b.jsonl", "line 2", "no field 'text'", "body, id"]


def _missing_column(d):
    write_parquet(d / "t.parquet", ["a b c", "d e f"], column="body")
    return ["-i", str(d / "t.parquet")], ["t.parquet", "no column 'text'", "body"]


def _float_npy(d):
    np.save(d / "f.npy", np.zeros((4, 9), dtype=np.float32))
    return ["-i", str(d / "f.npy"), "--vocab-size", "10"], ["f.npy", "float32", "must be integers"]


def _negative_npy(d):
    a = np.ones((4, 9), dtype=np.int64)
    a[2, 3] = -5
    np.save(d / "neg.npy", a)
    return ["-i", str(d / "neg.npy"), "--vocab-size", "10"], ["neg.npy", "negative token id", "index 21", "-5"]


def _id_over_vocab(d):
    a = np.ones(100, dtype=np.uint16)
    a[77] = 1000
    np.save(d / "big.npy", a)
    return ["-i", str(d / "big.npy"), "--vocab-size", "1000", "--eos-id", "0"], [
        "big.npy", "token id 1000", "vocabulary of 1000", "index 77"]


def _truncated_gzip(d):
    write_jsonl(d / "t.jsonl.gz", make_docs(200, seed=2), gz=True)
    raw = (d / "t.jsonl.gz").read_bytes()
    (d / "t.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    return ["-i", str(d / "t.jsonl.gz")], ["t.jsonl.gz", "not a complete gzip file"]


def _bad_json(d):
    (d / "j.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    return ["-i", str(d / "j.jsonl")], ["j.jsonl", "line 3", "not valid JSON"]


def _unsupported(d):
    (d / "notes.csv").write_text("a,b\n")
    return ["-i", str(d / "notes.csv")], ["notes.csv", "unsupported file type"]


def _bad_tokenizer(d):
    write_jsonl(d / "d.jsonl", ["a b"])
    (d / "tok.json").write_text('{"not": "a tokenizer"}')
    return ["-i", str(d / "d.jsonl"), "--tokenizer", str(d / "tok.json")], ["tok.json", "could not be read"]


def _no_vocab_for_npy(d):
    np.save(d / "r.npy", np.ones((4, 9), dtype=np.int64))
    return ["-i", str(d / "r.npy")], [".npy inputs need --vocab-size"]


def _too_short_for_a_window(d):
    write_jsonl(d / "s.jsonl", ["tiny"])
    return ["-i", str(d / "s.jsonl"), "--val-fraction", "0"], ["s.jsonl", "no training sequence", "513 tokens"]


def _no_validation_sequence(d):
    write_jsonl(d / "v.jsonl", make_docs(30, seed=3))
    return ["-i", str(d / "v.jsonl"), "--seq-len", "32"], ["v.jsonl", "no validation sequence", "--val-fraction=0.01"]


def _missing_field_while_training(d):
    write_jsonl(d / "a.jsonl", make_docs(20, seed=1))
    (d / "b.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    return ["-i", str(d), "--train-tokenizer", "--vocab-size", "300"], ["b.jsonl", "line 1", "no field 'text'"]


def _all_texts_empty(d):
    write_jsonl(d / "a.jsonl", make_docs(20, seed=1))
    write_jsonl(d / "e.jsonl", ["", ""])
    return ["-i", str(d / "*.jsonl"), "--seq-len", "8"], ["e.jsonl", "holds no text"]


CASES = {f.__name__[1:]: f for f in (
    _missing_field_while_training, _all_texts_empty,
    _empty_txt, _blank_jsonl, _empty_parquet, _no_match, _bad_utf8, _missing_field, _missing_column, _float_npy,
    _negative_npy, _id_over_vocab, _truncated_gzip, _bad_json, _unsupported, _bad_tokenizer, _no_vocab_for_npy,
    _too_short_for_a_window, _no_validation_sequence,
)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    args, needles = CASES[case](inputs)
    before = tree_digest(tmp_path)
    rc = main(["prepare", "--progress", "off", *args, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("fp8lab: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert tree_digest(tmp_path) == before  # no output, no temporary directory


def test_existing_output_is_untouched(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", make_docs(30, seed=3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_digest(tmp_path)
    assert main(["prepare", "-i", str(tmp_path / "d.jsonl"), "-o", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


def test_cli_process_exit_code_and_message(tmp_path):
    proc = run_cli(["prepare", "-i", tmp_path / "nothing-*.txt", "-o", tmp_path / "out"], cache=tmp_path / "cache")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "nothing-*.txt" in proc.stderr and not (tmp_path / "out").exists()


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", make_docs(300, seed=4))
    monkeypatch.setattr(readers, "CHUNK_BYTES", 5000)  # many steps, shards written before the interrupt

    class Interrupt(prep.Progress):
        calls = 0

        def advance(self, *, nbytes, tokens):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "out", seq_len=16, shard_tokens=1700,
                        progress=Interrupt())
    assert listing(tmp_path) == ["d.jsonl"]


def test_invalid_utf8_is_replaced_and_counted_by_default(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait \xff\xfe, then \xc3 and valid \xc3\xa9 text. " * 20)
    write_jsonl(tmp_path / "ok.jsonl", make_docs(20, seed=5))
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ab\xffcd"}\n{"text": "\\ud800 lone"}\n')
    out = tmp_path / "out"
    assert main(["prepare", "-i", str(tmp_path / "a.txt"), str(tmp_path / "ok.jsonl"), str(tmp_path / "b.jsonl"),
                 "-o", str(out), "--seq-len", "16", "--val-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "replaced 82 invalid UTF-8" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["replaced_invalid_utf8"] for s in manifest["sources"]] == [80, 0, 2]
    assert manifest["stats"]["replaced_invalid_utf8"] == 82
    # U+FFFD (EF BF BD) stands where the bad bytes were; valid é (C3 A9) survives.
    ds = open_dataset(out)
    rows = np.concatenate([ds.split(n).gather(np.arange(len(ds.split(n)))) for n in ("train", "val")])
    text = bytes(rows.reshape(-1)[rows.reshape(-1) < 256].astype(np.uint8))
    assert "caf\ufffd au lait \ufffd".encode() in text and "valid é".encode() in text


@pytest.fixture
def prepared(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", make_docs(120, seed=6))
    return prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "data", seq_len=32,
                           val_fraction=0.05).path


def test_truncated_shard(prepared):
    shard = prepared / "train_00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(FP8LabError, match=r"train_00000\.bin truncated"):
        open_dataset(prepared)


def test_changed_byte_under_full_verification(prepared):
    shard = prepared / "val_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[300] ^= 0x01
    shard.write_bytes(bytes(raw))
    open_dataset(prepared, verify="size")  # same size and header: only the checksum can tell
    with pytest.raises(FP8LabError, match=r"val_00000\.bin changed: sha256"):
        open_dataset(prepared, verify="full")


def test_changed_tokenizer_file_under_full_verification(tmp_path):
    from data_helpers import train_tokenizer_file

    docs = make_docs(60, seed=7)
    write_jsonl(tmp_path / "d.jsonl", docs)
    tok = train_tokenizer_file(tmp_path / "tok.json", docs, vocab_size=300)
    out = prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "data", tokenizer=str(tok),
                          seq_len=16).path
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace("</s>", "</x>"))
    open_dataset(out)
    with pytest.raises(FP8LabError, match=r"tokenizer\.json changed"):
        open_dataset(out, verify="full")
    (out / "tokenizer.json").unlink()
    with pytest.raises(FP8LabError, match=r"tokenizer\.json listed in .*manifest\.json is missing"):
        open_dataset(out)


@pytest.mark.parametrize(("version", "ok"), [(1, True), (3, False), (0, False)])
def test_header_from_another_version(prepared, version, ok):
    # Version 1 (before pad_id) has the same layout and is still read; anything else is refused.
    for shard in prepared.glob("*.bin"):
        raw = bytearray(shard.read_bytes())
        raw[8:12] = struct.pack("<I", version)
        shard.write_bytes(bytes(raw))
    if ok:
        assert len(open_dataset(prepared).split("train")) > 0
    else:
        with pytest.raises(FP8LabError, match=rf"_00000\.bin has format version {version}, this fp8lab reads"):
            open_dataset(prepared)


def test_seq_len_over_the_model_maximum(prepared):
    split = open_dataset(prepared).split("train")
    with pytest.raises(FP8LabError, match=rf"{prepared}.* sequences of 32 tokens but the model's max_seq_len is 16"):
        TokenLoader(split, batch_size=2, seed=0, max_seq_len=16)
    assert TokenLoader(split, batch_size=2, seed=0, max_seq_len=32).seq_len == 32


def test_token_ids_against_the_model_vocab(tmp_path):
    a = np.random.default_rng(8).integers(0, 300, size=(64, 9), dtype=np.uint16)
    a[5, 5] = 299
    np.save(tmp_path / "r.npy", a)
    ds = open_dataset(prepare_dataset(inputs=[str(tmp_path / "r.npy")], out=tmp_path / "d", vocab_size=300,
                                      val_fraction=0.0).path)
    with pytest.raises(FP8LabError, match=r"contains token id 299 but the model's vocab_size is 256"):
        TokenLoader(ds.split("train"), batch_size=64, seed=0, vocab_size=256).next_batch()
    # A model vocabulary padded up to a multiple of 64 (or 128) is normal.
    for padded in (320, 384):
        assert TokenLoader(ds.split("train"), batch_size=64, seed=0, vocab_size=padded).next_batch()[0].max() == 299


def test_gzip_read_check(tmp_path):
    # The reader handles concatenated gzip members (as `cat a.gz b.gz` makes).
    docs = make_docs(10, seed=9)
    parts = [gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[i::2]).encode(), mtime=0)
             for i in range(2)]
    (tmp_path / "cat.jsonl.gz").write_bytes(b"".join(parts))
    out = prepare_dataset(inputs=[str(tmp_path / "cat.jsonl.gz")], out=tmp_path / "o", seq_len=8, val_fraction=0)
    assert open_dataset(out.path).sources[0]["documents"] == 10
