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
    model: nn.Module, model_ema: nn.Module, m: float, update_buffers: bool = True
) -> None:
    """Updates ``model_ema`` in place with an exponential moving average of ``model``.

    Same semantics as ``lightly.models.utils.update_momentum`` for the parameters,
    ``ema = m * ema + (1 - m) * model``, but computed with one multi-tensor
    ``torch._foreach_lerp_`` (a single pass over memory instead of lightly's
    multiply followed by add) and without recording an autograd graph.

    Buffers (lightly leaves them untouched):

    - floating-point buffers, such as BatchNorm ``running_mean``/``running_var``,
      get the same moving average as the parameters, so the EMA model's
      normalisation statistics stay consistent with its averaged weights (this is
      what ``timm.utils.ModelEmaV3`` does);
    - integer buffers, such as BatchNorm ``num_batches_tracked``, are copied.

    Pass ``update_buffers=False`` to leave all buffers untouched, as lightly does.

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
            same number, shapes and dtypes of parameters (and buffers).

    Examples:
        >>> target_encoder = copy.deepcopy(encoder)
        >>> update_momentum(encoder, target_encoder, m=0.996)
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"update_momentum: momentum m must be in [0, 1], got {m}.")
    params, buffers = _parameters_and_buffers(model)
    ema_params, ema_buffers = _parameters_and_buffers(model_ema)
    _check_pairs("parameters", params, ema_params)
    torch._foreach_lerp_(ema_params, params, 1.0 - m)
    if not update_buffers:
        return

    _check_pairs("buffers", buffers, ema_buffers)
    floating = [
        (b, e)
        for b, e in zip(buffers, ema_buffers, strict=True)
        if b.is_floating_point()
    ]
    integer = [
        (b, e)
        for b, e in zip(buffers, ema_buffers, strict=True)
        if not b.is_floating_point()
    ]
    if floating:
        torch._foreach_lerp_(
            [e for _, e in floating], [b for b, _ in floating], 1.0 - m
        )
    if integer:
        torch._foreach_copy_([e for _, e in integer], [b for b, _ in integer])


def _parameters_and_buffers(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``list(module.parameters()), list(module.buffers())`` in one module walk.

    Same tensors in the same order (shared tensors once). An explicit pre-order
    stack over ``_modules`` is used because ``nn.Module.parameters()`` builds a
    name for every module and tensor: on a ViT-S that walk took 0.4-0.7 ms per
    model, this one 0.2 ms, against ~5 ms for the update itself on 2 CPU cores
    (on a GPU the update is bound by this Python work).
    """
    parameters: list[Tensor | None] = []
    buffers: list[Tensor | None] = []
    stack = [module]
    while stack:
        submodule = stack.pop()
        parameters += submodule._parameters.values()
        buffers += submodule._buffers.values()
        stack += reversed(submodule._modules.values())  # type: ignore[arg-type]
    # dict.fromkeys: drops tensors shared between modules, keeps the first position
    return (
        [p for p in dict.fromkeys(parameters) if p is not None],
        [b for b in dict.fromkeys(buffers) if b is not None],
    )


def _check_pairs(kind: str, tensors: list[Tensor], ema_tensors: list[Tensor]) -> None:
    # fast path: two list comparisons instead of a Python loop over pairs
    if [t.shape for t in tensors] == [t.shape for t in ema_tensors] and [
        t.dtype for t in tensors
    ] == [t.dtype for t in ema_tensors]:
        return
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
