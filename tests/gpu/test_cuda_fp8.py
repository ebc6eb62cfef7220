"""FP8 with the real kernels (torch._scaled_mm, MXFP8 on Blackwell). Skipped without CUDA;
where they run they assert the same bounds as the emulated CPU tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fp8lab.errors import FP8LabError
from fp8lab.precision import RECIPES, convert, get_recipe, resolve_emulation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FP8_RECIPES = [r for r in RECIPES if r != "bf16"]


def _runs_natively(recipe: str) -> bool:
    try:
        return not resolve_emulation(get_recipe(recipe), torch.device("cuda"), "auto")
    except FP8LabError:
        return False


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().float(), test.detach().float()
    return float(20 * torch.log10(ref.norm() / (ref - test).norm()))


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_gate_matches_the_hardware(recipe):
    cc = torch.cuda.get_device_capability()
    need = get_recipe(recipe).min_capability
    if recipe == "mxfp8" and cc[0] == 12:
        pytest.skip("sm_12x MXFP8 depends on a kernel probe")
    assert _runs_natively(recipe) == (cc >= need if recipe != "mxfp8" else cc[0] == 10)


@pytest.mark.parametrize("recipe", FP8_RECIPES)
@pytest.mark.parametrize("shape", [(2048, 4096), (4096, 2048)])
def test_single_linear_sqnr_real_kernels(recipe, shape):
    if not _runs_natively(recipe):
        pytest.skip(f"{recipe} has no native kernel on {torch.cuda.get_device_name()}")
    k, n = shape
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(k, n, bias=False)).cuda()
    test = copy.deepcopy(ref)
    report = convert(test, recipe=recipe, skip_modules=())
    assert report.num_converted == 1 and not report.emulated
    x = torch.randn(8, 512, k, device="cuda")
    x_ref, x_test = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)  # fp32 reference on the same weights
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_test = test(x_test)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_test.float().backward(grad)
    assert 18 <= sqnr(y_ref, y_test) <= 40
    assert sqnr(x_ref.grad, x_test.grad) >= 17
    assert sqnr(ref[0].weight.grad, test[0].weight.grad) >= 17


@pytest.mark.parametrize("recipe", ["bf16", "fp8-tensorwise", "fp8-rowwise"])
def test_compiled_training_on_gpu(recipe, tmp_path):
    """A short compiled run per recipe: real kernels, finite falling loss, MFU reported."""
    if recipe != "bf16" and not _runs_natively(recipe):
        pytest.skip(f"{recipe} has no native kernel here")
    import numpy as np

    from fp8lab.config import load_config
    from fp8lab.data import write_dataset
    from fp8lab.train.logs import read_jsonl
    from fp8lab.train.trainer import train

    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 256, size=(64, 257))
    data = write_dataset(tmp_path / "data", train=[np.tile(pattern, (8, 1))], val=[pattern[:16]], seq_len=256,
                         vocab_size=256, eos_id=None, tokenizer={"type": "synthetic"}, sources=[])
    cfg = load_config(None, {"data.path": str(data), "data.seq_len": "256", "data.micro_batch_size": "16",
                             "model.dim": "512", "model.n_heads": "8", "model.n_kv_heads": "4",
                             "model.ffn_dim": "1536", "train.steps": "30", "optim.warmup_steps": "5",
                             "optim.lr": "1e-3", "precision.recipe": recipe, "logging.progress": "off"})
    summary = train(cfg, tmp_path / "run")
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert summary["compiled"] and not summary["emulated"]
    assert (summary["conversion"]["num_converted"] > 0) == (recipe != "bf16")
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
    assert summary["tokens_per_s_median"] > 0 and summary["mem_peak_gb"] > 0
