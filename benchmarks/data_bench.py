"""Data-path throughput: the loader against a bare np.memmap loop, and `prepare` against a bare
`tokenizers` encode_batch, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/data_bench.py [--sequences 1660000] [--results FILE]

Loader: random (64, 512) batches from a synthetic 1.66M x 513 uint16 dataset (1.7 GB, the
size of our first user's data) with a warm page cache, next to a bare loop doing the same
work (fancy-index gather from one np.memmap, int64 conversion, input/target split); then the
loader again after dropping the shard from the page cache (posix_fadvise DONTNEED; reported,
not gated). Goal: loader/bare >= 0.7 and >= 200M tokens/s.

Prepare: MB of document text per second through `prepare_dataset` (read JSONL, tokenize,
pack, write and checksum shards) with the byte-level and with a BPE tokenizer, next to a bare
`Tokenizer.encode_batch` over the same texts already in memory. Goal: BPE prepare/bare >= 0.7.
The text is this Python's standard library source (real text, no download), cycled to size.
Each figure is the best of --repeats runs: the machine may be shared, and the best run is the
one least disturbed by others.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from fp8lab.data import TokenLoader, open_dataset
from fp8lab.data.corpus import stdlib_files, stdlib_root
from fp8lab.data.dataset import DatasetWriter, Split
from fp8lab.data.prepare import prepare_dataset
from fp8lab.data.shards import HEADER_BYTES, Shard
from fp8lab.data.tokenizer import train_bpe

VOCAB = 50257  # GPT-2's: uint16 on disk, as our user's data
BATCH, SEQ = 64, 512


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {p: importlib.metadata.version(p) for p in ("numpy", "torch", "tokenizers", "pyarrow")}
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(mem, 1), "python": platform.python_version(),
            **versions}


def synthetic(path: Path, *, sequences: int) -> Path:
    """A 1-shard dataset of random ids (what `prepare` writes for this size), reused across runs."""
    if (path / "manifest.json").exists():
        ds = open_dataset(path)
        if len(ds.split("train")) == sequences:
            return path
        shutil.rmtree(path)
    need = sequences * (SEQ + 1) * 2 * 1.05
    free = shutil.disk_usage(path.parent).free
    if free < need:
        sys.exit(f"need {need / 1e9:.1f} GB free in {path.parent}, have {free / 1e9:.1f}; lower --sequences")
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with DatasetWriter(path, seq_len=SEQ, vocab_size=VOCAB, eos_id=VOCAB - 1) as w:
        stream = w.open_shard("train")
        for start in range(0, sequences, 100_000):
            n = min(100_000, sequences - start)
            stream.append(rng.integers(0, VOCAB, size=(n, SEQ + 1), dtype=np.uint16))
        w.close_shard("train", stream)
        w.add_shard("val", rng.integers(0, VOCAB, size=(256, SEQ + 1), dtype=np.uint16))
        w.finish(tokenizer={"type": "synthetic"}, sources=[{"kind": "random", "seed": 0}])
    print(f"wrote {path} ({sequences:,} x {SEQ + 1}) in {time.perf_counter() - t:.1f} s")
    return path


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def drop_cache(path: Path) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def time_loader(loader: TokenLoader, batches: int) -> float:
    t = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches * BATCH * SEQ / (time.perf_counter() - t)


def time_bare(mm: np.ndarray, perm: np.ndarray, start: int, batches: int) -> float:
    t = time.perf_counter()
    for i in range(start, start + batches):
        w = mm[perm[i * BATCH : (i + 1) * BATCH]]
        torch.from_numpy(w[:, :-1].astype(np.int64)), torch.from_numpy(w[:, 1:].astype(np.int64))
    return batches * BATCH * SEQ / (time.perf_counter() - t)


def bench_loader(path: Path, *, batches: int, repeats: int, cold_batches: int) -> dict:
    # Cold first: posix_fadvise cannot evict pages a live mapping holds, so every memmap of the
    # shard is dropped (and collected) before the cache is, and each cold run maps it afresh.
    split = open_dataset(path).split("train")
    (shard,) = split.shards
    shard_path, n = shard.path, len(split)
    del split, shard
    gc.collect()
    drop_cache(shard_path)
    loader = TokenLoader(open_dataset(path).split("train"), batch_size=BATCH, seed=1, vocab_size=50304)
    cold = time_loader(loader, cold_batches)
    del loader
    gc.collect()
    drop_cache(shard_path)
    mm = np.memmap(shard_path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n, SEQ + 1))
    cold_bare = time_bare(mm, np.random.default_rng([1, 0]).permutation(n), 0, cold_batches)

    warm(shard_path)
    perm = np.random.default_rng([0, 0]).permutation(n)  # the loader's epoch-0 order for seed 0
    loader = TokenLoader(open_dataset(path).split("train"), batch_size=BATCH, seed=0, vocab_size=50304)
    time_loader(loader, 50)
    # The same rows seen as 9 shards of ~100M tokens (llm.c's size; `--shard-tokens 100000000`):
    # slices of the one memmap, so only the loader's per-shard gather differs.
    split = open_dataset(path).split("train")
    one = split.shards[0]
    cuts = np.linspace(0, n, 10).astype(int)
    sharded = Split(name="train", path=path, seq_len=SEQ, vocab_size=VOCAB, shards=[
        Shard(path=one.path, seq_len=SEQ, count=int(b - a), vocab_size=VOCAB, eos_id=one.eos_id, tokens=one.tokens[a:b])
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    multi = TokenLoader(sharded, batch_size=BATCH, seed=0, vocab_size=50304)
    loader_runs, bare_runs, multi_runs = [], [], []
    for r in range(repeats):  # interleaved, so a noisy neighbour hits all alike
        loader_runs.append(time_loader(loader, batches))
        bare_runs.append(time_bare(mm, perm, (r * batches) % max(1, n // BATCH - batches), batches))
        multi_runs.append(time_loader(multi, batches))
    return {"loader": max(loader_runs), "bare": max(bare_runs), "loader_runs": loader_runs, "bare_runs": bare_runs,
            "multi": max(multi_runs), "multi_runs": multi_runs,
            "cold_loader": cold, "cold_bare": cold_bare, "batches": batches, "cold_batches": cold_batches}


def bench_prepare(work: Path, *, text_mb: float, repeats: int) -> dict:
    from tokenizers import Tokenizer

    root = stdlib_root()
    base = [(root / rel).read_text(encoding="utf-8", errors="replace") for rel, _ in stdlib_files(byte_budget=10**9)]
    docs, size, i = [], 0, 0
    while size < text_mb * 1e6:
        docs.append(base[i % len(base)])
        size += len(docs[-1].encode())
        i += 1
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok_path = work / "bpe-16k.json"
    t = time.perf_counter()
    tok_path.write_bytes(train_bpe(texts=base[: len(base) // 3], vocab_size=16384).json_bytes)
    train_s = time.perf_counter() - t
    tok = Tokenizer.from_file(str(tok_path))

    def bare(encode) -> float:
        t, chunk, csize = time.perf_counter(), [], 0
        for d in docs:  # same ~4 MB batches as the reader hands the tokenizer
            chunk.append(d)
            csize += len(d)
            if csize >= 4 << 20:
                encode(chunk, add_special_tokens=False)
                chunk, csize = [], 0
        if chunk:
            encode(chunk, add_special_tokens=False)
        return size / (time.perf_counter() - t) / 1e6

    def prep(tokenizer: str) -> tuple[float, float]:
        out = work / "prepared"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        rep = prepare_dataset(inputs=[str(corpus)], out=out, tokenizer=tokenizer, seq_len=SEQ, val_fraction=0.01)
        dt = time.perf_counter() - t
        shutil.rmtree(out)
        return size / dt / 1e6, (rep.stats["train"]["tokens"] + rep.stats["val"]["tokens"]) / dt / 1e6

    runs = {"bare": [], "bare_fast": [], "bpe": [], "byte": []}
    for _ in range(repeats):
        runs["bare"].append(bare(tok.encode_batch))
        runs["bare_fast"].append(bare(tok.encode_batch_fast))  # what prepare calls: no offsets
        runs["bpe"].append(prep(str(tok_path)))
        runs["byte"].append(prep("byte"))
    best = {k: max(v) for k, v in runs.items()}
    return {"text_mb": size / 1e6, "documents": len(docs), "bpe_train_s": train_s, "bare": best["bare"],
            "bare_fast": best["bare_fast"],
            "bpe": best["bpe"], "byte": best["byte"], "runs": runs}


def report(m: dict, ld: dict, pr: dict, sequences: int) -> str:
    ratio = ld["loader"] / ld["bare"]
    pratio = pr["bpe"][0] / pr["bare"]
    lines = [
        f"# Data path on CPU, {date.today().isoformat()}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, no GPU; shared with other jobs, so "
        "each figure is the best of the interleaved repeats.",
        f"Versions: Python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, tokenizers {m['tokenizers']}, "
        f"pyarrow {m['pyarrow']}.",
        "Command: `PYTHONPATH=src .venv/bin/python benchmarks/data_bench.py --results <this file>`",
        "",
        f"## Loader: random ({BATCH}, {SEQ}) batches, {sequences:,} x {SEQ + 1} uint16 (one shard)",
        "",
        "| | tokens/s | |",
        "|---|---:|---|",
        f"| TokenLoader, warm cache | {ld['loader'] / 1e6:,.0f}M | best of {len(ld['loader_runs'])} x "
        f"{ld['batches']} batches |",
        f"| bare np.memmap loop, warm cache | {ld['bare'] / 1e6:,.0f}M | same batches |",
        f"| TokenLoader, the same rows as 9 shards, warm | {ld['multi'] / 1e6:,.0f}M | "
        f"{ld['multi'] / ld['bare']:.2f}x bare: one gather per shard in a batch |",
        f"| TokenLoader, cold cache | {ld['cold_loader'] / 1e6:,.1f}M | {ld['cold_batches']} batches after "
        "posix_fadvise(DONTNEED) |",
        f"| bare loop, cold cache | {ld['cold_bare'] / 1e6:,.1f}M | same |",
        "",
        f"`loader/bare = {ratio:.2f}x` (goal >= 0.7x: {'met' if ratio >= 0.7 else 'NOT met'}); "
        f"{ld['loader'] / 1e6:,.0f}M tokens/s (goal >= 200M: {'met' if ld['loader'] >= 200e6 else 'NOT met'}).",
        "",
        f"## Prepare: {pr['text_mb']:.1f} MB of text ({pr['documents']:,} JSONL documents, stdlib source)",
        "",
        "| | MB text/s | M tokens/s |",
        "|---|---:|---:|",
        f"| bare `Tokenizer.encode_batch` (BPE 16k, texts in memory) | {pr['bare']:.2f} | |",
        f"| bare `Tokenizer.encode_batch_fast` (no offsets; what prepare calls) | {pr['bare_fast']:.2f} | |",
        f"| `prepare` with that BPE tokenizer.json | {pr['bpe'][0]:.2f} | {pr['bpe'][1]:.2f} |",
        f"| `prepare` byte-level | {pr['byte'][0]:.2f} | {pr['byte'][1]:.2f} |",
        "",
        f"`prepare/bare = {pratio:.2f}x` for BPE (goal >= 0.7x: {'met' if pratio >= 0.7 else 'NOT met'}); "
        f"against encode_batch_fast {pr['bpe'][0] / pr['bare_fast']:.2f}x. "
        f"Training the 16k BPE on a third of the text took {pr['bpe_train_s']:.1f} s.",
        "",
        "Raw runs (M tokens/s, MB/s): " + json.dumps({"loader": [round(x / 1e6) for x in ld["loader_runs"]],
                                                  "bare": [round(x / 1e6) for x in ld["bare_runs"]],
                                                  "loader_9_shards": [round(x / 1e6) for x in ld["multi_runs"]],
                                                  "prepare": {k: [round(v if isinstance(v, float) else v[0], 2)
                                                                  for v in vs] for k, vs in pr["runs"].items()}}),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=1_660_000, help="synthetic dataset rows (default 1.66M)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/fp8lab-data-bench"), help="scratch directory")
    p.add_argument("--batches", type=int, default=3000, help="timed batches per loader run")
    p.add_argument("--cold-batches", type=int, default=1000, help="timed batches with a cold cache")
    p.add_argument("--text-mb", type=float, default=8.0, help="MB of text for the prepare benchmark")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, help="also write the markdown report here")
    p.add_argument("--keep", action="store_true", help="keep the 1.7 GB synthetic dataset for the next run")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    m = machine()
    data = synthetic(args.dir / f"synthetic-{args.sequences}", sequences=args.sequences)
    ld = bench_loader(data, batches=args.batches, repeats=args.repeats, cold_batches=args.cold_batches)
    print(f"loader {ld['loader'] / 1e6:,.0f}M tokens/s, bare {ld['bare'] / 1e6:,.0f}M; "
          f"loader/bare = {ld['loader'] / ld['bare']:.2f}x; cold {ld['cold_loader'] / 1e6:,.1f}M tokens/s")
    pr = bench_prepare(args.dir, text_mb=args.text_mb, repeats=args.repeats)
    print(f"prepare BPE {pr['bpe'][0]:.2f} MB/s, byte {pr['byte'][0]:.2f} MB/s, bare encode_batch {pr['bare']:.2f} "
          f"MB/s; prepare/bare = {pr['bpe'][0] / pr['bare']:.2f}x")
    text = report(m, ld, pr, args.sequences)
    print(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
    if not args.keep:
        shutil.rmtree(data)


if __name__ == "__main__":
    main()
