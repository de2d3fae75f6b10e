"""The MSN loss: cross-entropy to sharpened targets plus mean-entropy regularisation.

A drop-in replacement for ``lightly.loss.MSNLoss`` with the same constructor and
forward signature. It computes the same quantity as lightly's and the official
implementation [1], but in the log domain and without materialising the repeated
targets, so it stays finite at low temperatures and in bfloat16/float16, uses less
than half the memory and runs faster (the project's documentation has the
measurements).

The objective of [0] (Sec. 3, "Similarity Metric and Predictions" and "Training
Objective") for ``B`` targets with ``M`` anchor views each, ``K`` prototypes ``q``,
temperature ``tau`` and sharpening temperature ``T``::

    p_{i,m} = softmax(<z_{i,m}, q> / tau)            # anchor predictions
    p_i^+   = sharpen(softmax(<z_i^+, q> / tau), T)  # targets, no gradient
    loss    = 1/(M B) sum_{i,m} H(p_i^+, p_{i,m}) - lambda H(mean_{i,m} p_{i,m})

with ``sharpen(p, T)_k = p_k^(1/T) / sum_j p_j^(1/T)``, which is the same as
``softmax(<z_i^+, q> / (tau T))``: this identity is how the targets are computed
here. The ``- lambda H(mean p)`` term (ME-MAX) is written as ``lambda KL(mean p ||
uniform)``, which differs from it only by the constant ``lambda log K``; lightly and
the official code add that constant too, so the values agree.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
- [1]: https://github.com/facebookresearch/msn
- [2]: The Hidden Uniform Cluster Prior in Self-Supervised Learning (PMSN), 2022,
  https://arxiv.org/abs/2210.07277
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightly_msn import distributed

TargetDistribution = Literal["uniform", "power_law"] | Tensor


def prototype_probabilities(
    queries: Tensor,
    prototypes: Tensor,
    temperature: float,
) -> Tensor:
    """Returns the probability of each query to belong to each prototype.

    This is the prediction ``softmax(<z, q> / tau)`` of [0], Sec. 3. Queries and
    prototypes are used as given; the loss L2-normalises them first.

    - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141

    Args:
        queries:
            Tensor with shape (batch_size, dim).
        prototypes:
            Tensor with shape (num_prototypes, dim).
        temperature:
            Inverse scaling factor for the similarities, in (0, inf).

    Returns:
        Probability tensor with shape (batch_size, num_prototypes) that sums to 1
        along the prototype dimension.

    Raises:
        ValueError: If the temperature is not positive.
    """
    _check_positive(temperature, "temperature")
    return F.softmax(torch.matmul(queries, prototypes.T) / temperature, dim=1)


def sharpen(probabilities: Tensor, temperature: float) -> Tensor:
    """Sharpens probabilities with the given temperature, as in [0], Sec. 3.

    ``sharpen(p, T)_k = p_k^(1/T) / sum_j p_j^(1/T)``, evaluated in the log domain
    as ``softmax(log(p) / T)``, so rows whose powers all underflow (small ``T`` or
    very confident ``p``) still sum to 1 instead of becoming NaN.

    - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141

    Args:
        probabilities:
            Tensor with shape (batch_size, num_prototypes), rows summing to 1.
        temperature:
            Temperature in (0, 1]. A lower temperature sharpens more.

    Returns:
        Sharpened probabilities with shape (batch_size, num_prototypes).

    Raises:
        ValueError: If the temperature is not positive.
    """
    _check_positive(temperature, "temperature")
    return F.softmax(torch.log(probabilities) / temperature, dim=1)


@torch.no_grad()
def sinkhorn(
    probabilities: Tensor,
    iterations: int = 3,
    gather_distributed: bool = False,
) -> Tensor:
    """Runs Sinkhorn normalisation on the target probabilities as in [0] and [1].

    Alternately rescales the probabilities so that every prototype receives the
    same total mass over the (global) batch and every sample's row sums to 1. The
    iterations run in the log domain, so prototypes with (numerically) zero mass
    do not turn the result into NaN.

    - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
    - [1]: https://github.com/facebookresearch/msn

    Args:
        probabilities:
            Probabilities tensor with shape (batch_size, num_prototypes).
        iterations:
            Number of Sinkhorn iterations. Set to 0 to disable.
        gather_distributed:
            If True, the prototype masses are computed over the batches of all
            ranks.

    Returns:
        The normalised probabilities, shape (batch_size, num_prototypes), rows
        summing to 1. With ``iterations <= 0`` the input is returned unchanged.

    Raises:
        ValueError: If ``iterations > 0`` and an entry is NaN, infinite or
            negative (in the log domain such an entry would silently empty its
            prototype's column instead of propagating).
    """
    if iterations <= 0:
        return probabilities
    _check_probabilities(probabilities)
    log_probabilities = torch.log(probabilities.float())
    log_normalized = _log_sinkhorn(
        log_probabilities, iterations, gather_distributed, may_have_empty_columns=True
    )
    return log_normalized.exp().to(probabilities.dtype)


def power_law_distribution(
    size: int, exponent: float, device: torch.device | str | None = None
) -> Tensor:
    """Power-law prior of PMSN [2]: entry ``k`` is proportional to ``k^-exponent``.

    Equals lightly's power-law target distribution (``k`` from 1 to ``size``).

    - [2]: The Hidden Uniform Cluster Prior in Self-Supervised Learning (PMSN), 2022,
      https://arxiv.org/abs/2210.07277

    Args:
        size:
            Number of prototypes.
        exponent:
            Power-law exponent; 0 gives the uniform distribution.
        device:
            Device of the returned tensor.

    Returns:
        Float32 tensor with shape (size,) summing to 1.
    """
    ranks = torch.arange(1, size + 1, dtype=torch.float32, device=device)
    weights = ranks.pow(-exponent)
    return weights / weights.sum()


@dataclass(frozen=True)
class MSNLossOutput:
    """Result of :meth:`MSNLoss.compute`.

    Only ``loss`` carries gradient; every other field is a detached scalar tensor
    on the input's device (no host synchronisation), meant for logging.

    Attributes:
        loss:
            The total loss: ``cross_entropy + regularization_weight *
            regularization + entropy_weight * entropy``.
        cross_entropy:
            Mean cross-entropy between targets and anchor predictions.
        regularization:
            Value of :meth:`MSNLoss.regularization_loss` on the mean anchor
            prediction: by default ``KL(mean anchor prediction || prior)``, for the
            uniform prior the ME-MAX term ``log K - H(mean prediction)``. 0 when
            ``regularization_weight`` is 0, as the hook is then not called.
        entropy:
            Mean entropy of the individual anchor predictions; only computed
            (otherwise 0) when ``entropy_weight > 0``, as it costs a pass over
            the predictions.
        num_target_prototypes:
            Number of distinct prototypes that are the argmax of some target
            (int64). Values far below the number of prototypes indicate collapse.
            Counted over this rank's targets.
        max_target_probability:
            Mean over targets of their largest probability.
        min_target_probability:
            Mean over targets of their smallest probability.
        me_max_entropy:
            Entropy ``H(mean anchor prediction)`` (over all ranks with
            ``gather_distributed=True``); ``log K`` is its maximum.
    """

    loss: Tensor
    cross_entropy: Tensor
    regularization: Tensor
    entropy: Tensor
    num_target_prototypes: Tensor
    max_target_probability: Tensor
    min_target_probability: Tensor
    me_max_entropy: Tensor


class MSNLoss(nn.Module):
    """Loss function of MSN [0], compatible with ``lightly.loss.MSNLoss``.

    "The overall objective [...] is to minimize the cross-entropy between the
    anchor predictions and the targets, with a mean entropy maximization (ME-MAX)
    regularizer" [0]. Compared with lightly's implementation this one:

    - computes the cross-entropy with log-softmax, and the sharpened targets and
      Sinkhorn iterations in the log domain, in float32 whatever the input dtype:
      finite loss and gradients at temperature 0.025 and for bfloat16/float16
      inputs, where ``log(p ** -t)`` under- and overflows;
    - never repeats the targets for every anchor view and fuses the backward
      pass, so memory for the targets is O(B K) instead of O(M B K);
    - with ``gather_distributed=True`` averages the ME-MAX mean prediction over
      all ranks, as the official code does (lightly averages per rank only), and
      normalises the targets with Sinkhorn over the global batch;
    - supports the official per-sample entropy term (``entropy_weight``) and PMSN
      priors [2] (``target_distribution``): the regulariser is ``KL(mean
      prediction || prior)``, which for the uniform prior is the ME-MAX term
      (lightly's ``PMSNLoss``, also in :mod:`lightly_msn.pmsn_loss`, computes the
      reverse ``KL(prior || mean prediction)``, which does not reduce to ME-MAX);
    - returns diagnostics for collapse monitoring from :meth:`compute`.

    As in lightly, subclasses change the regulariser by overriding
    :meth:`regularization_loss`; its result is differentiated by autograd.

    - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
    - [1]: https://github.com/facebookresearch/msn
    - [2]: The Hidden Uniform Cluster Prior in Self-Supervised Learning (PMSN), 2022,
      https://arxiv.org/abs/2210.07277

    Attributes:
        temperature:
            Similarities between anchors and prototypes are divided by it.
        sinkhorn_iterations:
            Number of Sinkhorn iterations on the targets.
        regularization_weight:
            Weight ``lambda`` of the regulariser (ME-MAX or prior matching).
        gather_distributed:
            Whether batch statistics are computed over all ranks.
        entropy_weight:
            Weight of the mean per-sample entropy of anchor predictions.
        power_law_exponent:
            Exponent of the power-law prior (used if
            ``target_distribution="power_law"``).

    Examples:
        >>> loss_fn = MSNLoss()
        >>> prototypes = MSNPrototypes(num_prototypes=1024, dim=256)
        >>> anchors_out = model(masked_views)    # (batch_size * views, 256)
        >>> targets_out = model_ema(images)      # (batch_size, 256)
        >>> loss = loss_fn(anchors_out, targets_out, prototypes.weight)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1.0,
        me_max_weight: float | None = None,
        gather_distributed: bool = False,
        entropy_weight: float = 0.0,
        target_distribution: TargetDistribution = "uniform",
        power_law_exponent: float = 0.25,
    ) -> None:
        """Initialises the loss.

        Args:
            temperature:
                Similarities between anchors and prototypes are divided by the
                temperature. Must be in (0, inf).
            sinkhorn_iterations:
                Number of Sinkhorn iterations on the targets; 0 disables them.
            regularization_weight:
                Weight of the regulariser; 0 disables it. Must be >= 0.
            me_max_weight:
                Deprecated, use ``regularization_weight``. Takes precedence over
                ``regularization_weight`` if not None (as in lightly 1.5).
            gather_distributed:
                If True, the ME-MAX mean prediction and the Sinkhorn normalisation
                use the batches of all ranks.
            entropy_weight:
                Weight of the mean entropy of the individual anchor predictions
                (official ``ent_weight`` with ``use_ent``); 0 disables it.
            target_distribution:
                Prior of the regulariser: ``"uniform"`` (ME-MAX of [0]),
                ``"power_law"`` (PMSN [2]) or a tensor of shape (num_prototypes,)
                with positive entries summing to 1.
            power_law_exponent:
                Exponent of the power-law prior; entry ``k`` (from 1) of the prior
                is proportional to ``k^-power_law_exponent``.

        Raises:
            ValueError: If an argument is out of range, or ``gather_distributed``
                is requested without ``torch.distributed`` support.
        """
        super().__init__()
        _check_positive(temperature, "temperature")
        if sinkhorn_iterations < 0:
            raise ValueError(
                f"sinkhorn_iterations must be >= 0 but is {sinkhorn_iterations}."
            )
        if me_max_weight is not None:
            warnings.warn(
                "me_max_weight is deprecated in favor of regularization_weight and "
                "will be removed in the future.",
                DeprecationWarning,
                stacklevel=2,
            )
            regularization_weight = me_max_weight
        _check_non_negative(regularization_weight, "regularization_weight")
        _check_non_negative(entropy_weight, "entropy_weight")
        if not math.isfinite(power_law_exponent):
            raise ValueError(
                f"power_law_exponent must be finite but is {power_law_exponent}."
            )
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Set gather_distributed=False or install torch with distributed "
                "support."
            )
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.regularization_weight = regularization_weight
        self.gather_distributed = gather_distributed
        self.entropy_weight = entropy_weight
        self.power_law_exponent = power_law_exponent
        # not named target_distribution: lightly's PMSNCustomLoss, a subclass, uses
        # that attribute for its callable
        self.prior_kind: Literal["uniform", "power_law", "tensor"]
        self.target_prior: Tensor | None
        if isinstance(target_distribution, Tensor):
            _check_prior(target_distribution)
            self.prior_kind = "tensor"
            self.register_buffer(
                "target_prior", target_distribution.detach().float(), persistent=False
            )
        elif target_distribution in ("uniform", "power_law"):
            self.prior_kind = target_distribution
            self.target_prior = None
        else:
            raise ValueError(
                "target_distribution must be 'uniform', 'power_law' or a tensor of "
                f"probabilities, but is {target_distribution!r}."
            )

    def forward(
        self,
        anchors: Tensor,
        targets: Tensor,
        prototypes: Tensor,
        target_sharpen_temperature: float = 0.25,
    ) -> Tensor:
        """Computes the MSN loss; see :meth:`compute` for the arguments.

        Returns:
            The scalar loss (float32), averaged over all anchors.
        """
        return self.compute(
            anchors, targets, prototypes, target_sharpen_temperature
        ).loss

    def compute(
        self,
        anchors: Tensor,
        targets: Tensor,
        prototypes: Tensor,
        target_sharpen_temperature: float = 0.25,
    ) -> MSNLossOutput:
        """Computes the MSN loss together with its terms and diagnostics.

        Args:
            anchors:
                Anchor (masked view) embeddings with shape (batch_size *
                anchor_views, dim), ordered view-major: rows ``v * batch_size + i``
                belong to target ``i`` (``torch.cat`` of the per-view batches).
            targets:
                Target embeddings with shape (batch_size, dim). No gradient flows
                into them.
            prototypes:
                Prototypes with shape (num_prototypes, dim). Pass the learnable
                weight itself (not ``.data``) so that the prototypes are trained.
            target_sharpen_temperature:
                Temperature ``T`` used to sharpen the targets, in (0, inf).

        Returns:
            An :class:`MSNLossOutput` whose ``loss`` has gradient.

        Raises:
            ValueError: If the shapes do not fit together, an input is not
                finite, or ``target_sharpen_temperature`` is not positive.
        """
        _check_shapes(anchors, targets, prototypes)
        _check_positive(target_sharpen_temperature, "target_sharpen_temperature")
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            anchors, targets, prototypes = (
                anchors.float(),
                targets.detach().float(),
                prototypes.float(),
            )
            anchor_norms, target_norms, prototype_norms = _finite_norms(
                {"anchors": anchors, "targets": targets, "prototypes": prototypes}
            )
            unit_prototypes = prototypes.detach() / prototype_norms
            log_targets = self._log_target_probabilities(
                targets / target_norms, unit_prototypes, target_sharpen_temperature
            )
            target_probabilities = log_targets.exp()
            anchor_loss, cross_entropy, entropy, mean_prediction = _AnchorLoss.apply(
                anchors,
                anchor_norms,
                prototypes,
                unit_prototypes,
                prototype_norms,
                target_probabilities,
                1.0 / self.temperature,
                self.entropy_weight,
                self.gather_distributed,
            )
            loss = anchor_loss
            regularization = anchor_loss.new_zeros(())
            if self.regularization_weight > 0:
                regularization = self.regularization_loss(mean_prediction)
                if regularization.dim() != 0:
                    raise ValueError(
                        f"{type(self).__name__}.regularization_loss must return a "
                        f"scalar but returned shape {tuple(regularization.shape)}."
                    )
                loss = anchor_loss + self.regularization_weight * regularization
            mean_prediction = mean_prediction.detach()
            return MSNLossOutput(
                loss=loss,
                cross_entropy=cross_entropy,
                regularization=regularization.detach(),
                entropy=entropy,
                me_max_entropy=-torch.xlogy(mean_prediction, mean_prediction).sum(),
                **_target_diagnostics(log_targets, target_probabilities),
            )

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """The regulariser ``KL(mean anchor prediction || prior)`` of [0] and [2].

        For the uniform prior this is ``log K - H(mean_anchor_probs)``: the mean
        entropy maximisation (ME-MAX) term of [0], Sec. 3, up to the constant
        ``log K`` that lightly and the official code add as well.

        Override it to use another regulariser, as lightly's ``PMSNLoss`` does:
        :meth:`compute` calls it once per batch, only when
        ``regularization_weight > 0``, and scales its result by that weight;
        gradients flow through it by ordinary autograd.

        - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
        - [2]: The Hidden Uniform Cluster Prior in Self-Supervised Learning (PMSN),
          2022, https://arxiv.org/abs/2210.07277

        Args:
            mean_anchor_probs:
                Mean anchor prediction, float32 tensor with shape
                (num_prototypes,), averaged over the anchors of all ranks when
                ``gather_distributed=True``.

        Returns:
            The scalar regularisation loss.
        """
        log_prior = self._log_prior(
            mean_anchor_probs.shape[0], mean_anchor_probs.device
        )
        # prototypes without mass contribute 0 * (finite): the clamp keeps the log
        # and its gradient finite there
        tiny = torch.finfo(mean_anchor_probs.dtype).tiny
        log_mean = mean_anchor_probs.clamp_min(tiny).log()
        return torch.sum(mean_anchor_probs * (log_mean - log_prior))

    def _log_target_probabilities(
        self, targets: Tensor, prototypes: Tensor, sharpen_temperature: float
    ) -> Tensor:
        # sharpen(softmax(s / tau), T) == softmax(s / (tau * T)): one log-softmax
        logits = targets @ prototypes.T / (self.temperature * sharpen_temperature)
        log_targets = torch.log_softmax(logits, dim=1)
        return _log_sinkhorn(
            log_targets, self.sinkhorn_iterations, self.gather_distributed
        )

    def _log_prior(self, num_prototypes: int, device: torch.device) -> Tensor:
        if self.prior_kind == "uniform":
            return torch.full(
                (num_prototypes,), -math.log(num_prototypes), device=device
            )
        if self.prior_kind == "power_law":
            prior = power_law_distribution(
                num_prototypes, self.power_law_exponent, device=device
            )
            return prior.log()
        assert self.target_prior is not None
        if self.target_prior.shape[0] != num_prototypes:
            raise ValueError(
                f"target_distribution has {self.target_prior.shape[0]} entries but "
                f"there are {num_prototypes} prototypes."
            )
        return self.target_prior.to(device).log()


