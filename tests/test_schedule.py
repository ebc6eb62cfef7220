"""Warm-up + cosine learning rate, as a pure function of the step."""

from __future__ import annotations

import math

import pytest

from fp8lab.config import OptimConfig
from fp8lab.train.schedule import lr_at


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, cfg=cfg, total_steps=110) == pytest.approx(1e-4)
    assert lr_at(10, cfg=cfg, total_steps=110) == pytest.approx(1e-3)  # peak at the end of warm-up
    mid = lr_at(60, cfg=cfg, total_steps=110)  # half-way through the decay
    assert mid == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(110, cfg=cfg, total_steps=110) == pytest.approx(1e-4)  # the floor
    assert lr_at(500, cfg=cfg, total_steps=110) == pytest.approx(1e-4)  # stays there
    lrs = [lr_at(s, cfg=cfg, total_steps=110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_constant_schedule_and_no_warmup():
    cfg = OptimConfig(lr=2e-4, warmup_steps=0, schedule="constant")
    assert {lr_at(s, cfg=cfg, total_steps=50) for s in (1, 25, 50)} == {2e-4}
    cos = OptimConfig(lr=2e-4, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(1, cfg=cos, total_steps=50) == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi / 50)))
