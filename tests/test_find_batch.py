"""fp8lab bench --find-batch: the search over micro-batch sizes (fits up to a bound, not beyond),
its start from the memory model, and the refusal where no GPU can run out of memory. The real
trials (worker processes until CUDA runs out of memory) need a GPU: benchmarks/gpu/check.sh."""

from __future__ import annotations

import pytest

from fp8lab.bench.find_batch import MAX_TRIALS, predicted_start, search
from fp8lab.cli import main
from fp8lab.config import load_config
from fp8lab.models.presets import preset_args


@pytest.mark.parametrize("bound,start", [(37, 30), (37, 37), (37, 44), (1, 8), (200, 1), (64, 256)])
def test_search_finds_the_largest_fitting_size_or_the_largest_it_saw(bound, start):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= bound

    best, trials = search(fits, start)
    assert trials == [(b, b <= bound) for b in tried] and len(trials) <= MAX_TRIALS
    assert best is not None and best <= bound and (best, True) in trials
    if len(trials) < MAX_TRIALS:  # it stopped because it knew the answer: the bound, bracketed
        assert best == bound and (bound + 1, False) in trials


def test_search_says_none_when_nothing_fits():
    best, trials = search(lambda b: False, 4)
    assert best is None and trials[-1] == (1, False)


def test_the_start_follows_the_memory_model():
    cfg = load_config(None, {"data.seq_len": "512"})
    args = preset_args("1b")
    h200, h100 = predicted_start(cfg, args, "bf16", 141e9), predicted_start(cfg, args, "bf16", 80e9)
    assert h200 > h100 >= 1
    # FP8 keeps no bf16 copy of a converted weight: never a smaller batch than bf16's
    assert predicted_start(cfg, args, "fp8-tensorwise", 80e9) >= h100
    lean = load_config(None, {"data.seq_len": "512", "train.activation_checkpoint": "full"})
    assert predicted_start(lean, args, "bf16", 80e9) > 2 * h100  # checkpointed blocks hold far less


def test_without_a_gpu_it_refuses_and_says_what_predicts_instead(capsys):
    assert main(["bench", "--find-batch", "--recipes", "bf16", "--model.preset=debug", "--data.seq_len=32"]) == 2
    err = capsys.readouterr().err
    assert "no GPU here" in err and "fp8lab advise" in err
