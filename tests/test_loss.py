import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import MSNLoss as LightlyMSNLoss
from lightly.loss import msn_loss as lightly_msn_loss
from torch import Tensor

from benchmarks.perf_components import clustered_inputs, paper_loss_float64
from lightly_msn.loss import (
    MSNLoss,
    MSNLossOutput,
    power_law_distribution,
    prototype_probabilities,
    sharpen,
    sinkhorn,
)


def random_inputs(
    batch_size: int, views: int, prototypes: int, dim: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(batch_size * views, dim, generator=generator)
    targets = torch.randn(batch_size, dim, generator=generator)
    weights = torch.randn(prototypes, dim, generator=generator)
    return anchors.requires_grad_(), targets, weights.requires_grad_()


def loss_and_grads(loss_fn, anchors, targets, prototypes, **kwargs):
    loss = loss_fn(anchors, targets, prototypes, **kwargs)
    grad_anchors, grad_prototypes = torch.autograd.grad(loss, [anchors, prototypes])
    return loss, grad_anchors, grad_prototypes


@pytest.mark.parametrize(
    "batch_size, views, prototypes, dim, temperature, sinkhorn_iterations, "
    "regularization_weight, sharpen_temperature",
    [
        (8, 1, 16, 4, 0.1, 3, 1.0, 0.25),
        (16, 11, 64, 32, 0.1, 3, 1.0, 0.25),
        (32, 3, 100, 16, 0.05, 0, 1.0, 0.25),
        (12, 2, 40, 8, 0.5, 5, 3.0, 0.5),
        (10, 4, 30, 8, 0.1, 1, 0.0, 1.0),
        (6, 2, 5000, 16, 0.1, 3, 1.0, 0.25),  # long rows: softmax in place
    ],
)
def test_matches_lightly_loss_and_gradients(
    batch_size: int,
    views: int,
    prototypes: int,
    dim: int,
    temperature: float,
    sinkhorn_iterations: int,
    regularization_weight: float,
    sharpen_temperature: float,
) -> None:
    inputs = random_inputs(batch_size, views, prototypes, dim)
    kwargs = dict(
        temperature=temperature,
        sinkhorn_iterations=sinkhorn_iterations,
        regularization_weight=regularization_weight,
    )
    expected = loss_and_grads(
        LightlyMSNLoss(**kwargs),
        *inputs,
        target_sharpen_temperature=sharpen_temperature,
    )
    actual = loss_and_grads(
        MSNLoss(**kwargs), *inputs, target_sharpen_temperature=sharpen_temperature
    )
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "entropy_weight, prior_name",
    [(0.0, "uniform"), (0.5, "uniform"), (0.0, "power_law"), (0.3, "tensor")],
)
def test_matches_float64_reference_with_entropy_and_priors(
    entropy_weight: float, prior_name: str
) -> None:
    anchors, targets, prototypes = random_inputs(12, 3, 20, 8, seed=3)
    if prior_name == "tensor":
        prior = torch.rand(20, generator=torch.Generator().manual_seed(4)) + 0.1
        prior = prior / prior.sum()
        loss_fn = MSNLoss(entropy_weight=entropy_weight, target_distribution=prior)
    elif prior_name == "power_law":
        prior = (1.0 / torch.arange(1, 21, dtype=torch.float64)) ** 0.25
        prior = prior / prior.sum()
        loss_fn = MSNLoss(
            entropy_weight=entropy_weight, target_distribution="power_law"
        )
    else:
        prior = None
        loss_fn = MSNLoss(entropy_weight=entropy_weight)
    expected = loss_and_grads(
        lambda a, t, p: paper_loss_float64(
            a, t, p, entropy_weight=entropy_weight, prior=prior
        ),
        anchors,
        targets,
        prototypes,
    )
    actual = loss_and_grads(loss_fn, anchors, targets, prototypes)
    for ours, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(
            ours.double(), reference.double(), rtol=1e-5, atol=1e-6
        )


def test_gradients_through_normalisation_match_f_normalize_for_any_row_norm() -> None:
    # the loss differentiates through the L2 normalisation by hand: check rows
    # that F.normalize clamps (zero and below eps) and rows of large norm
    anchors, targets, prototypes = random_inputs(6, 2, 10, 8, seed=5)
    with torch.no_grad():
        anchors[0] = 0.0
        anchors[1] *= 1e-14
        anchors[2] *= 1e4
        prototypes[3] *= 1e-14
        prototypes[4] *= 1e3
    expected = loss_and_grads(paper_loss_float64, anchors, targets, prototypes)
    actual = loss_and_grads(MSNLoss(), anchors, targets, prototypes)
    for ours, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(
            ours.double(), reference.double(), rtol=1e-5, atol=1e-6
        )
    assert actual[1][1].abs().max() > 1e6  # clamped rows: plain division by eps


