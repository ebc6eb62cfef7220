"""train.activation_checkpoint: full and selective checkpointing give the loss and gradients of
the plain model (fp32 compute, the bf16 recipe and emulated FP8), eager and compiled, with the
document mask, and really recompute (the checks can fail if checkpointing silently does
nothing): eager, by the forward calls and matmul FLOPs that backward repeats; compiled, by the
ops in the backward graph. Names are unchanged, a trainer run matches and resumes, and FSDP2
over two ranks trains what one process trains."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
from torch.utils.flop_counter import FlopCounterMode

from fp8lab.data import write_dataset
from fp8lab.models import Transformer, preset_args
from fp8lab.precision import convert
from fp8lab.train.ac import SAVED_OPS, apply_activation_checkpointing, checkpointed_mode
from fp8lab.train.logs import read_jsonl
from fp8lab.train.step import model_loss
from fp8lab.train.trainer import train
from helpers import REPO, SEQ_LEN, TRAINER_BASE, cli_env, markov_tokens, trainer_config

VOCAB = 96
RECIPES = ("bf16", "fp8-tensorwise", "fp8-rowwise")  # bf16: computed in fp32 (no autocast here)
LINEARS = 7  # per block: wq wk wv wo w1 w2 w3
TOL = dict(rtol=1e-6, atol=1e-6)


def _model(recipe: str, mode: str = "none", *, backend=None) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(preset_args("debug", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128))
    convert(m, recipe=recipe, emulate="on")
    apply_activation_checkpointing(m, mode=mode)
    if backend is not None:
        for block in m.layers.values():
            block.compile(dynamic=False, backend=backend)
    return m


def _batch():
    """Two sequences of 32 tokens; the first holds two documents, so the mask is not None."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=g), torch.randint(0, VOCAB, (2, SEQ_LEN), generator=g)
    docs = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    return x, y, docs


def _loss_and_grads(model):
    x, y, docs = _batch()
    loss = model_loss(model, x, y, docs=docs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@functools.cache
def _reference(recipe: str):
    """The plain eager model: loss, gradients and the matmul and attention FLOPs of forward + backward."""
    with FlopCounterMode(display=False) as flops:
        loss, grads = _loss_and_grads(_model(recipe))
    return loss, grads, flops.get_total_flops()


def _assert_same(loss, grads, recipe):
    ref_loss, ref_grads, _ = _reference(recipe)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_eager_gives_the_plain_loss_and_gradients_and_recomputes(recipe, mode):
    model = _model(recipe, mode)
    plain = _model(recipe)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(checkpointed_mode(b) == mode for b in model.layers.values())
    calls = []
    for block in model.layers.values():
        # a pre-hook: the recompute stops early, once it has what backward needs (before w2)
        block.feed_forward.register_forward_pre_hook(lambda *_: calls.append(1))
    with FlopCounterMode(display=False) as flops:
        loss, grads = _loss_and_grads(model)
    _assert_same(loss, grads, recipe)
    # Both modes run each block's forward again in backward (the element-wise work is redone)...
    assert len(calls) == 2 * len(model.layers)
    # ...but selective serves the matmul and attention outputs from what forward kept, while
    # full computes them again: its backward does more matmul/attention FLOPs than the plain model's.
    plain_flops = _reference(recipe)[2]
    if mode == "selective":
        assert flops.get_total_flops() == plain_flops
    else:
        assert flops.get_total_flops() > plain_flops * 1.2


def _capturing_backend(graphs: dict):
    """aot_eager that keeps each compiled graph's op counts: AOTAutograd with the min-cut
    partitioner (inductor's, which honours the checkpointing tags), graphs run eagerly so the
    test stays within seconds on CPU."""
    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"),
                        partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)


# Each mode with bf16 and with FP8, and each FP8 recipe once (a compile of an FP8 block costs 3-8 s
# here; eager covers every pair); bf16 without checkpointing gives the backward graph to compare with.
COMPILED = [("bf16", "none"), ("bf16", "full"), ("bf16", "selective"), ("fp8-tensorwise", "selective"),
            ("fp8-rowwise", "full")]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, mode", COMPILED)
