"""train.loss_chunk_tokens: the output layer and loss in chunks under activation
checkpointing give the plain loss and gradients (up to summation order), padding included,
in training and in evaluation."""

from __future__ import annotations

import copy

import pytest
import torch

from fp8lab.data.loader import IGNORE_INDEX
from fp8lab.models import Transformer, preset_args
from fp8lab.precision import convert
from fp8lab.train.logs import read_jsonl
from fp8lab.train.step import model_loss
from fp8lab.train.trainer import Trainer
from helpers import trainer_config


def _model(recipe: str | None = None) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(preset_args("debug", vocab_size=640, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128))
    if recipe:
        # The output layer stays high precision (the default): converted to tensorwise FP8,
        # each chunk would get its own scale, which is a different (if finer) quantisation.
        convert(m, recipe=recipe, emulate="on")
    return m


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 640, (3, 40), generator=g)
    y = torch.randint(0, 640, (3, 40), generator=g)
    y[1, 30:] = IGNORE_INDEX  # padding is left out of the loss in chunks too
    return x, y


@pytest.mark.parametrize("recipe", [None, "fp8-tensorwise"])
@pytest.mark.parametrize("chunk", [7, 64, 1000])  # uneven, several, one chunk bigger than the batch
def test_chunked_loss_and_grads_equal_the_plain_ones(recipe, chunk):
    plain, chunked = _model(recipe), None
    chunked = copy.deepcopy(plain)
    x, y = _batch()
    a = model_loss(plain, x, y)
    b = model_loss(chunked, x, y, chunk_tokens=chunk)
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    with torch.no_grad():
        assert model_loss(chunked, x, y, chunk_tokens=chunk).item() == pytest.approx(a.item(), rel=1e-6)


def test_a_run_with_chunked_loss_trains_like_the_plain_one(tiny_data, tmp_path):
    runs = {}
    for chunk in (0, 48):
        run = tmp_path / f"c{chunk}"
        summary = Trainer(trainer_config(tiny_data, **{"train.loss_chunk_tokens": chunk}), run).run()
        runs[chunk] = ([r["loss"] for r in read_jsonl(run / "metrics.jsonl")], summary["final_eval_loss"])
    # The first step's loss agrees to float precision; after that Adam's normalised updates
    # carry the summation-order differences along, so the runs agree closely, not bitwise.
    assert runs[48][0][0] == pytest.approx(runs[0][0][0], rel=1e-6)
    assert runs[48][0] == pytest.approx(runs[0][0], rel=1e-3)
    assert runs[48][1] == pytest.approx(runs[0][1], rel=1e-3)
