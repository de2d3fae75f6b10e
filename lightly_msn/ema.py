"""Exponential moving average (EMA) update of the MSN target encoder.

"the target network parameters are updated via an exponential moving average of
the anchor network parameters" [0]

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def update_momentum(
    model: nn.Module, model_ema: nn.Module, m: float, update_buffers: bool = False
) -> None:
    """Updates ``model_ema`` in place with an exponential moving average of ``model``.

    A drop-in for ``lightly.models.utils.update_momentum``: by default only the
    parameters are updated, ``ema = m * ema + (1 - m) * model``, and buffers are
    left untouched, exactly as lightly does. The update is one multi-tensor
    ``torch._foreach_lerp_`` without an autograd graph. Unlike lightly, a momentum
    outside [0, 1] and models whose parameters do not pair up are refused instead
    of being averaged silently.

    With ``update_buffers=True`` the buffers follow too (lightly has no such
    option):

    - floating-point buffers, such as BatchNorm ``running_mean``/``running_var``,
      get the same moving average as the parameters, so the EMA model's
      normalisation statistics stay consistent with its averaged weights (as
      ``timm.utils.ModelEmaV3`` does);
    - integer buffers, such as BatchNorm ``num_batches_tracked``, are copied.

    Args:
        model:
            The current (anchor) model.
        model_ema:
            The model holding the moving average (target encoder); same architecture
            as ``model``.
        m:
            The momentum factor, between 0 and 1 (1 keeps ``model_ema`` unchanged).
        update_buffers:
            Whether buffers are averaged (floating point) or copied (integer).

    Raises:
        ValueError: If ``m`` is outside [0, 1] or the two models do not have the
            same number, shapes and dtypes of parameters (and, with
            ``update_buffers=True``, of buffers).

    Examples:
        >>> target_encoder = copy.deepcopy(encoder)
        >>> update_momentum(encoder, target_encoder, m=0.996)
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"update_momentum: momentum m must be in [0, 1], got {m}.")
    parameters: list[Tensor] = list(model.parameters())
    ema_parameters: list[Tensor] = list(model_ema.parameters())
    _check_pairs("parameters", parameters, ema_parameters)
    if parameters:
        torch._foreach_lerp_(ema_parameters, parameters, 1.0 - m)
    if not update_buffers:
        return

    buffers = list(model.buffers())
    ema_buffers = list(model_ema.buffers())
    _check_pairs("buffers", buffers, ema_buffers)
    pairs = list(zip(buffers, ema_buffers, strict=True))
    floating = [(b, e) for b, e in pairs if b.is_floating_point()]
    integer = [(b, e) for b, e in pairs if not b.is_floating_point()]
    if floating:
        torch._foreach_lerp_([e for _, e in floating], [b for b, _ in floating], 1 - m)
    if integer:
        torch._foreach_copy_([e for _, e in integer], [b for b, _ in integer])


def _check_pairs(kind: str, tensors: list[Tensor], ema_tensors: list[Tensor]) -> None:
    if len(tensors) != len(ema_tensors):
        raise ValueError(
            f"update_momentum: model has {len(tensors)} {kind} but model_ema has "
            f"{len(ema_tensors)}; both must have the same architecture."
        )
    for index, (tensor, ema_tensor) in enumerate(
        zip(tensors, ema_tensors, strict=True)
    ):
        if tensor.shape != ema_tensor.shape or tensor.dtype != ema_tensor.dtype:
            raise ValueError(
                f"update_momentum: {kind} #{index} differ between model "
                f"({tuple(tensor.shape)}, {tensor.dtype}) and model_ema "
                f"({tuple(ema_tensor.shape)}, {ema_tensor.dtype})."
            )