def test_compiled_gives_the_plain_loss_and_gradients_and_recomputes(recipe, mode):
    graphs: dict = {}
    model = _model(recipe, mode, backend=_capturing_backend(graphs))
    loss, grads = _loss_and_grads(model)
    _assert_same(loss, grads, recipe)  # against the plain eager model: compiled without AC matches it too
    assert [n for n, _ in model.named_parameters()] == list(grads)
    backward = graphs["backward"]  # one graph for both blocks (identical), compiled once
    mm, rsqrt = backward.count("aten.mm.default"), backward.count("aten.rsqrt.default")
    if mode == "none":  # the premise of the checks below: plain backward has 2 matmuls per linear, keeps the norms
        assert mm == 2 * LINEARS and rsqrt == 0, backward
    else:  # the RMSNorms are recomputed in backward in both modes
        assert rsqrt >= 2, backward
    if mode == "selective":  # the matmul outputs were kept: no forward matmul runs again
        assert mm == 2 * LINEARS, backward
    if mode == "full":
        assert mm > 2 * LINEARS, backward


def test_saved_ops_are_the_ones_a_block_runs():
    names = {str(op) for op in SAVED_OPS}
    assert {"aten.mm.default", "aten.max.default", "aten.amax.default",
            "aten._scaled_dot_product_flash_attention_for_cpu.default"} <= names


def test_misuse_is_refused():
    model = _model("bf16", "full")
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(model, mode="selective")
    with pytest.raises(ValueError, match="unknown"):
        apply_activation_checkpointing(_model("bf16"), mode="every")
    compiled = _model("bf16", backend="eager")
    with pytest.raises(ValueError, match="before compile"):
        apply_activation_checkpointing(compiled, mode="full")
    assert apply_activation_checkpointing(_model("bf16"), mode="none") == 0


EOS = 63


@pytest.fixture(scope="module")
def doc_data(tmp_path_factory):
    """Markov tokens with an EOS every few tokens, so data.document_mask has documents to mask."""
    rng = np.random.default_rng(5)

    def rows(n):
        out = markov_tokens(rng, n, SEQ_LEN + 1, EOS)
        out[rng.random(out.shape) < 0.08] = EOS
        return out
    return write_dataset(tmp_path_factory.mktemp("ac") / "docs", train=[rows(256)], val=[rows(16)], seq_len=SEQ_LEN,
                         vocab_size=EOS + 1, eos_id=EOS, tokenizer={"type": "synthetic-markov"}, sources=[])


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


OVER = {"data.document_mask": "true", "precision.compute_dtype": "fp32", "checkpoint.interval": 2}


@pytest.fixture(scope="module")
def plain_run(doc_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ac-none")
    train(trainer_config(doc_data, **OVER), run)
    return run


@pytest.mark.slow
def test_trainer_with_full_checkpointing_matches_and_resumes(doc_data, plain_run, tmp_path):
    cfg = {**OVER, "train.activation_checkpoint": "full"}
    assert train(trainer_config(doc_data, **cfg, **{"debug.stop_at_step": 3}), tmp_path) == {"stopped_at": 3}
    summary = train(trainer_config(doc_data, **cfg), tmp_path)  # resumes from step 2
    assert any(e["kind"] == "resume" and e["step"] == 2 for e in read_jsonl(tmp_path / "events.jsonl"))
    assert _losses(tmp_path) == pytest.approx(_losses(plain_run), rel=1e-6, abs=0)
    assert len(_losses(tmp_path)) == 6
    assert any(n.startswith("activation checkpointing: full") for n in summary["notes"])


@pytest.mark.slow
def test_fsdp_two_ranks_with_selective_checkpointing_train_what_one_process_trains(doc_data, plain_run, tmp_path):
    """One 2-rank torchrun (about 20-40 s here): each block, checkpointed, is still its own FSDP2
    unit, and 2 x 4 sequences give the losses of the single process's 8 (as tests/test_fsdp.py
    checks without checkpointing)."""
    values = {**TRAINER_BASE, **OVER, "data.path": doc_data, "data.micro_batch_size": 4, "train.threads": 1,
              "train.activation_checkpoint": "selective", "parallel.data_parallel": "fsdp", "checkpoint.interval": 0}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fp8lab",
           "train", "--run-dir", str(tmp_path / "R"), *(f"--{k}={v}" for k, v in values.items())]
    proc = subprocess.run(cmd, env=cli_env(tmp_path / "cache") | {"OMP_NUM_THREADS": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _losses(tmp_path / "R") == pytest.approx(_losses(plain_run), rel=1e-5)
    notes = json.loads((tmp_path / "R" / "summary.json").read_text())["notes"]
    assert any(n.startswith("activation checkpointing: selective") for n in notes)
