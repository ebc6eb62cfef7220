"""The converter: which modules each recipe swaps, and that the swapped ones really compute
in FP8 (SQNR against fp32 on the same weights inside TorchAO's single-layer bounds)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fp8lab.errors import FP8LabError
from fp8lab.models import Transformer, preset_args
from fp8lab.precision import RECIPES, convert, get_recipe, to_plain
from fp8lab.precision.convert import groups_text, linear_groups
from fp8lab.precision.support import check_cuda_capability

FP8_RECIPES = [r for r in RECIPES if r != "bf16"]


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().float(), test.detach().float()
    return float(20 * torch.log10(ref.norm() / (ref - test).norm()))


def debug_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset_args("debug", **overrides))


def is_converted(module: nn.Module) -> bool:
    if type(module).__name__ == "Float8Linear":
        return True
    return isinstance(module, nn.Linear) and type(module.weight.data).__module__.startswith("torchao")


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_converts_every_eligible_linear_and_skips_the_head(recipe):
    model = debug_model()
    report = convert(model, recipe=recipe)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    converted = {n for n, m in linears.items() if is_converted(m)}
    assert converted == {c["name"] for c in report.converted}
    assert len(converted) == 4 * 7  # 4 blocks x (wq, wk, wv, wo, w1, w2, w3)
    assert report.skipped == [{"name": "output", "in_features": 256, "out_features": 320,
                               "reason": "named in precision.skip_modules"}]
    assert report.emulated  # CPU
    if get_recipe(recipe).kind == "float8":
        assert type(linears["layers.0.attention.wq"]).__name__ == "Float8Linear"
    # what bench and compare print: the layer kinds converted, the output layer not
    assert groups_text(report.linear_groups()) == "7/8: wq wk wv wo w1 w2 w3"


def test_a_kind_converted_in_some_blocks_says_how_many():
    report = convert(debug_model(), recipe="fp8-tensorwise", skip_modules=["output", "layers.0.feed_forward.w2"])
    assert groups_text(report.linear_groups()) == "7/8: wq wk wv wo w1 w3 w2(3/4)"
    assert groups_text(linear_groups([], [{"name": "output"}])) == "none"


def test_skip_patterns_dims_and_filter_fn():
    # ffn_dim=200 is not a multiple of 16: w1 and w3 (out) and w2 (in) must stay high precision.
    model = debug_model(ffn_dim=200)
    report = convert(model, recipe="fp8-rowwise", skip_modules=["output", "layers.0.*", "wo"],
                     filter_fn=lambda m, fqn: fqn != "layers.3.attention.wq")
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["layers.1.feed_forward.w1"] == "dims not multiples of 16"
    assert reasons["layers.2.feed_forward.w2"] == "dims not multiples of 16"
    assert reasons["layers.0.attention.wq"] == "named in precision.skip_modules"
    assert reasons["layers.2.attention.wo"] == "named in precision.skip_modules"
    assert reasons["layers.3.attention.wq"] == "rejected by filter_fn"
    # blocks 1-3 keep wq/wk/wv except layers.3.wq: 3*3 - 1
    assert {c["name"] for c in report.converted} == {
        f"layers.{i}.attention.{w}" for i in (1, 2, 3) for w in ("wq", "wk", "wv")
    } - {"layers.3.attention.wq"}
    for name in reasons:
        assert not is_converted(model.get_submodule(name))


def test_mxfp8_needs_multiples_of_32():
    model = debug_model(ffn_dim=784)  # 784 = 16 * 49: fine for float8, not for 32-element MX blocks
    report = convert(model, recipe="mxfp8")
    assert {s["reason"] for s in report.skipped if s["name"] != "output"} == {"dims not multiples of 32"}


def test_heuristic_filter_keeps_small_gemms_high_precision():
    report = convert(debug_model(), recipe="fp8-tensorwise", filter_mode="heuristic")
    assert report.num_converted == 0  # every debug GEMM is far below TorchAO's H100 break-even
    assert {s["reason"] for s in report.skipped} >= {"too small to gain (heuristic filter)"}
    with pytest.raises(FP8LabError, match="no published rule for mxfp8"):
        convert(debug_model(), recipe="mxfp8", filter_mode="heuristic")


def test_bf16_is_a_no_op_and_unknown_recipe_lists_known():
    model = debug_model()
    before = copy.deepcopy(model.state_dict())
    report = convert(model, recipe="bf16")
    assert report.num_converted == 0 and not report.emulated
    assert not any(is_converted(m) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FP8LabError, match="known recipes: bf16, fp8-tensorwise"):
        convert(model, recipe="fp8-blockwise")


def test_emulate_off_on_cpu_is_refused():
    with pytest.raises(FP8LabError, match="no native CPU kernels"):
        convert(debug_model(), recipe="fp8-tensorwise", emulate="off")


@pytest.mark.parametrize("recipe", FP8_RECIPES)
@pytest.mark.parametrize("shape", [(256, 512), (768, 256)])
def test_single_linear_sqnr_within_torchao_bounds(recipe, shape):
    """Forward 18..40 dB (the upper bound proves the conversion happened), grads >= 17 dB."""
    k, n = shape
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Linear(k, n, bias=False))
    test = copy.deepcopy(ref)
    assert convert(test, recipe=recipe, skip_modules=()).num_converted == 1
    x = torch.randn(4, 64, k)
    x_ref, x_test = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_test = ref(x_ref), test(x_test)
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)
    y_test.backward(grad_out)
    assert 18 <= sqnr(y_ref, y_test) <= 40
    assert sqnr(x_ref.grad, x_test.grad) >= 17
    assert sqnr(ref[0].weight.grad, test[0].weight.grad) >= 17


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_whole_model_logits_sqnr_at_init(recipe):
    ref = debug_model()
    test = copy.deepcopy(ref)
    convert(test, recipe=recipe)
    tokens = torch.randint(0, 320, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = sqnr(ref(tokens), test(tokens))
    assert 25 <= s < math.inf  # finite: the converted model really computes differently


def test_to_plain_shares_storage_with_mxfp8_weights():
    model = debug_model()
    convert(model, recipe="mxfp8")
    w = model.layers["0"].attention.wq.weight
    assert type(w.data).__name__ == "MXFP8TrainingWeightWrapperTensor"
    plain = to_plain(w)
    assert type(plain) is torch.Tensor and plain.dtype == torch.float32
    plain.add_(1.0)  # an in-place write through the plain view is what checkpoint loading does
    assert torch.equal(to_plain(w), plain)


@pytest.mark.parametrize(
    "recipe,cc,probe_result,expect",
    [
        ("fp8-tensorwise", (8, 0), None, "needs compute capability >= 8.9.*has 8.0"),
        ("fp8-rowwise", (8, 6), None, "fp8-rowwise needs compute capability >= 8.9"),
        ("fp8-rowwise", (8, 9), None, None),
        ("fp8-rowwise-gw-hp", (9, 0), None, None),
        ("mxfp8", (9, 0), None, "mxfp8 needs compute capability 10.0.*has 9.0"),
        ("mxfp8", (10, 0), None, None),
        ("mxfp8", (12, 0), None, None),
        ("mxfp8", (12, 0), "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED", "failed its kernel probe.*CUBLAS"),
    ],
)
def test_cuda_capability_gate(recipe, cc, probe_result, expect):
    probed = []

    def probe():
        probed.append(True)
        return probe_result

    run = lambda: check_cuda_capability(get_recipe(recipe), name="Some GPU", cc=cc, probe=probe)  # noqa: E731
    if expect is None:
        run()
    else:
        with pytest.raises(FP8LabError, match=expect):
            run()
    assert bool(probed) == (recipe == "mxfp8" and cc[0] == 12)  # only sm_12x MXFP8 needs the probe
