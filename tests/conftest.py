"""Shared fixtures: a generated token data set and tiny model/config helpers.

Tests that need exact numbers use data generated here, never the embedded corpus (which
depends on the Python version's standard library)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fp8lab.config import JobConfig, load_config
from fp8lab.data import write_dataset

TINY_VOCAB = 64
TINY_SEQ = 32
# A model small enough that a CPU step takes milliseconds, with every linear dim a
# multiple of 32 so every recipe (MXFP8 included) converts all of them.
TINY_MODEL = {"model.dim": "64", "model.n_layers": "2", "model.n_heads": "2", "model.n_kv_heads": "1",
              "model.ffn_dim": "128"}


def pytest_configure(config):
    # Fixed thread count: CPU kernels are bitwise repeatable only for a given count.
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    os.environ["FP8LAB_CACHE"] = str(tmp_path_factory.mktemp("fp8lab-cache"))


def markov_tokens(rng: np.random.Generator, n: int, length: int, vocab: int) -> np.ndarray:
    """Sequences from a sparse random Markov chain: learnable, so losses fall."""
    nxt = rng.integers(0, vocab, size=(vocab, 3))
    out = np.empty((n, length), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab, size=n)
    choice = rng.integers(0, 3, size=(n, length))
    for t in range(1, length):
        out[:, t] = nxt[out[:, t - 1], choice[:, t]]
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    rng = np.random.default_rng(1234)
    out = tmp_path_factory.mktemp("data") / "tiny"
    return write_dataset(
        out, train=[markov_tokens(rng, 512, TINY_SEQ + 1, TINY_VOCAB)],
        val=[markov_tokens(rng, 32, TINY_SEQ + 1, TINY_VOCAB)], seq_len=TINY_SEQ, vocab_size=TINY_VOCAB,
        eos_id=None, tokenizer={"type": "synthetic-markov"}, sources=[{"kind": "generated", "seed": 1234}],
    )


def tiny_config(data_path, **overrides) -> JobConfig:
    """A JobConfig for the tiny model on `data_path`; overrides as {'section.key': value}."""
    base = {
        **TINY_MODEL, "data.path": str(data_path), "data.seq_len": str(TINY_SEQ), "data.micro_batch_size": "8",
        "train.steps": "6", "train.eval_interval": "0", "train.eval_batches": "2", "train.threads": "2",
        "optim.warmup_steps": "2", "optim.lr": "3e-3", "checkpoint.interval": "0", "logging.progress": "off",
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return load_config(None, base)
