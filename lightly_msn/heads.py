"""MSN projection head and learnable prototypes.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
- [1]: https://github.com/facebookresearch/msn
"""

from __future__ import annotations

import math

import torch
from lightly.models.modules.heads import MSNProjectionHead as _LightlyMSNProjectionHead
from torch import Tensor, nn


class MSNProjectionHead(_LightlyMSNProjectionHead):
    """Projection head for MSN [0]: lightly's module, unchanged.

    "We train with a 3-layer projection head with output dimension 256 and
    batch-normalization at the input and hidden layers" [0]. Three linear layers
    ``input_dim -> hidden_dim -> hidden_dim -> output_dim``, the first two followed
    by BatchNorm1d and GELU, as in [1]. This subclass exists so that everything MSN
    is importable from ``lightly_msn``; its constructor, architecture and
    ``state_dict`` keys are exactly lightly's.

    Args:
        input_dim:
            Input dimension, 768 for a ViT-B backbone (384 for ViT-S).
        hidden_dim:
            Hidden dimension.
        output_dim:
            Output dimension, the dimension of the prototypes.
    """

    def __init__(
        self, input_dim: int = 768, hidden_dim: int = 2048, output_dim: int = 256
    ) -> None:
        super().__init__(
            input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim
        )


class MSNPrototypes(nn.Module):
    """Learnable prototypes of MSN [0], a ``(num_prototypes, dim)`` matrix.

    The K prototypes of [0] (Sec. 3, q in R^{K x d}) to which anchor and target
    representations are softly assigned by cosine similarity inside the loss.
    Initialised as the official code [1]: uniform in ``[-1/sqrt(dim),
    1/sqrt(dim)]``.

    Pass ``prototypes.weight`` itself (with gradient) to the loss so that the
    prototypes learn. lightly's MSN examples pass ``prototypes.data``, which
    detaches them: they then stay at their random initialisation for the whole
    training.

    Args:
        num_prototypes:
            Number of prototypes K (1024 in the paper for ViT-S/B).
        dim:
            Dimension of each prototype; the projection head's ``output_dim``.

    Examples:
        >>> head = MSNProjectionHead(input_dim=384)
        >>> prototypes = MSNPrototypes(num_prototypes=1024, dim=256)
        >>> loss = criterion(anchors, targets, prototypes.weight)
    """

    def __init__(self, num_prototypes: int = 1024, dim: int = 256) -> None:
        super().__init__()
        if num_prototypes < 1:
            raise ValueError(
                f"MSNPrototypes: num_prototypes must be >= 1, got {num_prototypes}."
            )
        if dim < 1:
            raise ValueError(f"MSNPrototypes: dim must be >= 1, got {dim}.")
        self.num_prototypes = num_prototypes
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the weights uniformly from ``[-1/sqrt(dim), 1/sqrt(dim)]`` [1]."""
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self) -> Tensor:
        """Returns the ``(num_prototypes, dim)`` prototype matrix, with gradient."""
        return self.weight

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, dim={self.dim}"
