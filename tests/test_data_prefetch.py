"""TokenLoader options for GPU runs: background prefetch gives exactly the synchronous batches,
resumes exactly, shards ranks without overlap; pinned memory needs CUDA."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from fp8lab.data import TokenLoader, open_dataset, write_dataset
from fp8lab.errors import FP8LabError

SEQ_LEN = 8


@pytest.fixture
def split(tmp_path):
    rows = np.random.default_rng(0).integers(0, 1000, size=(97, SEQ_LEN + 1), dtype=np.int64)
    rows[:, 0] = np.arange(97)  # row i starts with token i
    path = write_dataset(tmp_path / "ds", train=np.array_split(rows, 3), val=[rows[:4]], seq_len=SEQ_LEN,
                         vocab_size=1000, eos_id=None, tokenizer={"type": "test"}, sources=[])
    return open_dataset(path).split("train")


def ids(batch) -> list[int]:
    return batch[0][:, 0].tolist()


def prefetch_threads() -> int:
    return sum(t.name == "fp8lab-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetch_serves_the_synchronous_batches(split):
    sync = TokenLoader(split, batch_size=8, seed=3)
    ahead = TokenLoader(split, batch_size=8, seed=3, prefetch=3)
    assert sync.batches_per_epoch == 12
    for _ in range(30):  # two and a half epochs
        a, b = sync.next_batch(), ahead.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert sync.state_dict() == ahead.state_dict()
    assert ahead.state_dict() == {"epoch": 2, "position": 6}
    ahead.close()
    assert prefetch_threads() == 0


@pytest.mark.parametrize("k", [5, 12, 17])
def test_prefetch_resume_across_the_epoch_boundary(split, k):
    reference = TokenLoader(split, batch_size=8, seed=1)
    interrupted = TokenLoader(split, batch_size=8, seed=1, prefetch=2)
    for _ in range(k):
        reference.next_batch()
        interrupted.next_batch()
    state = interrupted.state_dict()  # what a checkpoint holds: served batches, not the ones computed ahead
    interrupted.close()
    resumed = TokenLoader(split, batch_size=8, seed=1, prefetch=2)
    resumed.load_state_dict(state)
    assert [ids(reference.next_batch()) for _ in range(15)] == [ids(resumed.next_batch()) for _ in range(15)]
    # Loading a state into a running prefetcher drops what it had computed ahead.
    resumed.load_state_dict(state)
    replay = TokenLoader(split, batch_size=8, seed=1)
    replay.load_state_dict(state)
    assert [ids(replay.next_batch()) for _ in range(4)] == [ids(resumed.next_batch()) for _ in range(4)]
    resumed.close()


def test_two_ranks_with_prefetch_never_overlap(split):
    loaders = [TokenLoader(split, batch_size=6, seed=9, rank=r, world_size=2, prefetch=2) for r in range(2)]
    per_epoch = loaders[0].batches_per_epoch
    assert per_epoch == 8  # 97 // 2 = 48 per rank, 8 batches of 6
    for _epoch in range(2):
        served = [[i for _ in range(per_epoch) for i in ids(loader.next_batch())] for loader in loaders]
        assert not set(served[0]) & set(served[1])
        assert len(set(served[0]) | set(served[1])) == 96
    for loader in loaders:
        loader.close()


def test_prefetch_vocab_error_reaches_the_caller_and_nothing_is_counted(split):
    loader = TokenLoader(split, batch_size=97, seed=0, vocab_size=500, prefetch=2)
    with pytest.raises(FP8LabError, match=r"contains token id \d+ but the model's vocab_size is 500"):
        loader.next_batch()
    assert loader.state_dict() == {"epoch": 0, "position": 0}
    with pytest.raises(FP8LabError, match="vocab_size is 500"):  # asking again fails again, the same way
        loader.next_batch()
    assert prefetch_threads() == 0


def test_a_dropped_loader_stops_its_thread(split):
    loader = TokenLoader(split, batch_size=4, seed=0, prefetch=2)
    loader.next_batch()
    assert prefetch_threads() == 1
    del loader
    gc.collect()
    for _ in range(100):
        if prefetch_threads() == 0:
            break
        threading.Event().wait(0.02)
    assert prefetch_threads() == 0


def test_option_checks(split):
    with pytest.raises(FP8LabError, match="prefetch must be an integer >= 0"):
        TokenLoader(split, batch_size=4, seed=0, prefetch=-1)
    if not torch.cuda.is_available():
        with pytest.raises(FP8LabError, match="pin_memory=True needs a CUDA device"):
            TokenLoader(split, batch_size=4, seed=0, pin_memory=True)
    with pytest.raises(FP8LabError, match="max_seq_len must be a positive integer"):
        TokenLoader(split, batch_size=4, seed=0, max_seq_len=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_prefetch_on_cuda(split):
    loader = TokenLoader(split, batch_size=8, seed=3, prefetch=2, pin_memory=True)
    sync = TokenLoader(split, batch_size=8, seed=3)
    for _ in range(14):
        x, y = loader.next_batch()
        assert x.is_pinned() and y.is_pinned()
        a = sync.next_batch()
        assert torch.equal(x, a[0]) and torch.equal(y.to("cuda", non_blocking=True).cpu(), a[1])
    loader.close()
