"""The PMSN losses: MSN with a prior-matching regulariser, as lightly defines them.

PMSN [0] replaces the ME-MAX regulariser of MSN [1], which pulls the mean anchor
prediction towards the uniform distribution, by one that pulls it towards a
non-uniform prior, such as a power law over the prototypes.
``PMSNLoss`` and ``PMSNCustomLoss`` are drop-in replacements for
``lightly.loss.PMSNLoss`` and ``lightly.loss.PMSNCustomLoss``: same constructors,
same values and gradients. Like lightly's, they are :class:`MSNLoss` subclasses
that override :meth:`MSNLoss.regularization_loss` with ``KL(prior || mean anchor
prediction)``, so they inherit our loss's numerics (log domain, float32 inside,
fused backward) and, with ``gather_distributed=True``, its mean prediction over
all ranks (lightly's is per rank).

``MSNLoss(target_distribution="power_law")`` is a related but different loss: it
uses ``KL(mean anchor prediction || prior)``, the direction that reduces to
ME-MAX for the uniform prior.

- [0]: The Hidden Uniform Cluster Prior in Self-Supervised Learning (PMSN), 2022,
  https://arxiv.org/abs/2210.07277
- [1]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightly_msn.loss import MSNLoss, power_law_distribution

# lightly's tests import the power-law prior under this private name from
# lightly.loss.pmsn_loss; the alias keeps that import one-to-one
_power_law_distribution = power_law_distribution


class PMSNLoss(MSNLoss):
    """PMSN loss [0] with a power-law prior, as ``lightly.loss.PMSNLoss``.

    The MSN loss whose regulariser is ``KL(prior || mean anchor prediction)``
    with ``prior_k`` proportional to ``k^-power_law_exponent`` (``k`` from 1 to
    the number of prototypes).

    - [0]: The Hidden Uniform Cluster Prior in Self-Supervised Learning (PMSN),
      2022, https://arxiv.org/abs/2210.07277

    Attributes:
        power_law_exponent:
            Exponent of the power-law prior.

    Examples:
        >>> loss_fn = PMSNLoss()
        >>> loss = loss_fn(anchors_out, targets_out, prototypes.weight)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1,
        power_law_exponent: float = 0.25,
        gather_distributed: bool = False,
    ) -> None:
        """Initialises the loss; the arguments are lightly's.

        Args:
            temperature:
                Similarities between anchors and prototypes are divided by the
                temperature. Must be in (0, inf).
            sinkhorn_iterations:
                Number of Sinkhorn iterations on the targets; 0 disables them.
            regularization_weight:
                Weight of the prior-matching regulariser; 0 disables it.
            power_law_exponent:
                Exponent of the power-law prior: entry ``k`` (from 1) is
                proportional to ``k^-power_law_exponent``. Must be finite.
            gather_distributed:
                If True, the mean anchor prediction and the Sinkhorn
                normalisation use the batches of all ranks.

        Raises:
            ValueError: If an argument is out of range, or ``gather_distributed``
                is requested without ``torch.distributed`` support.
        """
        super().__init__(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=regularization_weight,
            gather_distributed=gather_distributed,
            power_law_exponent=power_law_exponent,
        )

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """``KL(power-law prior || mean_anchor_probs)``, as lightly's ``PMSNLoss``.

        Args:
            mean_anchor_probs:
                Mean anchor prediction with shape (num_prototypes,).

        Returns:
            The scalar regularisation loss.
        """
        prior = power_law_distribution(
            mean_anchor_probs.shape[0],
            self.power_law_exponent,
            device=mean_anchor_probs.device,
        )
        return _prior_to_mean_kl(prior, mean_anchor_probs)


class PMSNCustomLoss(MSNLoss):
    """PMSN loss [0] with any prior, as ``lightly.loss.PMSNCustomLoss``.

    The MSN loss whose regulariser is ``KL(prior || mean anchor prediction)``,
    where ``prior = target_distribution(mean anchor prediction)``.

    - [0]: The Hidden Uniform Cluster Prior in Self-Supervised Learning (PMSN),
      2022, https://arxiv.org/abs/2210.07277

    Attributes:
        target_distribution:
            Function from the mean anchor prediction, a tensor with shape
            (num_prototypes,), to the prior, a tensor of the same shape that sums
            to 1.

    Examples:
        >>> def uniform(mean_anchor_probs: Tensor) -> Tensor:
        ...     size = mean_anchor_probs.shape[0]
        ...     return mean_anchor_probs.new_ones(size) / size
        >>> loss_fn = PMSNCustomLoss(target_distribution=uniform)
        >>> loss = loss_fn(anchors_out, targets_out, prototypes.weight)
    """

    def __init__(
        self,
        target_distribution: Callable[[Tensor], Tensor],
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1,
        gather_distributed: bool = False,
    ) -> None:
        """Initialises the loss; the arguments are lightly's.

        Args:
            target_distribution:
                Function that maps the mean anchor prediction (shape
                (num_prototypes,)) to the prior (same shape, summing to 1).
            temperature:
                Similarities between anchors and prototypes are divided by the
                temperature. Must be in (0, inf).
            sinkhorn_iterations:
                Number of Sinkhorn iterations on the targets; 0 disables them.
            regularization_weight:
                Weight of the prior-matching regulariser; 0 disables it.
            gather_distributed:
                If True, the mean anchor prediction and the Sinkhorn
                normalisation use the batches of all ranks.

        Raises:
            ValueError: If ``target_distribution`` is not callable, an argument is
                out of range, or ``gather_distributed`` is requested without
                ``torch.distributed`` support.
        """
        if not callable(target_distribution):
            raise ValueError(
                "PMSNCustomLoss: target_distribution must be a function from the "
                "mean anchor prediction to a prior, but is "
                f"{type(target_distribution).__name__}."
            )
        super().__init__(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=regularization_weight,
            gather_distributed=gather_distributed,
        )
        self.target_distribution = target_distribution

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """``KL(target_distribution(mean_anchor_probs) || mean_anchor_probs)``.

        Args:
            mean_anchor_probs:
                Mean anchor prediction with shape (num_prototypes,).

        Returns:
            The scalar regularisation loss.

        Raises:
            ValueError: If ``target_distribution`` returns another shape.
        """
        prior = self.target_distribution(mean_anchor_probs)
        if prior.shape != mean_anchor_probs.shape:
            raise ValueError(
                "PMSNCustomLoss: target_distribution returned shape "
                f"{tuple(prior.shape)} for a mean anchor prediction of shape "
                f"{tuple(mean_anchor_probs.shape)}; they must be equal."
            )
        return _prior_to_mean_kl(prior.to(mean_anchor_probs.device), mean_anchor_probs)


def _prior_to_mean_kl(prior: Tensor, mean_anchor_probs: Tensor) -> Tensor:
    """``KL(prior || mean) = sum_k prior_k log(prior_k / mean_k)``, 0 if prior_k = 0.

    lightly evaluates it as ``F.kl_div(mean.log(), prior, reduction="sum")``, which
    is infinite (and its gradient NaN) once an entry of the mean underflows to 0;
    here the mean is clamped to the smallest normal float first (about 1e-38 in
    float32), which changes nothing for larger entries.
    """
    tiny = torch.finfo(mean_anchor_probs.dtype).tiny
    log_mean = mean_anchor_probs.clamp_min(tiny).log()
    return F.kl_div(log_mean, prior, reduction="sum")