def test_loss_terms_add_up_and_diagnostics_match_official_definitions() -> None:
    anchors, targets, prototypes = random_inputs(16, 3, 24, 8, seed=5)
    loss_fn = MSNLoss(regularization_weight=2.0, entropy_weight=0.5)
    output = loss_fn.compute(anchors, targets, prototypes)
    assert isinstance(output, MSNLossOutput)
    torch.testing.assert_close(
        output.loss,
        output.cross_entropy + 2.0 * output.regularization + 0.5 * output.entropy,
    )
    torch.testing.assert_close(
        output.loss, loss_fn(anchors, targets, prototypes), rtol=0, atol=0
    )
    # ME-MAX: KL(mean || uniform) == log K - H(mean)
    torch.testing.assert_close(
        output.regularization, math.log(24) - output.me_max_entropy
    )

    # targets as lightly computes them, diagnostics as the official code logs them
    normalized = [F.normalize(x.detach(), dim=1) for x in (targets, prototypes)]
    target_probs = lightly_msn_loss.sinkhorn(
        lightly_msn_loss.sharpen(
            lightly_msn_loss.prototype_probabilities(*normalized, temperature=0.1),
            temperature=0.25,
        )
    )
    assert output.num_target_prototypes.item() == len(
        set(target_probs.argmax(dim=1).tolist())
    )
    torch.testing.assert_close(
        output.max_target_probability, target_probs.max(dim=1).values.mean()
    )
    torch.testing.assert_close(
        output.min_target_probability, target_probs.min(dim=1).values.mean()
    )
    for field in (
        "cross_entropy",
        "regularization",
        "entropy",
        "num_target_prototypes",
        "max_target_probability",
        "min_target_probability",
        "me_max_entropy",
    ):
        value = getattr(output, field)
        assert value.dim() == 0 and not value.requires_grad, field


def test_collapsed_targets_are_counted_as_one_prototype() -> None:
    anchors, _, prototypes = random_inputs(8, 2, 16, 4)
    targets = prototypes[3].detach().expand(8, 4).clone()
    output = MSNLoss(sinkhorn_iterations=0).compute(anchors, targets, prototypes)
    assert output.num_target_prototypes.item() == 1


@pytest.mark.parametrize("temperature", [0.03, 0.025])
def test_finite_at_low_temperature_where_lightly_is_not(temperature: float) -> None:
    anchors, targets, prototypes = clustered_inputs()
    anchors.requires_grad_()
    prototypes.requires_grad_()
    lightly_loss = LightlyMSNLoss(temperature=temperature)(anchors, targets, prototypes)
    assert not torch.isfinite(lightly_loss)

    ours = loss_and_grads(
        MSNLoss(temperature=temperature), anchors, targets, prototypes
    )
    reference = loss_and_grads(
        lambda a, t, p: paper_loss_float64(a, t, p, temperature=temperature),
        anchors,
        targets,
        prototypes,
    )
    for value, expected in zip(ours, reference, strict=True):
        assert torch.isfinite(value).all()
        torch.testing.assert_close(
            value.double(), expected.double(), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    anchors, targets, prototypes = random_inputs(32, 4, 64, 16)
    low = [
        x.detach().to(dtype).requires_grad_(x.requires_grad)
        for x in (anchors, targets, prototypes)
    ]
    loss, grad_anchors, grad_prototypes = loss_and_grads(MSNLoss(), *low)
    assert loss.dtype == torch.float32
    assert grad_anchors.dtype == dtype and grad_prototypes.dtype == dtype
    assert torch.isfinite(grad_anchors).all() and torch.isfinite(grad_prototypes).all()
    # same value as float32 on the rounded inputs: no precision lost inside
    rounded = [x.detach().float().requires_grad_() for x in low]
    expected = loss_and_grads(MSNLoss(), rounded[0], rounded[1], rounded[2])
    torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=1e-6)

    lightly_low = [x.detach().requires_grad_(x.requires_grad) for x in low]
    lightly_loss, lightly_grad, _ = loss_and_grads(LightlyMSNLoss(), *lightly_low)
    if dtype == torch.float16:  # lightly's p ** -t overflows in half precision
        assert not torch.isfinite(lightly_grad).all()
    else:  # finite but computed in bfloat16: off in the second digit
        assert abs(lightly_loss.float() - expected[0]) > 1e-2


