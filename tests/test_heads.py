"""Tests for lightly_msn.heads."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import MSNLoss as LightlyMSNLoss
from lightly.models.modules.heads import MSNProjectionHead as LightlyMSNProjectionHead
from torch import nn

from lightly_msn.heads import MSNProjectionHead, MSNPrototypes


def test_projection_head_is_lightlys_architecture() -> None:
    torch.manual_seed(0)
    ours = MSNProjectionHead(input_dim=12, hidden_dim=20, output_dim=8)
    reference = LightlyMSNProjectionHead(input_dim=12, hidden_dim=20, output_dim=8)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(6, 12)
    torch.testing.assert_close(ours(x), reference(x))
    assert ours(x).shape == (6, 8)
    layers = [type(m) for m in ours.modules() if not isinstance(m, nn.Sequential)]
    assert layers[1:] == [
        nn.Linear, nn.BatchNorm1d, nn.GELU,
        nn.Linear, nn.BatchNorm1d, nn.GELU,
        nn.Linear,
    ]  # fmt: skip


def test_prototypes_shape_and_official_uniform_init() -> None:
    torch.manual_seed(0)
    prototypes = MSNPrototypes(num_prototypes=1024, dim=64)
    weight = prototypes.weight
    assert isinstance(weight, nn.Parameter) and weight.requires_grad
    assert weight.shape == (1024, 64)
    assert prototypes() is weight
    bound = 1 / math.sqrt(64)
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.99 * bound  # fills the interval
    # uniform on [-b, b]: mean 0, variance b^2 / 3
    assert abs(weight.mean().item()) < 0.01 * bound
    assert weight.var().item() == pytest.approx(bound**2 / 3, rel=0.03)
    assert "num_prototypes=1024, dim=64" in repr(prototypes)


def test_prototypes_learn_when_passed_with_gradient_not_as_data() -> None:
    torch.manual_seed(0)
    prototypes = MSNPrototypes(num_prototypes=16, dim=8)
    before = prototypes.weight.detach().clone()
    optimizer = torch.optim.SGD(prototypes.parameters(), lr=0.1)
    anchors = torch.randn(12, 8, requires_grad=True)
    targets = torch.randn(4, 8)
    criterion = LightlyMSNLoss()

    criterion(anchors, targets, prototypes.weight.data).backward()  # lightly examples
    assert prototypes.weight.grad is None

    criterion(anchors, targets, prototypes.weight).backward()
    assert prototypes.weight.grad is not None
    assert prototypes.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(prototypes.weight.detach(), before)


def test_prototypes_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_prototypes must be >= 1, got 0"):
        MSNPrototypes(num_prototypes=0)
    with pytest.raises(ValueError, match="dim must be >= 1, got -2"):
        MSNPrototypes(dim=-2)
