"""train.loss_head: the fused head (logits' gradient and both backward GEMMs computed in forward,
chunk by chunk) and the checkpointed head (chunks recomputed in backward) give the plain head's
loss and gradients up to summation order, padding included, in training and in evaluation; a run
trains alike with each; an FP8 output layer is refused by the fused head with the way out."""

from __future__ import annotations

import copy

import pytest
import torch

from fp8lab.data.loader import IGNORE_INDEX
from fp8lab.errors import FP8LabError
from fp8lab.models import Transformer, preset_args
from fp8lab.models.head import chunk_size, resolve_head
from fp8lab.precision import convert
from fp8lab.train.build import build
from fp8lab.train.logs import read_jsonl
from fp8lab.train.step import model_loss
from fp8lab.train.trainer import Trainer
from helpers import trainer_config


def _model(recipe: str | None = None, tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(preset_args("debug", vocab_size=640, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                                tie_embeddings=tie))
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


@pytest.mark.parametrize("recipe,tie", [(None, False), (None, True), ("fp8-tensorwise", False)])
@pytest.mark.parametrize("head,chunk", [("fused", 7), ("fused", 0), ("checkpointed", 64), ("checkpointed", 1000)])
def test_heads_give_the_plain_loss_and_grads(recipe, tie, head, chunk):
    """fp32: equal to 1e-5 (summation order only). Chunks: uneven, one bigger than the batch, default."""
    plain = _model(recipe, tie)
    other = copy.deepcopy(plain)
    x, y = _batch()
    a = model_loss(plain, x, y)
    b = model_loss(other, x, y, head=head, chunk_tokens=chunk)
    # A drill's factor and the 1/tokens scale reach the fused head's precomputed gradients in backward.
    (a * 0.37).backward()
    (b * 0.37).backward()
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    for (name, p), q in zip(plain.named_parameters(), other.parameters()):
        # 1e-5 of the tensor's largest gradient: fp32 summation order (a tied weight adds two sums)
        assert p.grad is not None and (p.grad - q.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name
    with torch.no_grad():
        assert model_loss(other, x, y, head=head, chunk_tokens=chunk).item() == pytest.approx(a.item(), rel=1e-6)


def test_fused_head_under_bf16_autocast_matches_plain():
    """bf16 GEMMs both ways; the fused head rounds the logits' gradient before scaling it, plain after."""
    plain = _model()
    fused = copy.deepcopy(plain)
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = model_loss(plain, x, y) / 100
        b = model_loss(fused, x, y, head="fused", chunk_tokens=16) / 100
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), rel=2e-3)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32
        assert (p.grad - q.grad).norm() <= 2e-2 * p.grad.norm(), name  # bf16's 2**-8, a few roundings


def test_default_chunk_keeps_a_chunks_logits_bounded():
    # compiled: at most 512M logits per chunk (4,185 tokens of Llama 3's vocabulary), in equal chunks
    assert chunk_size(0, 128_256, 16_384) == 4_096
    assert chunk_size(0, 128_256, 16_384, compiled=False) == 512  # eager: at most 64M (523 tokens): 32 chunks
    assert chunk_size(0, 640, 120) == 120  # a small vocabulary: one chunk
    assert chunk_size(7, 640, 120) == 7 and chunk_size(50, 640, 120) == 40  # 3 equal chunks, not 50 + 50 + 20


def test_a_run_trains_alike_with_each_head(tiny_data, tmp_path):
    runs = {}
    for head, chunk in (("plain", 0), ("fused", 48), ("checkpointed", 48)):
        run = tmp_path / head
        summary = Trainer(trainer_config(tiny_data, **{"train.loss_head": head, "train.loss_chunk_tokens": chunk,
                                                       "train.steps": 6}), run).run()
        runs[head] = ([r["loss"] for r in read_jsonl(run / "metrics.jsonl")], summary["final_eval_loss"])
    # The first step's loss agrees to float precision; after that Adam's normalised updates
    # carry the summation-order differences along, so the runs agree closely, not bitwise.
    for head in ("fused", "checkpointed"):
        assert runs[head][0][0] == pytest.approx(runs["plain"][0][0], rel=1e-5)
        assert runs[head][0] == pytest.approx(runs["plain"][0], rel=2e-3)
        assert runs[head][1] == pytest.approx(runs["plain"][1], rel=2e-3)


def test_fused_head_refuses_an_fp8_output_layer(tiny_data):
    over = {"precision.recipe": "fp8-tensorwise", "precision.skip_modules": "[]"}
    with pytest.raises(FP8LabError, match="train.loss_head=plain"):
        build(trainer_config(tiny_data, **over, **{"train.loss_head": "fused"}))
    for head in ("plain", "auto"):  # auto on CPU is plain anyway
        parts = build(trainer_config(tiny_data, **over, **{"train.loss_head": head}))
        assert "output" in {c["name"] for c in parts.report.converted} and parts.loss_head == "plain"


def test_auto_is_fused_where_compiled_on_cuda_and_keeps_asked_for_chunks():
    assert resolve_head("auto", compiled_cuda=True) == "fused"
    assert resolve_head("auto", compiled_cuda=False) == "plain"
    assert resolve_head("auto", compiled_cuda=False, chunk_tokens=512) == "checkpointed"  # older configs' chunks
    assert resolve_head("auto", compiled_cuda=True, output_converted=True) == "plain"
    assert resolve_head("checkpointed", compiled_cuda=True) == "checkpointed"
    with pytest.raises(ValueError, match="train.loss_head=plain"):
        resolve_head("fused", compiled_cuda=True, output_converted=True)


def test_the_fused_heads_backward_runs_once():
    """Its precomputed gradients are scaled in place: a second backward would scale them twice."""
    x, y = _batch()
    loss = model_loss(_model(), x, y, head="fused")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()
