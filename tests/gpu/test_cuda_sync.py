"""The trainer makes at most one device-to-host synchronisation per step, logging
included (issue 5): counted with torch's sync debug mode, which warns on every
synchronising CUDA call. Skipped without CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from fp8lab.train.trainer import Trainer
from helpers import trainer_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("recipe", ["bf16", "fp8-tensorwise"])
def test_one_sync_per_step(tiny_data, tmp_path, recipe):
    if recipe != "bf16" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    cfg = trainer_config(tiny_data, **{"train.device": "cuda", "train.steps": 12, "precision.recipe": recipe,
                                       "logging.log_interval": 1, "train.eval_interval": 0})
    trainer = Trainer(cfg, tmp_path / "R")
    progress = trainer.start_loop()
    for _ in range(3):  # compile, allocator and optimizer-state warm-up
        trainer.advance(progress)
    counts = []
    for _ in range(5):  # not the last step: it evaluates, which reads its loss
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.advance(progress)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    progress.close()
    # Exactly one: the loss-and-norm transfer must be seen (or the counting itself is broken).
    assert counts == [1] * 5, counts