class _AnchorLoss(torch.autograd.Function):
    """Anchor part of the loss, L2 normalisation included, with a hand-written backward.

    Returns the cross-entropy plus the weighted entropy term (differentiable), the
    two terms (diagnostics) and the mean anchor prediction (differentiable), on
    which :meth:`MSNLoss.regularization_loss` is evaluated by ordinary autograd.

    Autograd would keep several N x K intermediates (log-probabilities,
    probabilities, their gradients) and run a graph of small kernels for the
    normalisation; this keeps only the anchor probabilities ``P`` (N x K) and
    builds the gradient in one buffer.

    Forward. With unit anchors ``a_n``, unit prototypes ``q_k``, similarities
    ``S = a q^T`` and logits ``Z = S / tau``: ``P = softmax(Z)`` row-wise and
    ``lse_n = logsumexp(Z_n) = max_k Z_nk - log max_k P_nk`` (the largest
    probability is ``exp(0) / sum``, so this is as exact as a log-softmax without
    materialising it). The cross-entropy ``-1/N sum_n <t_n, Z_n - lse_n>`` sums
    the views before the product with the prototypes:
    ``sum_n <t_n, Z_n> = <sum_views a, t q> / tau``, an O(B K D) product. The mean
    prediction is ``m = 1/N sum_n P_n``, averaged over ranks if requested.

    Backward. With ``c`` the gradient of the first output, ``g`` that of ``m``,
    ``s_n`` the target mass of row ``n`` (1 up to rounding) and ``h_n`` the
    entropy of row ``n``::

        N tau dL/dS_n = c (P_n s_n - t_n)                      # cross-entropy
                        + P_n (g - <P_n, g>)                   # mean prediction
                        - c epsilon (P_n log P_n + h_n P_n)    # entropy

    then ``dL/da = dL/dS q``, ``dL/dq = dL/dS^T a`` and, for ``x`` normalised to
    ``y = x / ||x||``, ``dL/dx = (dL/dy - y <y, dL/dy>) / ||x||``. The gradient
    of ``m`` is taken through the all-reduce as the identity (see
    :func:`lightly_msn.distributed.all_reduce_mean`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        anchors: Tensor,
        anchor_norms: Tensor,
        prototypes: Tensor,
        unit_prototypes: Tensor,
        prototype_norms: Tensor,
        targets: Tensor,
        inverse_temperature: float,
        entropy_weight: float,
        gather_distributed: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        num_anchors, dim = anchors.shape
        batch_size = targets.shape[0]
        num_views = num_anchors // batch_size
        # prototypes only route the gradient: the caller normalised them already
        unit_anchors = anchors / anchor_norms
        logits = torch.mm(unit_anchors, (unit_prototypes * inverse_temperature).T)
        row_max = logits.amax(dim=1)  # values only, no indices: cheaper than max()
        row_entropy = torch.zeros(0, device=anchors.device)
        if entropy_weight > 0:
            log_probabilities = torch.log_softmax(logits, dim=1)
            row_entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=1)
            del log_probabilities
        # in place: on CPU a fresh N x K buffer costs page faults
        probabilities = torch.softmax(logits, dim=1, out=logits)
        # exp is monotonic: the largest probability, exp(0) / sum, sits at the
        # largest logit (a vectorised amax is cheaper than max with indices + gather)
        largest = probabilities.amax(dim=1)
        log_normalizer = row_max - largest.log()
        # the targets are shared by all views: O(B D) and O(B K), never O(N K)
        summed_views = unit_anchors.view(num_views, batch_size, dim).sum(dim=0)
        target_mass = targets.sum(dim=1)
        target_logit = inverse_temperature * torch.sum(
            summed_views * (targets @ unit_prototypes)
        )
        summed_normalizer = log_normalizer.view(num_views, batch_size).sum(dim=0)
        cross_entropy = (torch.dot(summed_normalizer, target_mass) - target_logit) / (
            num_anchors
        )
        mean_prediction = distributed.all_reduce_mean(
            probabilities.mean(dim=0), gather_distributed
        )
        entropy = (
            row_entropy.mean() if entropy_weight > 0 else cross_entropy.new_zeros(())
        )
        loss = cross_entropy + entropy_weight * entropy
        ctx.save_for_backward(
            unit_anchors,
            anchor_norms,
            unit_prototypes,
            prototype_norms,
            targets,
            target_mass,
            probabilities,
            row_entropy,
        )
        ctx.inverse_temperature = inverse_temperature
        ctx.entropy_weight = entropy_weight
        ctx.mark_non_differentiable(cross_entropy, entropy)
        # an unused output (the mean when the regulariser is off) gets None, not a
        # tensor of zeros
        ctx.set_materialize_grads(False)
        return loss, cross_entropy, entropy, mean_prediction

    @staticmethod
    def backward(
        ctx: Any,
        grad_loss: Tensor | None,
        grad_cross_entropy: Tensor | None,
        grad_entropy: Tensor | None,
        grad_mean: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        (
            unit_anchors,
            anchor_norms,
            unit_prototypes,
            prototype_norms,
            targets,
            target_mass,
            probabilities,
            row_entropy,
        ) = ctx.saved_tensors
        num_anchors = unit_anchors.shape[0]
        batch_size, num_prototypes = targets.shape
        num_views = num_anchors // batch_size
        scale = ctx.inverse_temperature / num_anchors
        loss_scale = (
            grad_loss * scale if grad_loss is not None else targets.new_zeros(())
        )
        mean_scale = (
            grad_mean * scale
            if grad_mean is not None
            else targets.new_zeros(num_prototypes)
        )
        # the P_n-proportional part, per row: c s_n - <P_n, g> - c epsilon h_n
        row_offset = loss_scale * target_mass.repeat(num_views) - (
            probabilities @ mean_scale
        )
        if ctx.entropy_weight > 0:
            row_offset = row_offset - (ctx.entropy_weight * loss_scale) * row_entropy
        # grad = P * g - c t, then + P * row_offset: two passes over N x K, the
        # targets broadcast over the views
        grad_similarity = torch.addcmul(
            (-loss_scale * targets).expand(num_views, batch_size, num_prototypes),
            probabilities.view(num_views, batch_size, num_prototypes),
            mean_scale,
        ).view(num_anchors, num_prototypes)
        grad_similarity.addcmul_(probabilities, row_offset[:, None])
        if ctx.entropy_weight > 0:
            entropy_grad = torch.xlogy(probabilities, probabilities)
            grad_similarity.sub_(entropy_grad.mul_(ctx.entropy_weight * loss_scale))
        grad_anchors = grad_prototypes = None
        if ctx.needs_input_grad[0]:
            grad_anchors = _normalization_backward(
                torch.mm(grad_similarity, unit_prototypes), unit_anchors, anchor_norms
            )
        if ctx.needs_input_grad[2]:
            grad_prototypes = _normalization_backward(
                torch.mm(grad_similarity.T, unit_anchors),
                unit_prototypes,
                prototype_norms,
            )
        return (grad_anchors, None, grad_prototypes) + (None,) * 6


def _normalization_backward(grad_unit: Tensor, unit: Tensor, norms: Tensor) -> Tensor:
    """Gradient through ``x / norms`` with ``norms = max(||x||, eps)`` (per row).

    Rows whose norm was clamped to ``eps`` are a plain division by a constant.
    """
    projection = (unit * grad_unit).sum(dim=1, keepdim=True)
    projection.masked_fill_(norms <= _NORM_EPS, 0.0)
    return torch.addcmul(grad_unit, unit, projection, value=-1.0).div_(norms)


def _log_sinkhorn(
    log_probabilities: Tensor,
    iterations: int,
    gather_distributed: bool,
    may_have_empty_columns: bool = False,
) -> Tensor:
    """Sinkhorn-Knopp in the log domain; rows of the result are log-distributions.

    Lightly's and the official implementation also rescale by the batch size and
    number of prototypes; these constants cancel in the next normalisation and in
    the final one, so only the two alternating normalisations are kept. Each is a
    single fused ``log_softmax`` when the batch is local. Columns that are all
    ``-inf`` (prototypes without mass) stay ``-inf`` if ``may_have_empty_columns``;
    the loss never has them (its log-probabilities are finite) and skips the check.
    """
    global_batch = distributed.world_size(gather_distributed) > 1
    with torch.no_grad():
        for _ in range(iterations):
            # each prototype gets the same total mass over the (global) batch
            if global_batch:
                column = distributed.logsumexp_over_ranks(
                    log_probabilities, dim=0, gather_distributed=True
                )
                log_probabilities = log_probabilities - column.nan_to_num_(neginf=0.0)
            else:
                log_probabilities = torch.log_softmax(log_probabilities, dim=0)
                if may_have_empty_columns:
                    log_probabilities.nan_to_num_(nan=-math.inf, neginf=-math.inf)
            # each sample is a probability distribution
            log_probabilities = torch.log_softmax(log_probabilities, dim=1)
    return log_probabilities


def _target_diagnostics(
    log_targets: Tensor, target_probabilities: Tensor
) -> dict[str, Tensor]:
    with torch.no_grad():
        largest_log, winners = log_targets.max(dim=1)
        used = torch.zeros(
            log_targets.shape[1], dtype=torch.bool, device=log_targets.device
        )
        used.index_fill_(0, winners, True)
        return {
            "num_target_prototypes": used.sum(),
            "max_target_probability": largest_log.exp().mean(),
            "min_target_probability": target_probabilities.amin(dim=1).mean(),
        }


def _check_shapes(anchors: Tensor, targets: Tensor, prototypes: Tensor) -> None:
    for name, tensor in (
        ("anchors", anchors),
        ("targets", targets),
        ("prototypes", prototypes),
    ):
        if tensor.dim() != 2:
            raise ValueError(
                f"{name} must have shape (num_rows, dim) but has shape "
                f"{tuple(tensor.shape)}."
            )
        if tensor.shape[0] == 0:
            raise ValueError(f"{name} must not be empty.")
    if anchors.shape[0] % targets.shape[0] != 0:
        raise ValueError(
            f"The number of anchors ({anchors.shape[0]}) must be a multiple of the "
            f"number of targets ({targets.shape[0]}): anchors hold "
            "batch_size * anchor_views rows."
        )
    dims = {
        "anchors": anchors.shape[1],
        "targets": targets.shape[1],
        "prototypes": prototypes.shape[1],
    }
    if len(set(dims.values())) != 1:
        raise ValueError(
            "anchors, targets and prototypes must have the same embedding "
            f"dimension, but have {dims}."
        )


_NORM_EPS = 1e-12  # as F.normalize


def _finite_norms(named: dict[str, Tensor]) -> list[Tensor]:
    """Row norms ``max(||x||, eps)`` (as ``F.normalize``), shape (rows, 1), no grad.

    A NaN or inf anywhere in a row makes its norm non-finite, so checking the norms
    checks the inputs, with one host synchronisation and no extra pass over them.
    """
    with torch.no_grad():
        norms = [
            torch.linalg.vector_norm(tensor, dim=1, keepdim=True)
            for tensor in named.values()
        ]
    if not bool(torch.isfinite(torch.cat(norms)).all()):
        bad = [
            name
            for name, norm in zip(named, norms, strict=True)
            if not bool(torch.isfinite(norm).all())
        ]
        raise ValueError(
            f"Non-finite values (NaN or inf) in {', '.join(bad)}, or rows whose norm "
            "overflows float32."
        )
    return [norm.clamp_min_(_NORM_EPS) for norm in norms]


def _check_probabilities(probabilities: Tensor) -> None:
    invalid = ~torch.isfinite(probabilities) | (probabilities < 0)
    if not bool(invalid.any()):
        return
    kinds = [
        kind
        for kind, mask in (
            ("NaN", torch.isnan(probabilities)),
            ("infinite", torch.isinf(probabilities)),
            ("negative", probabilities < 0),
        )
        if bool(mask.any())
    ]
    row, column = (int(i) for i in invalid.nonzero()[0])
    raise ValueError(
        f"sinkhorn: probabilities must be finite and >= 0, but {int(invalid.sum())} "
        f"of {probabilities.numel()} entries are {' or '.join(kinds)} (the first "
        f"at row {row}, column {column})."
    )


def _check_prior(prior: Tensor) -> None:
    if prior.dim() != 1 or prior.shape[0] == 0:
        raise ValueError(
            "target_distribution tensor must have shape (num_prototypes,) but has "
            f"shape {tuple(prior.shape)}."
        )
    if not bool((prior > 0).all()) or not bool(torch.isfinite(prior).all()):
        raise ValueError("target_distribution entries must be finite and > 0.")
    total = float(prior.double().sum())
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"target_distribution must sum to 1 but sums to {total}.")


def _check_positive(value: float, name: str) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be in (0, inf) but is {value}.")


def _check_non_negative(value: float, name: str) -> None:
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be in [0, inf) but is {value}.")
