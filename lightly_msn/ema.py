"""Exponential moving average (EMA) update of the MSN target encoder.

"the target network parameters are updated via an exponential moving average of
the anchor network parameters" [0]

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)


@torch.no_grad()
def update_momentum(
    model: nn.Module, model_ema: nn.Module, m: float, update_buffers: bool = True
) -> None:
    """Updates ``model_ema`` in place with an exponential moving average of ``model``.

    Same semantics as ``lightly.models.utils.update_momentum`` for the parameters,
    ``ema = m * ema + (1 - m) * model``, but computed with one multi-tensor
    ``torch._foreach_lerp_`` (a single pass over memory instead of lightly's
    multiply followed by add) and without recording an autograd graph. The lists
    of tensors are collected once per pair of models and reused while their module
    trees stay the same (any added, replaced or deleted submodule, parameter or
    buffer is noticed), so the per-call Python work is a few identity checks.

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
    tensors = _ModuleTensors.of(model)
    ema_tensors = _ModuleTensors.of(model_ema)
    ema_tensors.check_partner(tensors, update_buffers)
    torch._foreach_lerp_(ema_tensors.parameters, tensors.parameters, 1.0 - m)
    if not update_buffers or not tensors.buffers:
        return

    floating = [
        (b, e)
        for b, e in zip(tensors.buffers, ema_tensors.buffers, strict=True)
        if b.is_floating_point()
    ]
    integer = [
        (b, e)
        for b, e in zip(tensors.buffers, ema_tensors.buffers, strict=True)
        if not b.is_floating_point()
    ]
    if floating:
        torch._foreach_lerp_(
            [e for _, e in floating], [b for b, _ in floating], 1.0 - m
        )
    if integer:
        torch._foreach_copy_([e for _, e in integer], [b for b, _ in integer])


# Which tensors a module tree holds is remembered between calls, because collecting
# them is Python work that costs more than a GPU's whole multi-tensor update (and
# ~0.5 ms of ~6 ms per ViT-S pair on 2 CPU cores). Two checks keep the memory exact:
# - every registration of a submodule, parameter or buffer (``__setattr__``,
#   ``add_module``, ``register_*``, ``load_state_dict(assign=True)``) passes
#   through torch's global registration hooks, which bump _structure_version and
#   make the next call walk the tree again;
# - what bypasses those hooks (``del``, writes into ``module._parameters``,
#   ``Module._apply`` replacing parameter objects) is caught by re-reading the
#   remembered non-empty ``_modules``/``_parameters``/``_buffers`` dictionaries on
#   every call and comparing their values by identity (~0.15 ms for a ViT-S pair
#   on 2 CPU cores, where the walk took ~0.5 ms).
# Shapes and dtypes are checked when either list changes, not on every call: a
# tensor whose .data is replaced by one of another shape in one model only is the
# case left to lerp_ (which raises unless the shapes broadcast).
_structure_version = 0


def _note_structure_change(*_: object) -> None:
    global _structure_version
    _structure_version += 1


register_module_module_registration_hook(_note_structure_change)
register_module_parameter_registration_hook(_note_structure_change)
register_module_buffer_registration_hook(_note_structure_change)


class _ModuleTensors:
    """The parameters and buffers of a module tree, remembered between calls.

    Keyed weakly by the tree's root module and holding only what is below it (its
    dictionaries, submodules and tensors), so remembering never keeps a model alive.
    """

    _memory: weakref.WeakKeyDictionary[nn.Module, _ModuleTensors] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, module: nn.Module) -> None:
        self.version = _structure_version
        self.module_dicts, self.parameter_dicts, self.buffer_dicts = _tree_dicts(module)
        self.raw_modules = _values(self.module_dicts)
        self.raw_parameters = _values(self.parameter_dicts)
        self.raw_buffers = _values(self.buffer_dicts)
        # dict.fromkeys: drops tensors shared between modules, keeps the first
        # position; None marks a registered but unset parameter or buffer
        self.parameters: list[Tensor] = [
            p for p in dict.fromkeys(self.raw_parameters) if p is not None
        ]
        self.buffers: list[Tensor] = [
            b for b in dict.fromkeys(self.raw_buffers) if b is not None
        ]
        # partners whose tensors were checked against ours -> buffers checked too
        self.checked: weakref.WeakKeyDictionary[_ModuleTensors, bool] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def of(cls, module: nn.Module) -> _ModuleTensors:
        remembered = cls._memory.get(module)
        if remembered is not None and remembered.is_current():
            return remembered
        fresh = cls._memory[module] = cls(module)
        return fresh

    def is_current(self) -> bool:
        return (
            self.version == _structure_version
            and _same_objects(_values(self.module_dicts), self.raw_modules)
            and _same_objects(_values(self.parameter_dicts), self.raw_parameters)
            and _same_objects(_values(self.buffer_dicts), self.raw_buffers)
        )

    def check_partner(self, partner: _ModuleTensors, buffers: bool) -> None:
        """Raises unless ``partner`` (the model) pairs tensor by tensor with us."""
        checked_buffers = self.checked.get(partner)
        if checked_buffers is None or (buffers and not checked_buffers):
            _check_pairs("parameters", partner.parameters, self.parameters)
            if buffers:
                _check_pairs("buffers", partner.buffers, self.buffers)
            self.checked[partner] = buffers


def _tree_dicts(module: nn.Module) -> tuple[list[dict[str, Any]], ...]:
    """The non-empty ``_modules``, ``_parameters`` and ``_buffers`` dicts of a tree.

    In ``nn.Module.parameters()`` order (pre-order). An explicit stack over
    ``_modules`` is used because ``nn.Module.parameters()`` builds a name for every
    module and tensor (0.4-0.7 ms per ViT-S).
    """
    module_dicts: list[dict[str, Any]] = []
    parameter_dicts: list[dict[str, Any]] = []
    buffer_dicts: list[dict[str, Any]] = []
    visited: set[int] = set()
    stack: list[nn.Module | None] = [module]
    while stack:
        submodule = stack.pop()
        # as nn.Module.modules(): None entries skipped, shared modules visited once
        if submodule is None or id(submodule) in visited:
            continue
        visited.add(id(submodule))
        if submodule._modules:
            module_dicts.append(submodule._modules)
            stack += reversed(submodule._modules.values())
        if submodule._parameters:
            parameter_dicts.append(submodule._parameters)
        if submodule._buffers:
            buffer_dicts.append(submodule._buffers)
    return module_dicts, parameter_dicts, buffer_dicts


def _values(dicts: list[dict[str, Any]]) -> list[Any]:
    values: list[Any] = []
    for tensors in dicts:
        values += tensors.values()
    return values


def _same_objects(values: list[Any], remembered: list[Any]) -> bool:
    # identity, never ==: comparing a tensor with == is elementwise (and slow)
    return len(values) == len(remembered) and all(map(operator.is_, values, remembered))


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
