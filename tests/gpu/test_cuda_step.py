"""The fast step's pieces on CUDA, where they differ from CPU: the fused loss head with its
softmax pass compiled (inductor's Triton kernel) against the plain head in bf16 autocast, and
the deferred sync's device-side skip (fused AdamW's found_inf on the GPU). Skipped without CUDA."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fp8lab.models import Transformer, preset_args
from fp8lab.models.head import softmax_grad
from fp8lab.train.step import model_loss, train_step
from fp8lab.train.trainer import Trainer
from helpers import trainer_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_compiled_fused_head_matches_the_plain_head_in_bf16():
    torch.manual_seed(0)
    plain = Transformer(preset_args("debug", vocab_size=32768)).cuda()
    fused = copy.deepcopy(plain)
    x = torch.randint(0, 32768, (4, 256), device="cuda")
    y = torch.randint(0, 32768, (4, 256), device="cuda")
    y[1, 200:] = -100
    grad_fn = torch.compile(softmax_grad, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = model_loss(plain, x, y) / 1000
        b = model_loss(fused, x, y, head="fused", chunk_tokens=300, grad_fn=grad_fn) / 1000  # 4 equal chunks of 256
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), rel=2e-3)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert (p.grad - q.grad).norm() <= 2e-2 * p.grad.norm(), name


def test_deferred_skip_on_the_gpu_leaves_weights_and_adam_state_bit_identical(tiny_data, tmp_path):
    trainer = Trainer(trainer_config(tiny_data, **{"train.device": "cuda"}), tmp_path)
    parts, cfg = trainer.parts, trainer.cfg
    assert all(g["fused"] for g in parts.optimizer.param_groups) and cfg.train.deferred_sync
    assert train_step(parts, cfg, 1, [parts.loader.next_batch()]).stepped
    before = [p.detach().clone() for p in parts.model.parameters()]
    state = [v.clone() for st in parts.optimizer.state.values() for v in st.values()]
    result = train_step(parts, cfg, 2, [parts.loader.next_batch()], drill=math.nan)
    assert not result.stepped
    assert all(torch.equal(a, p) for a, p in zip(before, parts.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state, [v for st in parts.optimizer.state.values()
                                                         for v in st.values()]))
