"""`fp8lab prepare`: every input kind, the tokenizers, packing and padding, the split, sharding,
byte-for-byte reproducibility, and the path from a prepared directory into `fp8lab train`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from data_helpers import (
    all_rows,
    listing,
    make_docs,
    train_tokenizer_file,
    write_jsonl,
    write_parquet,
)
from fp8lab.cli import main
from fp8lab.data import TokenLoader, arrays, eval_batches, open_dataset, readers
from fp8lab.data.loader import IGNORE_INDEX
from fp8lab.data.prepare import prepare_dataset
from helpers import run_cli, tiny_args, tree_digest


def split_docs(rows: np.ndarray, *, eos: int, decode) -> tuple[list[str], str]:
    """Windows of one split -> (complete documents, the partial piece after the last EOS)."""
    flat = rows.reshape(-1)
    pieces = np.split(flat, np.flatnonzero(flat == eos) + 1)
    texts = [decode(p[p != eos].tolist()) for p in pieces]
    return texts[:-1], texts[-1]


def check_partition(docs: list[str], train: list[str], val: list[str]) -> None:
    """train and val are disjoint, each in corpus order, and together every document."""
    index = {d: i for i, d in enumerate(docs)}
    assert len(index) == len(docs)  # the generator makes distinct documents
    ti, vi = [index[d] for d in train], [index[d] for d in val]
    assert ti == sorted(ti) and vi == sorted(vi)
    assert not set(ti) & set(vi)


def test_jsonl_gz_byte_level_round_trip(tmp_path):
    docs = make_docs(240, seed=1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(3):
        write_jsonl(corpus / f"part-{k}.jsonl.gz", docs[k * 80 : (k + 1) * 80], gz=True)
    report = prepare_dataset(inputs=[str(corpus / "*.jsonl.gz")], out=tmp_path / "out", seq_len=64, val_fraction=0.1)
    ds = open_dataset(tmp_path / "out", verify="full")
    assert (ds.seq_len, ds.vocab_size, ds.eos_id, ds.pad_id) == (64, 257, 256, None)
    assert ds.tokenizer == {"type": "byte", "vocab_size": 257, "eos_id": 256}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["sources"]] == [str(corpus / f"part-{k}.jsonl.gz") for k in range(3)]
    assert [s["documents"] for s in manifest["sources"]] == [80, 80, 80]
    assert manifest["stats"]["train"]["documents"] + manifest["stats"]["val"]["documents"] == 240
    assert listing(tmp_path) == ["corpus", "out"]

    # A window edge may cut a character: only the partial piece at the very end can be affected.
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    train, train_tail = split_docs(all_rows(ds.path, "train"), eos=256, decode=decode)
    val, val_tail = split_docs(all_rows(ds.path, "val"), eos=256, decode=decode)
    check_partition(docs, train, val)
    # Only the final partial window of each split is dropped: everything else is there, whole.
    missing = [d for d in docs if d not in set(train) | set(val)]
    tails = [t.rstrip("\ufffd") for t in (train_tail, val_tail) if t]
    assert len(missing) <= 2 and all(any(d.startswith(t) for d in missing) for t in tails)
    # Every 10th document goes to val, so val is spread through the corpus and alike in length.
    assert manifest["stats"]["val"]["documents"] == 24 and len(val) >= 23
    assert [docs.index(d) for d in val[:3]] == [4, 14, 24]
    assert report.stats["train"]["sequences"] == len(ds.split("train")) and report.replaced == 0


def test_txt_parquet_and_jsonl_with_a_tokenizer_file(tmp_path, monkeypatch):
    docs = make_docs(90, seed=2)
    tok_path = train_tokenizer_file(tmp_path / "tok.json", make_docs(300, seed=9))
    (tmp_path / "a.txt").write_text(docs[0] + "\n" + docs[1], encoding="utf-8")  # one document per .txt file
    write_parquet(tmp_path / "b.parquet", docs[2:60], column="body", row_group_size=8)
    write_jsonl(tmp_path / "c.jsonl", docs[60:], field="content")
    # Parquet is read in record batches, never whole: count the batches the reader hands over.
    monkeypatch.setattr(readers, "CHUNK_BYTES", 2000)
    batches = list(readers.read_parquet(tmp_path / "b.parquet", column="body", decoder=readers.TextDecoder(),
                                        stats=readers.FileStats()))
    assert len(batches) >= 5 and sum(len(b.texts) for b in batches) == 58

    out = tmp_path / "out"
    prepare_dataset(inputs=[str(tmp_path / "a.txt"), str(tmp_path / "b.parquet"), str(tmp_path / "c.jsonl")],
                    out=out, tokenizer=str(tok_path), text_column="body", text_field="content", seq_len=32,
                    val_fraction=0.0)
    ds = open_dataset(out, verify="full")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()  # saved byte for byte
    assert ds.tokenizer["type"] == "huggingface" and ds.tokenizer["eos_token"] == "</s>"
    assert ds.eos_id == tok.token_to_id("</s>") and ds.vocab_size == tok.get_vocab_size()
    assert ds.tokenizer_file == out / "tokenizer.json"
    train, _ = split_docs(all_rows(out, "train"), eos=ds.eos_id, decode=tok.decode)
    expected = [docs[0] + "\n" + docs[1], *docs[2:]]
    assert train == expected[: len(train)] and len(train) >= len(expected) - 1
    assert [s["kind"] for s in ds.sources] == ["txt", "parquet", "jsonl"]
    assert len(ds.split("val")) == 0


@pytest.mark.parametrize("pack", [True, False])
def test_long_txt_files_are_read_in_chunks_as_whole_documents(tmp_path, monkeypatch, pack):
    texts = ["\n".join(make_docs(n, seed=3 + n)) for n in (30, 5, 60, 12, 45)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    outs = []
    for chunk in (97, 1 << 20):  # tiny chunks cut lines and multi-byte characters; the output must not change
        monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
        outs.append(prepare_dataset(inputs=[str(tmp_path / "*.txt")], out=tmp_path / f"o{chunk}", seq_len=16,
                                    pack=pack, val_fraction=0.3).path)
    assert tree_digest(outs[0]) == tree_digest(outs[1])
    ds = open_dataset(outs[0])
    assert [s["documents"] for s in ds.sources] == [1] * 5
    # Each file is one document, whole in one split: decoding a split gives whole files.
    got = {}
    for split in ("train", "val"):
        rows = all_rows(ds.path, split)
        flat = rows.reshape(-1) if pack else rows[rows != ds.pad_id]
        docs = [bytes(p[p != 256].astype(np.uint8)).decode() for p in np.split(flat, np.flatnonzero(flat == 256) + 1)]
        got[split] = docs[:-1]  # after the last EOS: a partial tail (packed) or nothing
    found = got["train"] + got["val"]
    assert got["val"] and got["train"] and len(set(found)) == len(found)
    assert set(found) <= set(texts)
    # Padded: every file comes back; packed: all but at most the one cut off at the end of each split.
    assert len(found) == 5 if not pack else len(found) >= 3


def test_train_tokenizer_on_the_input(tmp_path, capsys):
    docs = make_docs(150, seed=4)
    write_jsonl(tmp_path / "d.jsonl.gz", docs, gz=True)
    out = tmp_path / "out"
    rc = main(["prepare", "-i", str(tmp_path / "d.jsonl.gz"), "-o", str(out), "--train-tokenizer",
               "--vocab-size", "400", "--seq-len", "48", "--val-fraction", "0.1"])
    assert rc == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    # The closing table: documents, tokens, sequences, padding fraction, seconds; then how to train.
    for label, key in (("documents", "documents"), ("tokens", "tokens"), ("sequences", "sequences")):
        row = next(line for line in printed.splitlines() if line.strip("│ ").startswith(label))
        assert f"{stats['train'][key]:,}" in row and f"{stats['val'][key]:,}" in row
    assert "padding fraction" in printed and "seconds" in printed
    assert f"fp8lab train --data.path={out} --data.seq_len=48" in printed
    ds = open_dataset(out, verify="full")
    tok = Tokenizer.from_file(str(ds.tokenizer_file))
    assert ds.tokenizer["type"] == "bpe-trained" and 300 < ds.vocab_size <= 400
    assert ds.eos_id == 0 == tok.token_to_id("<|endoftext|>")
    train, _ = split_docs(all_rows(out, "train"), eos=0, decode=tok.decode)
    val, _ = split_docs(all_rows(out, "val"), eos=0, decode=tok.decode)
    check_partition(docs, train, val)
    assert len(val) >= 5 and len(train) >= 120
    # BPE actually merged: fewer tokens than bytes.
    assert ds.tokenizer["vocab_size"] == ds.vocab_size
    assert sum(len(d.encode()) for d in docs) > 2 * json.loads((out / "manifest.json").read_text())["stats"][
        "train"]["tokens"]


@pytest.mark.parametrize("tokenizer", ["byte", "file"])
def test_no_pack_pads_and_the_loader_masks(tmp_path, tokenizer):
    docs = make_docs(40, seed=5, max_words=40)
    docs[7] = docs[7] * 6  # longer than one window: continues in the next windows of its own
    write_jsonl(tmp_path / "d.jsonl", docs)
    tok = "byte" if tokenizer == "byte" else str(train_tokenizer_file(tmp_path / "tok.json", docs))
    report = prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "out", tokenizer=tok, seq_len=128,
                             pack=False, val_fraction=0.1)
    ds = open_dataset(tmp_path / "out", verify="full")
    if tokenizer == "byte":
        assert (ds.pad_id, ds.vocab_size) == (257, 258)
    else:
        assert ds.pad_id == Tokenizer.from_file(str(tmp_path / "tok.json")).token_to_id("<pad>")
    rows = all_rows(ds.path, "train")
    real = rows != ds.pad_id
    # Padding only at the end of a window, and every window starts a document or continues one.
    assert (np.diff(real.astype(int), axis=1) <= 0).all()
    assert report.stats["train"]["sequences"] > report.stats["train"]["documents"]  # the long document
    pad_targets = int((~real[:, 1:]).sum())
    assert pad_targets == report.stats["train"]["pad_targets"] > 0
    assert report.stats["train"]["padding_fraction"] == round(pad_targets / rows[:, 1:].size, 6)

    loader = TokenLoader(ds.split("train"), batch_size=len(rows), seed=0, shuffle=False, vocab_size=ds.vocab_size)
    inputs, targets = loader.next_batch()
    assert int((targets == IGNORE_INDEX).sum()) == pad_targets
    np.testing.assert_array_equal(targets.numpy()[real[:, 1:]], rows[:, 1:][real[:, 1:]])
    np.testing.assert_array_equal(inputs.numpy(), rows[:, :-1])  # inputs keep the pad id (a valid row)
    (x, y), = eval_batches(ds.split("val"), batch_size=len(ds.split("val")), num_batches=1)
    assert int((y == IGNORE_INDEX).sum()) == report.stats["val"]["pad_targets"]


def test_npy_2d_rows_are_kept(tmp_path):
    rng = np.random.default_rng(6)
    a = rng.integers(0, 1000, size=(61, 17), dtype=np.uint16)
    b = rng.integers(0, 1000, size=(40, 17), dtype=np.int64)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    prepare_dataset(inputs=[str(tmp_path / "*.npy")], out=tmp_path / "out", vocab_size=1000, val_fraction=0.1)
    ds = open_dataset(tmp_path / "out", verify="full")
    assert (ds.seq_len, ds.vocab_size, ds.eos_id) == (16, 1000, None)
    both = np.concatenate([a, b]).astype(np.int64)
    train, val = all_rows(ds.path, "train"), all_rows(ds.path, "val")
    assert len(val) == 10 and len(train) == 91  # round(0.1 * 101) rows, evenly spread
    keys = {r.tobytes(): i for i, r in enumerate(both)}
    ti, vi = [keys[r.tobytes()] for r in train], [keys[r.tobytes()] for r in val]
    assert sorted(ti + vi) == list(range(101)) and ti == sorted(ti)
    assert np.diff(vi).min() >= 9  # spread out, not a block at the end
    assert json.loads((ds.path / "manifest.json").read_text())["prepare"]["split_level"] == "row"


def test_npy_1d_stream_split_at_eos(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    docs = [rng.integers(1, 50, size=int(n)) for n in rng.integers(3, 40, size=60)]
    stream = np.concatenate([np.append(d, 0) for d in docs])[:-1]  # the last document has no EOS
    np.save(tmp_path / "s.npy", stream.astype(np.int32))
    outs = []
    for chunk in (11, 1 << 24):  # a document crossing a chunk edge must not change the output
        monkeypatch.setattr(arrays, "CHUNK_TOKENS", chunk)
        outs.append(prepare_dataset(inputs=[str(tmp_path / "s.npy")], out=tmp_path / f"o{chunk}", vocab_size=50,
                                    eos_id=0, seq_len=8, val_fraction=0.0).path)
    assert tree_digest(outs[0])["train_00000.bin"] == tree_digest(outs[1])["train_00000.bin"]
    rows = all_rows(outs[0], "train")
    full = np.append(stream, 0)  # EOS closes the final document
    np.testing.assert_array_equal(rows.reshape(-1), full[: rows.size])
    assert len(rows) == len(full) // 9
    assert open_dataset(outs[0]).sources[0]["documents"] == 60


def test_many_shards_hold_the_same_sequences(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", make_docs(120, seed=8))
    one = prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "one", seq_len=32,
                          val_fraction=0.1).path
    many = prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "many", seq_len=32,
                           val_fraction=0.1, shard_tokens=33 * 40).path
    manifest = json.loads((many / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]) > 3 and all(s["sequences"] <= 40 for s in manifest["splits"]["train"])
    for split in ("train", "val"):
        np.testing.assert_array_equal(all_rows(one, split), all_rows(many, split))


def prepare_cli(args: list[str]) -> None:
    assert main(["prepare", "--progress", "off", *args]) == 0


@pytest.mark.parametrize("kind", ["text", "npy"])
def test_prepare_is_reproducible_byte_for_byte(tmp_path, kind):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if kind == "text":
        docs = make_docs(200, seed=10)
        write_jsonl(inputs / "a.jsonl.gz", docs[:120], gz=True)
        write_parquet(inputs / "b.parquet", docs[120:])
        args = ["-i", str(inputs), "--train-tokenizer", "--vocab-size", "420", "--seq-len", "24",
                "--shard-tokens", "2000", "--val-fraction", "0.05"]
    else:
        np.save(inputs / "rows.npy", np.random.default_rng(11).integers(0, 70000, size=(300, 33), dtype=np.uint32))
        args = ["-i", str(inputs / "rows.npy"), "--vocab-size", "70000", "--shard-tokens", "3000"]
    prepare_cli([*args, "-o", str(tmp_path / "first")])
    prepare_cli([*args, "-o", str(tmp_path / "second")])
    first, second = tree_digest(tmp_path / "first"), tree_digest(tmp_path / "second")
    assert first == second and len([k for k in first if k.endswith(".bin")]) >= 3
    if kind == "npy":
        assert open_dataset(tmp_path / "first").split("train").shards[0].tokens.dtype == np.dtype("<u4")


def test_train_accepts_prepared_data(tmp_path):
    docs = make_docs(200, seed=12)
    write_jsonl(tmp_path / "d.jsonl.gz", docs, gz=True)
    out = tmp_path / "data"
    prepare_dataset(inputs=[str(tmp_path / "d.jsonl.gz")], out=out, seq_len=32, pack=False, val_fraction=0.1)
    run = tmp_path / "run"
    proc = run_cli(["train", "--run-dir", run, *tiny_args(data__path=out)], cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["final_eval_loss"]) and summary["steps"] == 4
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Masked padding: fewer loss tokens than positions, so the loss must still be a finite number.
    assert len(metrics) == 4 and all(np.isfinite(m["loss"]) for m in metrics)
    assert torch.tensor([m["loss"] for m in metrics]).max() < 10


def test_a_small_validation_split_is_warned_about_here_and_in_training(tmp_path, capsys):
    """A validation split smaller than a default evaluation (8 sequences x 4 batches) once made
    training evaluate on fewer batches without a word."""
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(40, seed=3))
    out = tmp_path / "out"
    assert main(["prepare", "--progress", "off", "-i", str(src), "-o", str(out), "--seq-len", "64",
                 "--val-fraction", "0.05"]) == 0
    said = capsys.readouterr().out
    assert "note: the val split holds" in said and "fewer than the 32 a default evaluation reads" in said
    val = open_dataset(out).split("val")
    assert 0 < len(val) < 32
    from fp8lab.config import load_config
    from fp8lab.train.build import build

    parts = build(load_config(None, {"data.path": str(out), "data.seq_len": "64", "train.eval_batches": "4",
                                     "data.micro_batch_size": "8"}))
    assert len(parts.eval_batches) == len(val) // 8 < 4
    assert any(f"holds {len(val)} sequences: {len(val) // 8} eval batch(es) of 8 instead of train.eval_batches=4"
               in n for n in parts.notes)
