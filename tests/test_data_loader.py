"""TokenLoader and eval_batches: determinism, rank sharding, resume and the vocab check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fp8lab.data import TokenLoader, eval_batches, open_dataset, write_dataset
from fp8lab.errors import FP8LabError

SEQ_LEN = 8


def make_split(root: Path, n: int, *, vocab: int = 1000, shards: int = 2, name: str = "ds"):
    """A train split whose row i starts with token i, spread over `shards` files."""
    rows = np.random.default_rng(0).integers(0, vocab, size=(n, SEQ_LEN + 1), dtype=np.int64)
    rows[:, 0] = np.arange(n)
    path = write_dataset(
        root / name,
        train=np.array_split(rows, shards),
        val=[rows[:3]],
        seq_len=SEQ_LEN,
        vocab_size=vocab,
        eos_id=None,
        tokenizer={"type": "test"},
        sources=[],
    )
    return open_dataset(path).split("train"), rows


def ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return batch[0][:, 0].tolist()


def test_batches_are_shifted_windows(tmp_path):
    split, rows = make_split(tmp_path, 100)
    loader = TokenLoader(split, batch_size=4, seed=0)
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == "cpu"
    assert inputs.is_contiguous()
    windows = rows[ids((inputs, targets))]
    np.testing.assert_array_equal(inputs.numpy(), windows[:, :-1])
    np.testing.assert_array_equal(targets.numpy(), windows[:, 1:])


def test_same_seed_same_batches_other_seed_differs(tmp_path):
    split, _ = make_split(tmp_path, 100)
    a, b, c = (TokenLoader(split, batch_size=5, seed=s) for s in (3, 3, 4))
    seq_a = [ids(a.next_batch()) for _ in range(30)]
    assert seq_a == [ids(b.next_batch()) for _ in range(30)]
    assert seq_a != [ids(c.next_batch()) for _ in range(30)]
    assert TokenLoader(split, batch_size=5, seed=0, shuffle=False).next_batch()[0][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_epoch_covers_split_once_across_ranks(tmp_path):
    split, _ = make_split(tmp_path, 100)
    loaders = [TokenLoader(split, batch_size=5, seed=7, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].batches_per_epoch == 10
    for epoch in range(2):
        served = [i for loader in loaders for _ in range(10) for i in ids(loader.next_batch())]
        assert sorted(served) == list(range(100)), f"epoch {epoch}"
        assert all(loader.state_dict() == {"epoch": epoch, "position": 10} for loader in loaders)
    # With an uneven split the tail is dropped, but nothing is served twice.
    split, _ = make_split(tmp_path, 103, name="odd")
    loaders = [TokenLoader(split, batch_size=5, seed=7, rank=r, world_size=2) for r in range(2)]
    served = [i for loader in loaders for _ in range(loader.batches_per_epoch) for i in ids(loader.next_batch())]
    assert len(served) == len(set(served)) == 100


def test_epochs_reshuffle(tmp_path):
    split, _ = make_split(tmp_path, 20)
    loader = TokenLoader(split, batch_size=20, seed=0)
    first, second = ids(loader.next_batch()), ids(loader.next_batch())
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    assert loader.state_dict() == {"epoch": 1, "position": 1}


def test_resume_across_epoch_boundary(tmp_path):
    split, _ = make_split(tmp_path, 95)
    for k in (0, 3, 7, 9, 10, 12):
        reference = TokenLoader(split, batch_size=9, seed=1)
        assert reference.batches_per_epoch == 10
        for _ in range(k):
            reference.next_batch()
        state = reference.state_dict()
        resumed = TokenLoader(split, batch_size=9, seed=1)
        resumed.load_state_dict(dict(state))
        for _ in range(15):
            a, b = reference.next_batch(), resumed.next_batch()
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"resumed after {k} batches"


def test_resume_with_ranks(tmp_path):
    split, _ = make_split(tmp_path, 100)
    reference = TokenLoader(split, batch_size=4, seed=5, rank=1, world_size=2)
    for _ in range(17):
        reference.next_batch()
    resumed = TokenLoader(split, batch_size=4, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(reference.state_dict())
    assert [ids(reference.next_batch()) for _ in range(12)] == [ids(resumed.next_batch()) for _ in range(12)]


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"epoch": 0}, "exactly the keys"),
        ({"epoch": 0, "position": 0, "seed": 1}, "exactly the keys"),
        ([0, 0], "exactly the keys"),
        ({"epoch": -1, "position": 0}, "epoch must be"),
        ({"epoch": 0, "position": 11}, r"position must be an integer in \[0, 10\]"),
        ({"epoch": 0, "position": True}, "position must be"),
        ({"epoch": 0.5, "position": 0}, "epoch must be"),
    ],
)
def test_load_state_dict_validates(tmp_path, state, match):
    split, _ = make_split(tmp_path, 100)
    loader = TokenLoader(split, batch_size=10, seed=0)
    with pytest.raises(FP8LabError, match=match):
        loader.load_state_dict(state)


def test_bad_arguments(tmp_path):
    split, _ = make_split(tmp_path, 10)
    with pytest.raises(FP8LabError, match=r"has 10 sequences but one step needs 12 \(batch_size 6 x world_size 2\)"):
        TokenLoader(split, batch_size=6, seed=0, world_size=2)
    with pytest.raises(FP8LabError, match="rank must be"):
        TokenLoader(split, batch_size=1, seed=0, rank=2, world_size=2)
    with pytest.raises(FP8LabError, match="batch_size must be"):
        TokenLoader(split, batch_size=0, seed=0)
    with pytest.raises(FP8LabError, match="seed must be"):
        TokenLoader(split, batch_size=1, seed=-1)


def test_vocab_check(tmp_path):
    split, rows = make_split(tmp_path, 40, vocab=1000)
    top = int(rows.max())
    assert top >= 500
    loader = TokenLoader(split, batch_size=40, seed=0, vocab_size=500)
    with pytest.raises(FP8LabError, match=rf"{split.path}.*token id {top} but the model's vocab_size is 500"):
        loader.next_batch()
    assert loader.state_dict() == {"epoch": 0, "position": 0}  # the bad batch was not counted as served
    ok = TokenLoader(split, batch_size=40, seed=0, vocab_size=1000)
    assert ok.next_batch()[0].shape == (40, SEQ_LEN)


def test_eval_batches_are_fixed(tmp_path):
    split, rows = make_split(tmp_path, 23, shards=3)
    batches = eval_batches(split, batch_size=5, num_batches=3)
    assert [ids(b) for b in batches] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    for i, (inputs, targets) in enumerate(batches):
        np.testing.assert_array_equal(inputs.numpy(), rows[i * 5 : i * 5 + 5, :-1])
        np.testing.assert_array_equal(targets.numpy(), rows[i * 5 : i * 5 + 5, 1:])
    again = eval_batches(split, batch_size=5, num_batches=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    assert len(eval_batches(split, batch_size=5, num_batches=100)) == 4  # only whole batches
    assert len(eval_batches(split, batch_size=23, num_batches=2)) == 1
    with pytest.raises(FP8LabError, match="has 23 sequences, fewer than one eval batch of 24"):
        eval_batches(split, batch_size=24, num_batches=1)
