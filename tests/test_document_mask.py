"""data.document_mask: documents packed into one window do not attend to each other, so the
loss of a packed window equals the sum of its documents' losses run one by one (RoPE is
relative: no position reset is needed), in every recipe, eager and compiled, and with the
chunked loss; without the mask the packed loss differs (the check can fail)."""

from __future__ import annotations

import copy

import pytest
import torch

from fp8lab.data.loader import IGNORE_INDEX
from fp8lab.models import Transformer, preset_args
from fp8lab.models.llama import document_mask
from fp8lab.precision import convert
from fp8lab.train.step import model_loss

VOCAB, EOS = 96, 95
LENGTHS = (11, 5, 16)  # three documents (EOS included) filling one window of 32 tokens + 1


def _model(recipe: str | None) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(preset_args("debug", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128))
    if recipe:
        convert(m, recipe=recipe, emulate="on")
    return m


def _packed():
    """One window of three documents, each ending in EOS, led in by the previous window's last
    EOS, as (inputs, targets, docs) of 32 positions. A position whose input is EOS starts a
    document (the EOS is its BOS), as the loader numbers them."""
    g = torch.Generator().manual_seed(3)
    docs = [torch.cat([torch.randint(0, EOS, (n - 1,), generator=g), torch.tensor([EOS])]) for n in LENGTHS]
    window = torch.cat([torch.tensor([EOS]), *docs])
    x, y = window[:-1][None], window[1:][None]
    return x, y, torch.cumsum(x == EOS, dim=1)


def test_the_mask_is_causal_and_block_diagonal():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = document_mask(docs)[0, 0]
    assert m.shape == (6, 6) and m.dtype == torch.bool
    for i in range(6):
        for j in range(6):
            assert bool(m[i, j]) == (j <= i and docs[0, i] == docs[0, j]), (i, j)


# fp8-rowwise scales each token's activations on their own in forward, so the loss of a token
# does not depend on its neighbours; tensorwise scales see the whole window (packed and alone
# differ by quantisation), and the weight-gradient casts of every recipe see all tokens.
@pytest.mark.parametrize("recipe", [None, "fp8-rowwise"])
@pytest.mark.parametrize("head,chunk", [("plain", 0), ("fused", 9)])
def test_a_packed_window_with_the_mask_gives_the_documents_own_losses(recipe, head, chunk):
    model = _model(recipe)
    x, y, docs = _packed()
    # Each document alone, starting at position 0 with the EOS that precedes it as its first input.
    starts = [0, *torch.cumsum(torch.tensor(LENGTHS), 0).tolist()]
    separate = copy.deepcopy(model)
    total = sum(model_loss(separate, x[:, a:b], y[:, a:b]) for a, b in zip(starts, starts[1:]))
    total.backward()
    packed = model_loss(model, x, y, docs=docs, head=head, chunk_tokens=chunk)
    packed.backward()
    assert packed.item() == pytest.approx(total.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), separate.parameters()):
        tol = dict(rtol=1e-4, atol=1e-6) if recipe is None else dict(rtol=0.1, atol=1e-3)
        assert torch.allclose(p.grad, q.grad, **tol), name
    with torch.no_grad():  # without the mask, later documents see earlier ones: a different loss
        unmasked = model_loss(model, x, y).item()
    # A small model at init barely uses its context, so the gap is small, but far above rounding.
    assert abs(unmasked - total.item()) > 20 * max(abs(packed.item() - total.item()), 1e-6 * total.item())


def test_ignored_targets_and_the_compiled_model_keep_the_equality():
    eager = _model(None)
    compiled = copy.deepcopy(eager)
    for block in compiled.layers.values():
        block.compile(dynamic=False)
    x, y, docs = _packed()
    y = y.clone()
    y[0, 11:16] = IGNORE_INDEX  # the second document carries no loss (instruction data's prompts)
    a = model_loss(eager, x, y, docs=docs)
    b = model_loss(compiled, x, y, docs=docs)
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    starts = [0, 11, 16, 32]
    parts = sum(model_loss(eager, x[:, s:e], y[:, s:e]) for s, e in zip(starts, starts[1:]))
    assert a.item() == pytest.approx(parts.item(), rel=1e-5)
