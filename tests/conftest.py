"""Shared fixtures. Tests that need exact numbers use data generated here, never the
embedded corpus (which depends on the Python version's standard library)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fp8lab.data import write_dataset
from helpers import SEQ_LEN, markov_tokens

TINY_VOCAB = 64


def pytest_configure(config):
    # Fixed thread count: CPU kernels are bitwise repeatable only for a given count.
    torch.set_num_threads(2)
    # transformers (the export/import tests) must work from local folders alone: any attempt to
    # reach the Hub is an error rather than a wait on a network this machine does not have.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    os.environ["FP8LAB_CACHE"] = str(tmp_path_factory.mktemp("fp8lab-cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A learnable token data set: 512 train and 32 val sequences of SEQ_LEN + 1."""
    rng = np.random.default_rng(1234)
    return write_dataset(
        tmp_path_factory.mktemp("data") / "tiny", train=[markov_tokens(rng, 512, SEQ_LEN + 1, TINY_VOCAB)],
        val=[markov_tokens(rng, 32, SEQ_LEN + 1, TINY_VOCAB)], seq_len=SEQ_LEN, vocab_size=TINY_VOCAB,
        eos_id=None, tokenizer={"type": "synthetic-markov"}, sources=[{"kind": "generated", "seed": 1234}],
    )
