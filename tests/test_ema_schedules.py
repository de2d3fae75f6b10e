"""Tests for lightly_msn.ema and lightly_msn.schedules."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from lightly.models.utils import update_momentum as lightly_update_momentum
from lightly.utils.scheduler import cosine_schedule as lightly_cosine_schedule
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightly_msn.ema import update_momentum
from lightly_msn.schedules import (
    CosineSchedule,
    LinearSchedule,
    MSNSchedules,
    WarmupCosineSchedule,
    cosine_schedule,
)


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


def test_update_momentum_defaults_to_lightlys_parameters_only_update() -> None:
    torch.manual_seed(0)
    model = _bn_net()
    model(torch.randn(8, 4))  # running stats move, num_batches_tracked == 1
    ema_ours = _randomized_copy(_bn_net())
    ema_lightly = copy.deepcopy(ema_ours)
    buffers_before = [b.clone() for b in ema_ours.buffers()]

    update_momentum(model, ema_ours, 0.9)
    lightly_update_momentum(model, ema_lightly, 0.9)

    for ours, reference in zip(
        ema_ours.state_dict().values(), ema_lightly.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for old, new in zip(buffers_before, ema_ours.buffers(), strict=True):
        assert torch.equal(old, new)


def test_update_momentum_averages_float_buffers_and_copies_integer_buffers() -> None:
    torch.manual_seed(0)
    model, ema = _bn_net(), _bn_net()
    model.train()
    model(torch.randn(8, 4))
    model(torch.randn(8, 4))  # running stats move, num_batches_tracked == 2
    bn, ema_bn = model[1], ema[1]
    old_mean = ema_bn.running_mean.clone()
    old_var = ema_bn.running_var.clone()

    update_momentum(model, ema, m=0.75, update_buffers=True)

    torch.testing.assert_close(
        ema_bn.running_mean, 0.75 * old_mean + 0.25 * bn.running_mean
    )
    torch.testing.assert_close(
        ema_bn.running_var, 0.75 * old_var + 0.25 * bn.running_var
    )
    assert ema_bn.num_batches_tracked.item() == 2
    assert ema_bn.num_batches_tracked.dtype == torch.long


class _TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight  # tied parameter
        self.again = self.encoder  # shared submodule


def test_update_momentum_updates_tied_parameters_once() -> None:
    torch.manual_seed(0)
    model = _TiedNet()
    ema = _TiedNet()
    before = ema.encoder.weight.detach().clone()
    update_momentum(model, ema, m=0.5)
    torch.testing.assert_close(
        ema.decoder.weight, 0.5 * before + 0.5 * model.encoder.weight
    )


def test_update_momentum_rejects_bad_momentum_and_mismatched_models() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"momentum m must be in \[0, 1\], got 1.5"):
        update_momentum(model, copy.deepcopy(model), m=1.5)
    with pytest.raises(ValueError, match="parameters #0 differ"):
        update_momentum(model, nn.Linear(5, 3), m=0.5)
    with pytest.raises(ValueError, match="model has 2 parameters but model_ema has 4"):
        update_momentum(model, _bn_net(), m=0.5)
    # buffers are compared only when they are updated
    with_stats = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with_bn = _bn_net()
    update_momentum(with_stats, with_bn, m=0.5)
    with pytest.raises(ValueError, match="model has 0 buffers but model_ema has 3"):
        update_momentum(with_stats, with_bn, m=0.5, update_buffers=True)


def test_update_momentum_follows_changes_to_the_models() -> None:
    torch.manual_seed(0)
    model, ema = _bn_net(), _bn_net()
    update_momentum(model, ema, m=0.5)
    for net in (model, ema):
        net[0] = nn.Linear(4, 3)
    before = ema[0].weight.detach().clone()
    update_momentum(model, ema, m=0.5)
    torch.testing.assert_close(ema[0].weight, 0.5 * before + 0.5 * model[0].weight)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model has 6 parameters but model_ema has 4"):
        update_momentum(model, ema, m=0.5)


# --------------------------------------------------------------------- schedules


def _official_lr_values(steps, warmup, start_lr, ref_lr, final_lr, t_max):
    """Official src/utils.py WarmupCosineSchedule, value after each .step() call."""
    values, t_decay = [start_lr], t_max - warmup
    for step in range(1, steps):
        if step < warmup:
            value = start_lr + step / max(1, warmup) * (ref_lr - start_lr)
        else:
            progress = (step - warmup) / max(1, t_decay)
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            value = max(final_lr, final_lr + (ref_lr - final_lr) * cosine)
        values.append(value)
    return values


def _official_wd_values(steps, ref_wd, final_wd, t_max):
    """Official src/utils.py CosineWDSchedule, value after each .step() call."""
    values = [ref_wd]
    for step in range(1, steps):
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / t_max))
        values.append(min(final_wd, final_wd + (ref_wd - final_wd) * cosine))
    return values


def test_msn_schedules_match_official_code_with_ipe_scale() -> None:
    ipe, epochs, warmup_epochs = 7, 10, 2
    max_steps = ipe * epochs
    schedules = MSNSchedules.official(
        max_steps=max_steps, warmup_steps=warmup_epochs * ipe
    )
    t_max = int(1.25 * epochs * ipe)
    official_lr = _official_lr_values(
        max_steps, warmup_epochs * ipe, 2e-4, 1e-3, 1e-6, t_max
    )
    official_wd = _official_wd_values(max_steps, 0.04, 0.4, t_max)
    increment = (1.0 - 0.996) / (ipe * epochs * 1.25)
    for step in range(max_steps):
        values = schedules.values(step)
        assert values["lr"] == pytest.approx(official_lr[step], rel=1e-12)
        assert values["weight_decay"] == pytest.approx(official_wd[step], rel=1e-12)
        assert values["momentum"] == pytest.approx(0.996 + increment * step, rel=1e-12)
        assert values["sharpen_temperature"] == pytest.approx(0.25)


def test_schedules_start_end_and_warmup_values() -> None:
    lr = WarmupCosineSchedule(
        max_steps=100, warmup_steps=10, start_value=1.0, end_value=0.1,
        warmup_start_value=0.2,
    )  # fmt: skip
    assert lr(0) == pytest.approx(0.2)
    assert lr(5) == pytest.approx(0.6)
    assert lr(10) == pytest.approx(1.0)
    assert lr(55) == pytest.approx(0.55)  # half way through the decay
    assert lr(100) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)  # held after the horizon

    wd = CosineSchedule(max_steps=100, start_value=0.04, end_value=0.4)
    assert (wd(0), wd(50), wd(100), wd(150)) == pytest.approx((0.04, 0.22, 0.4, 0.4))

    momentum = LinearSchedule(max_steps=100, start_value=0.996, end_value=1.0)
    assert (momentum(0), momentum(25), momentum(100), momentum(101)) == pytest.approx(
        (0.996, 0.997, 1.0, 1.0)
    )


def test_schedules_are_monotonic() -> None:
    lr = WarmupCosineSchedule(100, 10, start_value=1.0, end_value=0.0)
    lr_values = [lr(step) for step in range(120)]
    assert all(a < b for a, b in itertools.pairwise(lr_values[:11]))
    assert all(a >= b for a, b in itertools.pairwise(lr_values[10:]))
    wd = CosineSchedule(100, 0.04, 0.4)
    assert all(wd(s) <= wd(s + 1) for s in range(120))
    sharpen = LinearSchedule(100, 0.25, 0.1)
    assert all(sharpen(s) >= sharpen(s + 1) for s in range(120))


def test_ipe_scale_stretches_schedules_by_1_25() -> None:
    momentum = LinearSchedule(100, 0.996, 1.0, ipe_scale=1.25)
    assert momentum(100) == pytest.approx(0.996 + 0.004 * 0.8)  # not yet 1.0
    assert momentum(125) == pytest.approx(1.0)
    lr = WarmupCosineSchedule(100, 0, 1.0, 0.0, ipe_scale=1.25)
    assert lr(100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.8)))
    assert lr(125) == pytest.approx(0.0)
    wd = CosineSchedule(100, 0.0, 1.0, ipe_scale=1.25)
    assert wd(100) < 1.0 and wd(125) == pytest.approx(1.0)
    stretched = LinearSchedule(80, 1.0, 0.0, ipe_scale=1.25)
    plain = LinearSchedule(100, 1.0, 0.0)
    assert [stretched(s) for s in range(130)] == pytest.approx(
        [plain(s) for s in range(130)]
    )


def test_schedule_errors() -> None:
    with pytest.raises(
        ValueError, match="LinearSchedule: max_steps must be >= 1, got 0"
    ):
        LinearSchedule(0, 1.0, 0.0)
    with pytest.raises(ValueError, match="CosineSchedule: ipe_scale must be > 0"):
        CosineSchedule(10, 1.0, 0.0, ipe_scale=0.0)
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, 12\]"):
        WarmupCosineSchedule(10, 13, 1.0, 0.0, ipe_scale=1.25)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        LinearSchedule(10, 1.0, 0.0)(-1)


def test_cosine_schedule_is_lightlys() -> None:
    assert cosine_schedule is lightly_cosine_schedule
    for step, max_steps in itertools.product(range(12), [1, 2, 5, 10]):
        if step > max_steps:
            continue  # lightly warns there, checked below
        if max_steps <= 1 or step >= max_steps - 1:
            expected = 0.5
        else:
            progress = step / (max_steps - 1)
            expected = 0.5 - (0.5 - 1.0) * (math.cos(math.pi * progress) + 1) / 2
        assert cosine_schedule(step, max_steps, 1.0, 0.5) == pytest.approx(expected)
    assert cosine_schedule(5, 10, 1.0, 0.0, period=10) == pytest.approx(0.0)
    assert type(cosine_schedule(3, 10, 1.0, 0.0)) is float
    with pytest.raises(ValueError, match="can't be negative"):
        cosine_schedule(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        cosine_schedule(1, 10, 1.0, 0.0, period=0)
    with pytest.warns(RuntimeWarning, match="exceeds max_steps"):
        cosine_schedule(11, 10, 1.0, 0.0)
