"""Tests for lightly_msn.ema and lightly_msn.schedules."""

from __future__ import annotations

import copy

import pytest
import torch
from lightly.models.utils import update_momentum as lightly_update_momentum
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightly_msn.ema import update_momentum


def _tiny_vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )


def _randomized_copy(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in other.parameters():
            tensor.normal_()
    return other


@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 1.0])
def test_update_momentum_equals_lightly_on_vit(m: float) -> None:
    torch.manual_seed(0)
    model = _tiny_vit()
    ema_ours = _randomized_copy(model)
    ema_lightly = copy.deepcopy(ema_ours)

    update_momentum(model, ema_ours, m=m)
    with torch.no_grad():
        lightly_update_momentum(model, ema_lightly, m=m)

    for ours, reference in zip(
        ema_ours.parameters(), ema_lightly.parameters(), strict=True
    ):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_update_momentum_matches_formula_and_records_no_graph() -> None:
    torch.manual_seed(0)
    model = _tiny_vit()
    ema = _randomized_copy(model)
    before = [p.detach().clone() for p in ema.parameters()]

    update_momentum(model, ema, m=0.9)

    for old, new, source in zip(
        before, ema.parameters(), model.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * source)
        assert new.grad_fn is None
        assert new.grad is None
    assert all(p.grad is None for p in model.parameters())


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_update_momentum_averages_float_buffers_and_copies_integer_buffers() -> None:
    torch.manual_seed(0)
    model, ema = _bn_net(), _bn_net()
    model.train()
    model(torch.randn(8, 4))
    model(torch.randn(8, 4))  # running stats move, num_batches_tracked == 2
    bn, ema_bn = model[1], ema[1]
    old_mean = ema_bn.running_mean.clone()
    old_var = ema_bn.running_var.clone()

    update_momentum(model, ema, m=0.75)

    torch.testing.assert_close(
        ema_bn.running_mean, 0.75 * old_mean + 0.25 * bn.running_mean
    )
    torch.testing.assert_close(
        ema_bn.running_var, 0.75 * old_var + 0.25 * bn.running_var
    )
    assert ema_bn.num_batches_tracked.item() == 2
    assert ema_bn.num_batches_tracked.dtype == torch.long


def test_update_momentum_can_leave_buffers_untouched_like_lightly() -> None:
    torch.manual_seed(0)
    model, ema = _bn_net(), _bn_net()
    model(torch.randn(8, 4))
    before = [b.clone() for b in ema.buffers()]

    update_momentum(model, ema, m=0.5, update_buffers=False)

    for old, new in zip(before, ema.buffers(), strict=True):
        assert torch.equal(old, new)


def test_update_momentum_rejects_bad_momentum_and_mismatched_models() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"momentum m must be in \[0, 1\], got 1.5"):
        update_momentum(model, copy.deepcopy(model), m=1.5)
    with pytest.raises(ValueError, match="parameters #0 differ"):
        update_momentum(model, nn.Linear(5, 3), m=0.5)
    with pytest.raises(ValueError, match="model has 2 parameters but model_ema has 4"):
        update_momentum(model, _bn_net(), m=0.5)
