"""models/kernels.py: the few-row product equals F.linear to fp32 rounding, applies only where it should, and
is switched on and off per block (the benchmark's before/after) without leaving anything patched."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.kernels import FEW_ROWS, few_row_linear, few_row_linears


def test_the_few_row_product_is_f_linear():
    weight, bias = torch.randn(300, 64), torch.randn(300)
    shapes = [(rows, 64) for rows in range(1, FEW_ROWS + 2)] + [(2, 5, 64), (3, 4, 64)]  # every padding case
    for shape in shapes:
        x = torch.randn(*shape)
        assert torch.allclose(few_row_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
        assert few_row_linear(x, weight).shape == (*shape[:-1], 300)


def test_the_patch_covers_every_linear_and_is_undone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    expected = model(x)
    with few_row_linears(model):
        assert all("forward" in m.__dict__ for m in model if isinstance(m, torch.nn.Linear))
        assert torch.allclose(model(x), expected, atol=1e-6)
        with few_row_linears(model):  # nested: harmless
            pass
        assert all("forward" in m.__dict__ for m in model if isinstance(m, torch.nn.Linear))
    assert not any("forward" in m.__dict__ for m in model)
    with few_row_linears(active=False):  # an explicit "off" holds for the blocks inside it
        with few_row_linears(model):
            assert not any("forward" in m.__dict__ for m in model)


def test_a_draft_vocabulary_head_decodes_through_the_kernel_and_trains_through_f_linear(monkeypatch):
    """The reduced head is no nn.Linear; it names its product (`FEW_ROW_METHOD`), so the decoder's patch reaches it
    inside a block over the drafter, as it reaches the layers, follows the same on/off switch, and leaves it as it
    was outside (training: F.linear, gradients as ever)."""
    import models.kernels as kernels
    from models.drafter import ReducedVocabHead
    head = ReducedVocabHead(64, torch.arange(0, 600, 2), vocab_size=600)
    drafter = torch.nn.Sequential(torch.nn.Linear(64, 64), head)
    torch.nn.init.normal_(head.weight)
    x = torch.randn(1, 64)
    calls = []
    monkeypatch.setattr(kernels, "few_row_linear", lambda *args: calls.append(args) or few_row_linear(*args))
    with torch.no_grad(), few_row_linears(drafter):
        decoded = head.compact(x)
        assert len(calls) == 1 and torch.allclose(decoded, F.linear(x, head.weight), atol=1e-5)
        full = head(x)
        assert len(calls) == 2 and torch.isinf(full[:, 1::2]).all() and torch.allclose(full[:, ::2], decoded, atol=1e-5)
    with torch.no_grad(), few_row_linears(active=False), few_row_linears(drafter):  # the benchmark's "before" side
        head.compact(x)
    assert len(calls) == 2 and "compact" not in head.__dict__
    head.compact(x).sum().backward()  # outside any block: F.linear
    assert len(calls) == 2 and head.weight.grad is not None
