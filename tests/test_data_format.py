"""Shard format, data directories and the embedded corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fp8lab.data import (
    BYTE_EOS_ID,
    byte_detokenize,
    byte_tokenize,
    embedded_dataset,
    open_dataset,
    open_shard,
    sha256_file,
    write_dataset,
    write_shard,
)
from fp8lab.data.shards import HEADER_BYTES
from fp8lab.errors import FP8LabError

EMPTY_META = {"tokenizer": {}, "sources": []}


def tokens(n: int, seq_len: int, *, vocab: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len + 1), dtype=np.int64)


def make_dataset(root: Path, *, seq_len: int = 8) -> Path:
    return write_dataset(
        root / "ds",
        train=[tokens(30, seq_len, seed=1), tokens(20, seq_len, seed=2)],
        val=[tokens(7, seq_len, seed=3)],
        seq_len=seq_len,
        vocab_size=1000,
        eos_id=0,
        tokenizer={"type": "test"},
        sources=[{"kind": "random"}],
    )


def test_shard_round_trip(tmp_path):
    data = tokens(13, 16)
    info = write_shard(tmp_path / "a.bin", data, vocab_size=1000, eos_id=7)
    path = tmp_path / "a.bin"
    assert info == {"file": "a.bin", "sequences": 13, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    assert info["bytes"] == HEADER_BYTES + 13 * 17 * 2
    assert not (tmp_path / "a.bin.tmp").exists()
    shard = open_shard(path)
    assert (shard.seq_len, shard.count, shard.vocab_size, shard.eos_id) == (16, 13, 1000, 7)
    assert shard.tokens.dtype == np.dtype("<u2") and shard.tokens.shape == (13, 17)
    assert not shard.tokens.flags.writeable
    np.testing.assert_array_equal(shard.tokens, data)


def test_uint32_for_large_vocab_and_no_eos(tmp_path):
    data = tokens(4, 5, vocab=70000)
    data[0, 0] = 69999
    info = write_shard(tmp_path / "big.bin", data, vocab_size=70000, eos_id=None)
    assert info["bytes"] == HEADER_BYTES + 4 * 6 * 4
    shard = open_shard(tmp_path / "big.bin")
    assert shard.tokens.dtype == np.dtype("<u4") and shard.eos_id is None
    np.testing.assert_array_equal(shard.tokens, data)


@pytest.mark.parametrize(
    "bad",
    [
        np.full((2, 5), 1000),  # id == vocab_size
        np.full((2, 5), -1),
        np.zeros(10, dtype=np.int64),  # 1-D
        np.zeros((2, 5), dtype=np.float32),
        np.zeros((2, 1), dtype=np.int64),  # no room for a target
    ],
)
def test_write_shard_rejects_bad_tokens(tmp_path, bad):
    with pytest.raises(FP8LabError, match="bad.bin"):
        write_shard(tmp_path / "bad.bin", bad, vocab_size=1000, eos_id=None)
    assert list(tmp_path.iterdir()) == []


def test_out_of_vocab_message_names_the_id(tmp_path):
    data = tokens(3, 4)
    data[1, 2] = 1234
    with pytest.raises(FP8LabError, match=r"token id 1234 .*\[0, 1000\)"):
        write_shard(tmp_path / "x.bin", data, vocab_size=1000, eos_id=None)


def test_truncated_and_padded_shards(tmp_path):
    path = tmp_path / "t.bin"
    info = write_shard(path, tokens(10, 8), vocab_size=1000, eos_id=None)
    with open(path, "r+b") as f:
        f.truncate(info["bytes"] - 3)
    with pytest.raises(FP8LabError, match=rf"t\.bin truncated.*{info['bytes'] - 3} bytes.*needs {info['bytes']}"):
        open_shard(path)
    with open(path, "r+b") as f:
        f.truncate(info["bytes"] + 2)
    with pytest.raises(FP8LabError, match=r"t\.bin has extra bytes"):
        open_shard(path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(FP8LabError, match=r"t\.bin is 100 bytes, shorter than its 256-byte header"):
        open_shard(path)


def test_wrong_magic_and_missing_shard(tmp_path):
    path = tmp_path / "m.bin"
    write_shard(path, tokens(2, 4), vocab_size=1000, eos_id=None)
    raw = bytearray(path.read_bytes())
    raw[:8] = b"NOTMAGIC"
    path.write_bytes(bytes(raw))
    with pytest.raises(FP8LabError, match=r"m\.bin is not an fp8lab token shard"):
        open_shard(path)
    with pytest.raises(FP8LabError, match=r"nope\.bin not found: check `data.path`"):
        open_shard(tmp_path / "nope.bin")


def test_dataset_round_trip(tmp_path):
    path = make_dataset(tmp_path)
    manifest_text = (path / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest_text.startswith("{\n  ") and list(manifest) == sorted(manifest)
    assert manifest["format"] == "fp8lab-tokens" and manifest["version"] == 1
    assert [s["file"] for s in manifest["splits"]["train"]] == ["train_00000.bin", "train_00001.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary directory left

    ds = open_dataset(path, verify="full")
    assert (ds.seq_len, ds.vocab_size, ds.eos_id, ds.tokenizer) == (8, 1000, 0, {"type": "test"})
    train, val = ds.split("train"), ds.split("val")
    assert (len(train), len(val)) == (50, 7)
    everything = np.concatenate([tokens(30, 8, seed=1), tokens(20, 8, seed=2)])
    idx = np.array([49, 0, 29, 30, 31, 5, 29])
    np.testing.assert_array_equal(train.gather(idx), everything[idx])
    np.testing.assert_array_equal(val.gather(np.array([6, 0])), tokens(7, 8, seed=3)[[6, 0]])
    with pytest.raises(IndexError):
        train.gather(np.array([50]))
    with pytest.raises(FP8LabError, match=r"no split 'test'; available: train, val"):
        ds.split("test")


def test_empty_split(tmp_path):
    path = write_dataset(
        tmp_path / "d", train=[tokens(3, 4)], val=[], seq_len=4, vocab_size=1000, eos_id=None, **EMPTY_META
    )
    val = open_dataset(path).split("val")
    assert len(val) == 0 and val.gather(np.array([], dtype=np.int64)).shape == (0, 5)


def test_write_dataset_refuses_existing_and_cleans_up(tmp_path):
    path = make_dataset(tmp_path)
    with pytest.raises(FP8LabError, match="ds already exists and is not empty"):
        make_dataset(tmp_path)
    # A failure midway leaves neither the output nor the temporary directory behind.
    bad = [np.full((2, 5), 5000)]
    with pytest.raises(FP8LabError, match="val_00000.bin"):
        write_dataset(
            tmp_path / "other", train=[tokens(3, 4)], val=bad, seq_len=4, vocab_size=1000, eos_id=None, **EMPTY_META
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(FP8LabError, match="windows of 5 tokens, expected seq_len"):
        write_dataset(
            tmp_path / "w", train=[tokens(3, 4)], val=[], seq_len=8, vocab_size=1000, eos_id=None, **EMPTY_META
        )
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine to write into
    out = write_dataset(
        tmp_path / "empty", train=[tokens(3, 4)], val=[], seq_len=4, vocab_size=1000, eos_id=None, **EMPTY_META
    )
    assert len(open_dataset(out).split("train")) == 3
    assert len(open_dataset(path).split("train")) == 50


def test_open_dataset_bad_directories(tmp_path):
    with pytest.raises(FP8LabError, match=r"missing not found: check `data.path`"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "nomani").mkdir()
    with pytest.raises(FP8LabError, match=r"nomani has no manifest\.json"):
        open_dataset(tmp_path / "nomani")
    path = make_dataset(tmp_path)
    manifest = path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[:-20])
    with pytest.raises(FP8LabError, match=r"manifest\.json is not valid JSON"):
        open_dataset(path)
    manifest.write_text(good.replace('"fp8lab-tokens"', '"other"'))
    with pytest.raises(FP8LabError, match=r"manifest\.json has format 'other'"):
        open_dataset(path)
    manifest.write_text(good)
    with pytest.raises(FP8LabError, match="verify must be"):
        open_dataset(path, verify="none")


def test_shard_not_matching_manifest(tmp_path):
    path = make_dataset(tmp_path)
    # A valid shard, but not the one the manifest describes.
    write_shard(path / "train_00001.bin", tokens(21, 8, seed=2), vocab_size=1000, eos_id=0)
    with pytest.raises(FP8LabError, match=r"train_00001\.bin does not match .*sequence count is 21, manifest says 20"):
        open_dataset(path)
    write_shard(path / "train_00001.bin", tokens(20, 9, seed=2), vocab_size=1000, eos_id=0)
    with pytest.raises(FP8LabError, match=r"train_00001\.bin does not match .*seq_len is 9"):
        open_dataset(path)
    (path / "train_00001.bin").unlink()
    with pytest.raises(FP8LabError, match=r"train_00001\.bin not found"):
        open_dataset(path)


def test_verify_full_catches_changed_bytes(tmp_path):
    path = make_dataset(tmp_path)
    shard = path / "val_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    assert len(open_dataset(path, verify="size").split("val")) == 7  # same size: only a checksum sees it
    with pytest.raises(FP8LabError, match=r"val_00000\.bin changed: sha256"):
        open_dataset(path, verify="full")


def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return 'é'\n".encode()
    ids = byte_tokenize(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert byte_detokenize(ids) == text
    with_eos = np.concatenate([[BYTE_EOS_ID], ids, [BYTE_EOS_ID], ids])
    assert byte_detokenize(with_eos, eos=b"|") == b"|" + text + b"|" + text
    with pytest.raises(FP8LabError, match="token id 257"):
        byte_detokenize([1, 257])


def test_embedded_corpus(tmp_path):
    path = embedded_dataset(seq_len=128, byte_budget=200_000, cache_dir=tmp_path)
    ds = open_dataset(path, verify="full")
    assert (ds.vocab_size, ds.eos_id) == (257, 256)
    assert ds.tokenizer == {"type": "byte", "vocab_size": 257, "eos_id": 256}
    source = ds.sources[0]
    assert source["kind"] == "python-stdlib" and 0 < source["bytes"] <= 200_000
    train, val = ds.split("train"), ds.split("val")
    assert len(train) > 10 * len(val) > 0
    train_rows = train.gather(np.arange(len(train)))
    val_rows = val.gather(np.arange(len(val)))
    text = byte_detokenize(train_rows.reshape(-1), eos=b"\n")
    assert b"def " in text and b"import " in text
    # Real UTF-8 source: only a window edge cutting a multi-byte character may fail to decode.
    assert text.decode("utf-8", errors="replace").count("\ufffd") < len(train)
    assert b"def " in byte_detokenize(val_rows.reshape(-1))
    assert not {r.tobytes() for r in val_rows} & {r.tobytes() for r in train_rows}

    # The second call reuses the cache; a concurrent builder with the same parameters agrees.
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert embedded_dataset(seq_len=128, byte_budget=200_000, cache_dir=tmp_path) == path
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    assert embedded_dataset(seq_len=64, byte_budget=200_000, cache_dir=tmp_path) != path


def test_concurrent_corpus_builders(tmp_path):
    code = (
        "import sys; from pathlib import Path; from fp8lab.data import embedded_dataset; "
        "print(embedded_dataset(seq_len=32, byte_budget=100_000, cache_dir=Path(sys.argv[1])))"
    )
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.decode().strip() for out, _ in outs}
    assert len(paths) == 1
    (path,) = paths
    open_dataset(path, verify="full")
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]  # no temporary leftovers
