"""Shared helpers for the config / CLI / run-directory tests (plain functions; the test
modules wrap them in fixtures). Imported as `helpers`: pytest puts tests/ on sys.path."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fp8lab.config import JobConfig, load_config
from fp8lab.data import write_dataset

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

SEQ_LEN = 32
VOCAB = 96

# The tiny run of the brief, as {key: text}: a 0.1M-parameter model, 4 steps of 4 x 32 tokens.
TINY: dict[str, str] = {
    "model.dim": "64", "model.n_layers": "2", "model.n_heads": "2", "model.n_kv_heads": "1",
    "model.ffn_dim": "128", "data.seq_len": str(SEQ_LEN), "data.micro_batch_size": "4",
    "train.steps": "4", "train.eval_batches": "1", "optim.warmup_steps": "1",
    "data.embedded_bytes": "200000", "logging.progress": "off",
}


def tiny_args(**extra: object) -> list[str]:
    """TINY (plus `extra`, keys with '__' for '.') as CLI overrides, `--train.threads=1` included."""
    values = {**TINY, "train.threads": "1", **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return [f"--{k}={v}" for k, v in values.items()]


def tiny_config(data_path: str | Path, **extra: object) -> JobConfig:
    """The tiny JobConfig on `data_path`; `extra` keys use '__' for '.', e.g. optim__lr=1e-3.

    train.threads stays 0 (torch's default): in-process runs must not change the thread
    count of the pytest process for other tests."""
    values = {**TINY, "data.path": str(data_path), **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return load_config(None, values)


# The trainer tests' base: TINY's model, 8 x 32-token micro-batches, 6 steps, no periodic
# eval or checkpoint, 2 threads (the count pytest_configure fixes for bitwise repeatability).
TRAINER_BASE: dict[str, str] = {
    **TINY, "data.micro_batch_size": "8", "train.steps": "6", "train.eval_interval": "0",
    "train.eval_batches": "2", "train.threads": "2", "optim.warmup_steps": "2", "optim.lr": "3e-3",
    "checkpoint.interval": "0",
}


def trainer_config(data_path: str | Path, **dotted: object) -> JobConfig:
    """TRAINER_BASE on `data_path`, overridden by {'section.key': value}."""
    values = {**TRAINER_BASE, "data.path": str(data_path), **{k: str(v) for k, v in dotted.items()}}
    return load_config(None, values)


def markov_tokens(rng: np.random.Generator, n: int, length: int, vocab: int) -> np.ndarray:
    """Sequences from a sparse random Markov chain: learnable, so losses fall."""
    nxt = rng.integers(0, vocab, size=(vocab, 3))
    out = np.empty((n, length), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab, size=n)
    choice = rng.integers(0, 3, size=(n, length))
    for t in range(1, length):
        out[:, t] = nxt[out[:, t - 1], choice[:, t]]
    return out


def make_token_dataset(out: Path, *, seed: int = 0) -> Path:
    """A prepared data directory of random tokens: 64 train and 8 val windows of SEQ_LEN + 1."""
    rng = np.random.default_rng(seed)
    return write_dataset(
        out,
        train=[rng.integers(0, VOCAB, size=(64, SEQ_LEN + 1), dtype=np.int64)],
        val=[rng.integers(0, VOCAB, size=(8, SEQ_LEN + 1), dtype=np.int64)],
        seq_len=SEQ_LEN, vocab_size=VOCAB, eos_id=None, tokenizer={"type": "test"}, sources=[],
    )


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`, plus every directory (as 'dir'),
    so an added, removed or changed entry shows up as a difference."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def cli_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FP8LAB"))}
    env.update(PYTHONPATH=str(SRC), FP8LAB_CACHE=str(cache), PYTHONHASHSEED="0")
    return env


def run_cli(args: list[str], *, cache: Path, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m fp8lab ARGS` in a fresh interpreter, text output captured."""
    return subprocess.run([sys.executable, "-m", "fp8lab", *map(str, args)], env=cli_env(cache),
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