def test_autocast_keeps_the_loss_in_float32() -> None:
    anchors, targets, prototypes = random_inputs(8, 2, 16, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = MSNLoss()(anchors, targets, prototypes)
    torch.testing.assert_close(loss, MSNLoss()(anchors, targets, prototypes))


def test_prototypes_passed_with_gradient_are_trained() -> None:
    anchors, targets, prototypes = random_inputs(8, 2, 16, 8)
    optimizer = torch.optim.SGD([prototypes], lr=0.1)
    before = prototypes.detach().clone()
    MSNLoss()(anchors, targets, prototypes).backward()
    optimizer.step()
    assert not torch.equal(before, prototypes.detach())


def test_gradients_do_not_flow_into_targets() -> None:
    anchors, targets, prototypes = random_inputs(8, 2, 16, 8)
    targets.requires_grad_()
    MSNLoss()(anchors, targets, prototypes).backward()
    assert targets.grad is None


def test_module_functions_match_lightly() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(10, 6, generator=generator)
    prototypes = torch.randn(7, 6, generator=generator)
    probabilities = prototype_probabilities(queries, prototypes, temperature=0.2)
    torch.testing.assert_close(
        probabilities,
        lightly_msn_loss.prototype_probabilities(queries, prototypes, 0.2),
    )
    torch.testing.assert_close(
        sharpen(probabilities, 0.25), lightly_msn_loss.sharpen(probabilities, 0.25)
    )
    torch.testing.assert_close(
        sinkhorn(probabilities, iterations=4),
        lightly_msn_loss.sinkhorn(probabilities, iterations=4),
    )
    assert sinkhorn(probabilities, iterations=0) is probabilities


def test_sinkhorn_balances_prototypes_and_survives_empty_ones() -> None:
    probabilities = torch.softmax(
        torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), dim=1
    )
    balanced = sinkhorn(probabilities, iterations=50)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(12))
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((4,), 3.0))

    with_empty = torch.cat([probabilities, torch.zeros(12, 1)], dim=1)
    assert torch.isnan(lightly_msn_loss.sinkhorn(with_empty)).any()
    ours = sinkhorn(with_empty)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[:, -1], torch.zeros(12))


def test_sharpen_is_finite_where_powers_underflow() -> None:
    probabilities = torch.tensor([[1e-30, 2e-30, 1.0 - 3e-30], [0.5, 0.25, 0.25]])
    probabilities[0] = torch.tensor([1e-30, 2e-30, 3e-30])  # unnormalised but tiny
    assert torch.isnan(lightly_msn_loss.sharpen(probabilities, 0.1)).any()
    sharpened = sharpen(probabilities, 0.1)
    expected = torch.tensor([1.0, 2.0**10, 3.0**10]) / (1 + 2.0**10 + 3.0**10)
    torch.testing.assert_close(sharpened[0], expected)
    torch.testing.assert_close(
        sharpened[1], lightly_msn_loss.sharpen(probabilities[1:], 0.1)[0]
    )


@pytest.mark.filterwarnings("ignore:To copy construct:UserWarning")
def test_power_law_distribution_matches_lightly() -> None:
    from lightly.loss.pmsn_loss import _power_law_distribution

    torch.testing.assert_close(
        power_law_distribution(50, 0.25),
        _power_law_distribution(50, 0.25, torch.device("cpu")).float(),
    )


