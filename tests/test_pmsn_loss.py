"""Tests for lightly_msn.pmsn_loss against lightly's PMSN losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import PMSNCustomLoss as LightlyPMSNCustomLoss
from lightly.loss import PMSNLoss as LightlyPMSNLoss
from torch import Tensor

from lightly_msn import MSNLoss, PMSNCustomLoss, PMSNLoss

# lightly builds its power-law prior with torch.tensor(tensor), which warns
pytestmark = pytest.mark.filterwarnings("ignore:To copy construct:UserWarning")


def random_inputs(
    batch_size: int, views: int, prototypes: int, dim: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(batch_size * views, dim, generator=generator)
    targets = torch.randn(batch_size, dim, generator=generator)
    weights = torch.randn(prototypes, dim, generator=generator)
    return anchors.requires_grad_(), targets, weights.requires_grad_()


def loss_and_grads(loss_fn, anchors, targets, prototypes):
    loss = loss_fn(anchors, targets, prototypes)
    return (loss, *torch.autograd.grad(loss, [anchors, prototypes]))


def assert_all_close(actual, expected) -> None:
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def skewed_prior(mean_anchor_probs: Tensor) -> Tensor:
    weights = torch.arange(1, mean_anchor_probs.shape[0] + 1).float().sqrt()
    return weights / weights.sum()


PMSN_CASES = [
    # batch_size, views, prototypes, dim, kwargs
    (8, 1, 16, 4, {}),
    (16, 11, 64, 32, {}),
    (12, 3, 40, 8, {"temperature": 0.2, "power_law_exponent": 0.5}),
    (10, 2, 30, 8, {"sinkhorn_iterations": 0, "regularization_weight": 3.0}),
    (10, 2, 30, 8, {"regularization_weight": 0.0}),
]


@pytest.mark.parametrize("batch_size, views, prototypes, dim, kwargs", PMSN_CASES)
def test_pmsn_loss_matches_lightly(
    batch_size: int, views: int, prototypes: int, dim: int, kwargs: dict
) -> None:
    inputs = random_inputs(batch_size, views, prototypes, dim)
    assert_all_close(
        loss_and_grads(PMSNLoss(**kwargs), *inputs),
        loss_and_grads(LightlyPMSNLoss(**kwargs), *inputs),
    )


@pytest.mark.parametrize(
    "target_distribution, kwargs",
    [
        (skewed_prior, {}),
        (skewed_prior, {"temperature": 0.05, "regularization_weight": 2.0}),
        # a prior with zeros: those prototypes contribute 0, as in F.kl_div
        (lambda mean: torch.cat([torch.zeros(4), torch.full((20,), 0.05)]), {}),
    ],
)
def test_pmsn_custom_loss_matches_lightly(target_distribution, kwargs: dict) -> None:
    inputs = random_inputs(12, 4, 24, 16, seed=2)
    assert_all_close(
        loss_and_grads(PMSNCustomLoss(target_distribution, **kwargs), *inputs),
        loss_and_grads(LightlyPMSNCustomLoss(target_distribution, **kwargs), *inputs),
    )


def test_pmsn_regulariser_is_kl_from_the_power_law_prior() -> None:
    mean = torch.tensor([0.1, 0.3, 0.6])
    ranks = torch.arange(1, 4, dtype=torch.float64)
    prior = ranks**-0.75 / (ranks**-0.75).sum()
    expected = float((prior * (prior / mean.double()).log()).sum())
    loss_fn = PMSNLoss(power_law_exponent=0.75)
    assert loss_fn.regularization_loss(mean).item() == pytest.approx(expected, rel=1e-5)
    # not our MSNLoss's direction, KL(mean || prior)
    ours = MSNLoss(target_distribution="power_law", power_law_exponent=0.75)
    reverse = float((mean.double() * (mean.double() / prior).log()).sum())
    assert ours.regularization_loss(mean).item() == pytest.approx(reverse, rel=1e-5)
    assert abs(expected - reverse) > 1e-3


def test_pmsn_regulariser_stays_finite_where_a_prototype_has_no_mass() -> None:
    mean = torch.tensor([0.0, 0.4, 0.6], requires_grad=True)
    assert torch.isinf(LightlyPMSNLoss().regularization_loss(mean))
    value = PMSNLoss().regularization_loss(mean)
    (gradient,) = torch.autograd.grad(value, mean)
    assert torch.isfinite(value) and torch.isfinite(gradient).all()
    # the entries with mass keep lightly's gradient, -prior_k / mean_k
    prior = torch.tensor([1.0, 2**-0.25, 3**-0.25])
    prior = prior / prior.sum()
    torch.testing.assert_close(gradient[1:], -prior[1:] / mean.detach()[1:])


def test_pmsn_losses_with_low_precision_inputs_are_finite() -> None:
    anchors, targets, prototypes = (
        x.detach().half().requires_grad_(x.requires_grad)
        for x in random_inputs(16, 4, 32, 16, seed=3)
    )
    for loss_fn in (PMSNLoss(), PMSNCustomLoss(skewed_prior)):
        loss, grad_anchors, grad_prototypes = loss_and_grads(
            loss_fn, anchors, targets, prototypes
        )
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(grad_anchors).all()
        assert torch.isfinite(grad_prototypes).all()


def test_pmsn_custom_loss_passes_the_mean_prediction_to_the_prior() -> None:
    seen: list[Tensor] = []

    def recording_uniform(mean_anchor_probs: Tensor) -> Tensor:
        seen.append(mean_anchor_probs.detach().clone())
        size = mean_anchor_probs.shape[0]
        return mean_anchor_probs.new_ones(size) / size

    anchors, targets, prototypes = random_inputs(6, 2, 10, 8, seed=4)
    loss_fn = PMSNCustomLoss(target_distribution=recording_uniform)
    output = loss_fn.compute(anchors, targets, prototypes)
    mean = torch.softmax(
        F.normalize(anchors.detach(), dim=1)
        @ F.normalize(prototypes.detach(), dim=1).T
        / 0.1,
        dim=1,
    ).mean(dim=0)
    torch.testing.assert_close(seen[0], mean)
    expected = sum(0.1 * math.log(0.1 / m) for m in mean.tolist())
    assert output.regularization.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.target_distribution is recording_uniform


def test_pmsn_constructors_take_lightlys_arguments_and_validate_them() -> None:
    loss_fn = PMSNLoss(0.2, 5, 0.5, 0.3, False)  # lightly's positional order
    assert (loss_fn.temperature, loss_fn.sinkhorn_iterations) == (0.2, 5)
    assert (loss_fn.regularization_weight, loss_fn.power_law_exponent) == (0.5, 0.3)
    custom = PMSNCustomLoss(skewed_prior, 0.2, 5, 0.5, False)
    assert custom.target_distribution is skewed_prior
    assert (custom.temperature, custom.regularization_weight) == (0.2, 0.5)

    with pytest.raises(ValueError, match="temperature must be in"):
        PMSNLoss(temperature=0.0)
    with pytest.raises(ValueError, match="power_law_exponent must be finite"):
        PMSNLoss(power_law_exponent=float("nan"))
    with pytest.raises(ValueError, match="target_distribution must be a function"):
        PMSNCustomLoss(target_distribution=torch.ones(4) / 4)  # type: ignore[arg-type]


def test_pmsn_custom_loss_rejects_a_prior_of_the_wrong_shape() -> None:
    loss_fn = PMSNCustomLoss(target_distribution=lambda mean: torch.ones(3) / 3)
    with pytest.raises(ValueError, match=r"returned shape \(3,\) .* shape \(10,\)"):
        loss_fn(*random_inputs(4, 2, 10, 8))


def test_lightly_import_paths_resolve_to_ours() -> None:
    import lightly_msn
    from lightly_msn import pmsn_loss

    assert lightly_msn.PMSNLoss is pmsn_loss.PMSNLoss
    assert lightly_msn.PMSNCustomLoss is pmsn_loss.PMSNCustomLoss
    assert issubclass(PMSNLoss, MSNLoss) and issubclass(PMSNCustomLoss, MSNLoss)
    # lightly's own tests import this private helper from the module
    from lightly.loss.pmsn_loss import _power_law_distribution as lightly_prior

    torch.testing.assert_close(
        pmsn_loss._power_law_distribution(7, 0.5, torch.device("cpu")),
        lightly_prior(7, 0.5, torch.device("cpu")),
    )
