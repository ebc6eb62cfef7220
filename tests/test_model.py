"""The model: shapes, presets, parameter and FLOP counts, and the pieces that are easy to get wrong."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fp8lab.errors import FP8LabError
from fp8lab.models import PRESETS, Transformer, flops_per_token, param_counts, preset_args
from fp8lab.models.llama import apply_rope, rope_tables


def test_param_counts_match_the_built_model_and_published_sizes():
    args = preset_args("debug")
    model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == param_counts(args).total
    # Published totals: Llama 3.2 1B = 1.24B, 3B = 3.21B, Llama 3 8B = 8.03B (meta-llama model cards).
    assert round(param_counts(preset_args("1b")).total / 1e9, 2) == 1.24
    assert round(param_counts(preset_args("3b")).total / 1e9, 2) == 3.21
    assert round(param_counts(preset_args("8b")).total / 1e9, 2) == 8.03


def test_tied_embeddings_share_one_tensor():
    args = preset_args("debug", tie_embeddings=True)
    model = Transformer(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == param_counts(args).total


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_torch_flop_counter(tied):
    """6N + 12LdT checked against the FLOPs torch counts in a real forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    args = preset_args("debug", n_layers=2, tie_embeddings=tied)
    model = Transformer(args)
    B, T = 2, 64
    x = torch.randint(0, args.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    # torch's counter has no formula for CPU SDPA, so what it counts here is the matmuls: 6N.
    assert {str(op) for op in counter.get_flop_counts()["Global"]} == {"aten.mm"}
    matmul = counter.get_total_flops()
    assert matmul == 6 * param_counts(args).matmul * B * T
    # The attention term, counted on the same shapes done as explicit matmuls (full T x T,
    # as the formula assumes): scores and weighted sum, forward and backward, per layer.
    q = torch.randn(B, args.n_heads, T, args.head_dim, requires_grad=True)
    k = torch.randn(B, args.n_heads, T, args.head_dim, requires_grad=True)
    v = torch.randn(B, args.n_heads, T, args.head_dim, requires_grad=True)
    with FlopCounterMode(display=False) as attn:
        ((q @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward()
    total = matmul + args.n_layers * attn.get_total_flops()
    assert total == flops_per_token(args, T) * B * T


def test_presets_have_fp8_friendly_dims():
    for name, args in PRESETS.items():
        for dim in (args.dim, args.ffn_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim):
            assert dim % 16 == 0, (name, dim)


def test_forward_shape_and_causality():
    torch.manual_seed(0)
    model = Transformer(preset_args("debug", n_layers=2))
    x = torch.randint(0, 320, (2, 48))
    y = model(x)
    assert y.shape == (2, 48, 320)
    x2 = x.clone()
    x2[:, 30:] = (x2[:, 30:] + 1) % 320  # change the future
    y2 = model(x2)
    torch.testing.assert_close(y[:, :30], y2[:, :30])  # the past does not see it
    assert not torch.allclose(y[:, 30:], y2[:, 30:])


def test_gqa_equals_repeated_kv_heads():
    """SDPA's enable_gqa must equal attention with each kv head repeated for its query group."""
    torch.manual_seed(0)
    model = Transformer(preset_args("debug", n_layers=1))
    attn = model.layers["0"].attention
    x = torch.randn(2, 16, 256)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    out = attn(x, cos, sin)
    q = apply_rope(attn.wq(x).view(2, 16, 4, 64), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(2, 16, 2, 64), cos, sin).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 16, 2, 64).transpose(1, 2).repeat_interleave(2, dim=1)
    ref = attn.wo(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 256))
    torch.testing.assert_close(out, ref)


def test_rope_preserves_norm_and_encodes_relative_position():
    cos, sin = rope_tables(64, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    def at(x, pos):
        return apply_rope(x, cos[pos:pos + 1], sin[pos:pos + 1])
    torch.testing.assert_close(at(q, 7).norm(), q.norm())
    # <R(m) q, R(n) k> depends only on m - n
    d1 = (at(q, 9) * at(k, 4)).sum()
    d2 = (at(q, 20) * at(k, 15)).sum()
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_initial_loss_is_near_uniform(tied):
    """A sane init predicts roughly uniformly: loss near ln(vocab) against random targets."""
    torch.manual_seed(0)
    model = Transformer(preset_args("debug", tie_embeddings=tied))
    x, y = torch.randint(0, 320, (4, 64)), torch.randint(0, 320, (4, 64))
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(320)) < 1.0


def test_init_is_seeded():
    torch.manual_seed(3)
    a = Transformer(preset_args("debug", n_layers=1)).state_dict()
    torch.manual_seed(3)
    b = Transformer(preset_args("debug", n_layers=1)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad,match", [
    ({"dim": 250}, "not divisible by model.n_heads"),
    ({"n_kv_heads": 3}, "not divisible by model.n_kv_heads"),
    ({"n_layers": 0}, "model.n_layers must be positive"),
])
def test_bad_shapes_are_clear_errors(bad, match):
    with pytest.raises(FP8LabError, match=match):
        preset_args("debug", **bad)


def test_unknown_preset():
    with pytest.raises(FP8LabError, match="known presets: debug, 125m"):
        preset_args("70b")