def test_deprecated_me_max_weight_warns_and_takes_precedence() -> None:
    with pytest.warns(DeprecationWarning, match="regularization_weight"):
        loss_fn = MSNLoss(regularization_weight=1.0, me_max_weight=0.3)
    assert loss_fn.regularization_weight == 0.3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be in"),
        ({"temperature": -1.0}, "temperature must be in"),
        ({"sinkhorn_iterations": -1}, "sinkhorn_iterations must be >= 0"),
        ({"regularization_weight": -0.5}, "regularization_weight must be in"),
        ({"entropy_weight": float("nan")}, "entropy_weight must be in"),
        ({"target_distribution": "zipf"}, "target_distribution must be"),
        ({"target_distribution": torch.tensor([0.5, 0.6])}, "must sum to 1"),
        ({"target_distribution": torch.tensor([1.0, 0.0])}, "finite and > 0"),
        ({"target_distribution": torch.ones(2, 2) / 4}, r"shape \(num_prototypes,\)"),
    ],
)
def test_invalid_constructor_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MSNLoss(**kwargs)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((10, 8), (4, 8), (16, 8)), r"anchors \(10\) must be a multiple .* \(4\)"),
        (((8, 8), (4, 6), (16, 8)), "same embedding dimension"),
        (((8, 8), (4, 8), (16, 5)), "same embedding dimension"),
        (((8,), (4, 8), (16, 8)), r"anchors must have shape \(num_rows, dim\)"),
        (((8, 8), (0, 8), (16, 8)), "targets must not be empty"),
    ],
)
def test_mismatched_shapes_raise(shapes: tuple, message: str) -> None:
    anchors, targets, prototypes = (torch.randn(*shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        MSNLoss()(anchors, targets, prototypes)


@pytest.mark.parametrize(
    "name, position", [("anchors", 0), ("targets", 1), ("prototypes", 2)]
)
def test_non_finite_inputs_raise_naming_the_input(name: str, position: int) -> None:
    inputs = [torch.randn(8, 4), torch.randn(4, 4), torch.randn(6, 4)]
    inputs[position][1, 2] = float("nan")
    with pytest.raises(ValueError, match=f"Non-finite values .* in {name}"):
        MSNLoss()(*inputs)


def test_prior_size_must_match_number_of_prototypes() -> None:
    loss_fn = MSNLoss(target_distribution=torch.full((5,), 0.2))
    with pytest.raises(ValueError, match="5 entries but there are 6 prototypes"):
        loss_fn(torch.randn(8, 4), torch.randn(4, 4), torch.randn(6, 4))


def test_bad_sharpen_temperature_raises() -> None:
    with pytest.raises(ValueError, match="target_sharpen_temperature must be in"):
        MSNLoss()(torch.randn(8, 4), torch.randn(4, 4), torch.randn(6, 4), 0.0)


def test_upstream_gradient_scales_and_frozen_inputs_get_none() -> None:
    anchors, targets, prototypes = random_inputs(8, 3, 16, 8)
    loss_fn = MSNLoss(entropy_weight=0.2)
    _, grad_anchors, grad_prototypes = loss_and_grads(
        loss_fn, anchors, targets, prototypes
    )
    scaled = loss_and_grads(
        lambda a, t, p: -2.5 * loss_fn(a, t, p), anchors, targets, prototypes
    )
    torch.testing.assert_close(scaled[1], -2.5 * grad_anchors)
    torch.testing.assert_close(scaled[2], -2.5 * grad_prototypes)

    frozen = prototypes.detach()
    loss_fn(anchors, targets, frozen).backward()
    torch.testing.assert_close(anchors.grad, grad_anchors)


def test_sinkhorn_rejects_nan_inf_and_negative_entries() -> None:
    probabilities = torch.softmax(
        torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1
    )
    with_nan = probabilities.clone()
    with_nan[2, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"1 of 24 entries are NaN \(the first at row 2, column 1\)"
    ):
        sinkhorn(with_nan)
    with_bad = probabilities.clone()
    with_bad[0, 3] = float("inf")
    with_bad[4, 0] = -0.5
    with pytest.raises(ValueError, match="2 of 24 entries are infinite or negative"):
        sinkhorn(with_bad)
    # no iterations: returned unchanged, as lightly's
    assert sinkhorn(with_nan, iterations=0) is with_nan


# ------------------------------------------------- the regularization_loss hook


def ramp_regularizer(mean_anchor_probs: Tensor) -> Tensor:
    """A regulariser unlike the default KL, so an ignored override shows."""
    size = mean_anchor_probs.shape[0]
    ramp = torch.linspace(1.0, 3.0, size, dtype=mean_anchor_probs.dtype)
    return 40.0 * (mean_anchor_probs - ramp / ramp.sum()).square().sum()


class RampMSNLoss(MSNLoss):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[Tensor] = []

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        self.seen.append(mean_anchor_probs.detach().clone())
        return ramp_regularizer(mean_anchor_probs)


class LightlyRampMSNLoss(LightlyMSNLoss):
    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        return ramp_regularizer(mean_anchor_probs)


@pytest.mark.parametrize(
    "views, temperature, regularization_weight", [(1, 0.1, 1.0), (4, 0.2, 2.5)]
)
def test_overridden_regularization_loss_is_used_with_its_gradient(
    views: int, temperature: float, regularization_weight: float
) -> None:
    anchors, targets, prototypes = random_inputs(10, views, 24, 8, seed=7)
    kwargs = dict(temperature=temperature, regularization_weight=regularization_weight)
    loss_fn = RampMSNLoss(**kwargs)
    actual = loss_and_grads(loss_fn, anchors, targets, prototypes)
    # lightly's formula, differentiated by plain autograd, with the same hook
    expected = loss_and_grads(
        LightlyRampMSNLoss(**kwargs), anchors, targets, prototypes
    )
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    # the hook saw the mean anchor prediction, computed independently here
    predictions = torch.softmax(
        F.normalize(anchors.detach(), dim=1)
        @ F.normalize(prototypes.detach(), dim=1).T
        / temperature,
        dim=1,
    )
    assert loss_fn.seen[0].dtype == torch.float32
    torch.testing.assert_close(loss_fn.seen[0], predictions.mean(dim=0))
    output = loss_fn.compute(anchors, targets, prototypes)
    torch.testing.assert_close(
        output.regularization, ramp_regularizer(predictions.mean(dim=0))
    )
    torch.testing.assert_close(
        output.loss,
        output.cross_entropy + regularization_weight * output.regularization,
    )
    # and it is not the default regulariser
    default = MSNLoss(**kwargs)(anchors, targets, prototypes)
    assert abs(default.item() - actual[0].item()) > 1e-2


def test_overridden_hook_combines_with_entropy_term() -> None:
    anchors, targets, prototypes = random_inputs(6, 3, 16, 8, seed=8)

    def reference(a: Tensor, t: Tensor, p: Tensor) -> Tensor:
        # float64 MSN loss without regulariser, plus the hook on its mean prediction
        base = paper_loss_float64(
            a, t, p, regularization_weight=0.0, entropy_weight=0.4
        )
        predictions = torch.softmax(
            F.normalize(a.double(), dim=1) @ F.normalize(p.double(), dim=1).T / 0.1,
            dim=1,
        )
        return base + 0.7 * ramp_regularizer(predictions.mean(dim=0))

    expected = loss_and_grads(reference, anchors, targets, prototypes)
    actual = loss_and_grads(
        RampMSNLoss(regularization_weight=0.7, entropy_weight=0.4),
        anchors,
        targets,
        prototypes,
    )
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=1e-6)


def test_zero_regularization_weight_does_not_call_the_hook() -> None:
    class FailingHook(MSNLoss):
        def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
            raise AssertionError("the hook must not be called")

    anchors, targets, prototypes = random_inputs(8, 2, 16, 8)
    loss_fn = FailingHook(regularization_weight=0.0)
    output = loss_fn.compute(anchors, targets, prototypes)
    assert output.regularization.item() == 0.0
    expected = loss_and_grads(
        LightlyMSNLoss(regularization_weight=0.0), anchors, targets, prototypes
    )
    actual = loss_and_grads(loss_fn, anchors, targets, prototypes)
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_hook_must_return_a_scalar() -> None:
    class VectorHook(MSNLoss):
        def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
            return mean_anchor_probs

    with pytest.raises(
        ValueError, match=r"VectorHook.regularization_loss must return a scalar"
    ):
        VectorHook()(*random_inputs(4, 2, 6, 4))


def test_default_hook_is_kl_to_the_prior_with_finite_gradient_at_zero() -> None:
    mean = torch.tensor([0.0, 0.25, 0.75], requires_grad=True)
    value = MSNLoss().regularization_loss(mean)
    expected = 0.25 * math.log(0.25 * 3) + 0.75 * math.log(0.75 * 3)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    (gradient,) = torch.autograd.grad(value, mean)
    assert torch.isfinite(gradient).all()
    # d/dm_k m_k log(m_k K) = log(m_k K) + 1 where m_k > 0
    torch.testing.assert_close(
        gradient[1:], torch.tensor([math.log(0.75) + 1, math.log(2.25) + 1])
    )
    # lightly's hook on the same input: the same value (its gradient is NaN at 0)
    lightly_value = LightlyMSNLoss().regularization_loss(mean.detach())
    assert lightly_value.item() == pytest.approx(expected, rel=1e-6)
