"""Hyper-parameter schedules of MSN: learning rate, weight decay, momentum, sharpening.

The official code [1] (``src/msn_train.py``, ``src/utils.py``) uses, per
optimisation step:

- learning rate: linear warm-up from ``start_lr`` to ``lr``, then cosine decay to
  ``final_lr`` (:class:`WarmupCosineSchedule`);
- weight decay: cosine from 0.04 to 0.4 (:class:`CosineSchedule`);
- EMA momentum of the target encoder: linear from 0.996 to 1.0
  (:class:`LinearSchedule`);
- target sharpening temperature: linear from start to final value
  (:class:`LinearSchedule`, constant 0.25 in the released configs).

All four run over ``1.25 x`` the training iterations ("ipe_scale"), so training
stops before they reach their end values: pass ``ipe_scale=1.25`` for that
behaviour (:meth:`MSNSchedules.official` does). ``schedule(step)`` equals the
official scheduler's value after ``step`` calls of its ``step()``; past the
schedule's horizon the end value is held (the official cosine would rise again).

``cosine_schedule`` is lightly's function, re-exported unchanged.
:func:`weight_decay_groups` splits parameters into the official optimizer groups and
:func:`apply_schedule` sets a step's learning rate and weight decay on them.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
- [1]: https://github.com/facebookresearch/msn
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "CosineSchedule",
    "LinearSchedule",
    "MSNSchedules",
    "WarmupCosineSchedule",
    "apply_schedule",
    "cosine_schedule",
    "weight_decay_groups",
]

# marks the optimizer groups whose weight decay follows the schedule
DECAY_FLAG = "apply_weight_decay"


def weight_decay_groups(
    modules: Iterable[nn.Module], no_decay_modules: Iterable[nn.Module] = ()
) -> list[dict[str, Any]]:
    """Optimizer parameter groups as in the official code [1] (``init_opt``).

    Weight decay applies to the weight matrices of ``modules`` (and to the class
    token and position embedding); biases and other 1-D parameters (norms) get
    none, and so do all parameters of ``no_decay_modules`` (MSN's prototypes).
    Parameters without gradient are left out. Every group carries
    ``"apply_weight_decay"``, which :func:`apply_schedule` reads.

    Returns:
        ``[decayed, not decayed, no_decay_modules' parameters]``; empty groups are
        kept, so the positions are stable.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or name.endswith("bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    excluded = [
        param
        for module in no_decay_modules
        for param in module.parameters()
        if param.requires_grad
    ]
    return [
        {"params": decay, DECAY_FLAG: True},
        {"params": no_decay, DECAY_FLAG: False, "weight_decay": 0.0},
        {"params": excluded, DECAY_FLAG: False, "weight_decay": 0.0},
    ]


def apply_schedule(
    optimizer: Optimizer, lr: float | None = None, weight_decay: float | None = None
) -> None:
    """Sets the learning rate of every group and the weight decay of decayed groups.

    A group is decayed when its ``"apply_weight_decay"`` flag (set by
    :func:`weight_decay_groups`) is true; groups without the flag are decayed when
    their weight decay is not zero. ``None`` leaves a value unchanged.
    """
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = lr
        decayed = group.get(DECAY_FLAG, group.get("weight_decay", 0.0) != 0.0)
        if weight_decay is not None and decayed:
            group["weight_decay"] = weight_decay


def _check_common(name: str, max_steps: int, ipe_scale: float) -> None:
    if max_steps < 1:
        raise ValueError(f"{name}: max_steps must be >= 1, got {max_steps}.")
    if not ipe_scale > 0:
        raise ValueError(f"{name}: ipe_scale must be > 0, got {ipe_scale}.")


def _check_step(name: str, step: int) -> None:
    if step < 0:
        raise ValueError(f"{name}: step must be >= 0, got {step}.")


def _half_cosine(progress: float) -> float:
    """Goes from 1 at ``progress=0`` to 0 at ``progress>=1`` along a half cosine."""
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True)
class _RampSchedule:
    """Fields and checks shared by the linear and cosine schedules."""

    max_steps: int
    start_value: float
    end_value: float
    ipe_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_common(type(self).__name__, self.max_steps, self.ipe_scale)

    @property
    def horizon(self) -> int:
        """Last step of the schedule, ``int(ipe_scale * max_steps)`` as in [1]."""
        return max(1, int(self.ipe_scale * self.max_steps))


@dataclass(frozen=True)
class LinearSchedule(_RampSchedule):
    """Linear ramp from ``start_value`` to ``end_value`` over ``ipe_scale * max_steps``.

    The official EMA momentum (0.996 -> 1.0) and sharpening temperature schedules.

    Args:
        max_steps: Number of training steps.
        start_value: Value at step 0.
        end_value: Value at step ``ipe_scale * max_steps`` and after.
        ipe_scale: Stretch of the schedule; 1.25 in the official code.
    """

    def __call__(self, step: int) -> float:
        _check_step("LinearSchedule", step)
        progress = min(step / (self.ipe_scale * self.max_steps), 1.0)
        return self.start_value + (self.end_value - self.start_value) * progress


@dataclass(frozen=True)
class CosineSchedule(_RampSchedule):
    """Half-cosine from ``start_value`` to ``end_value`` over ``ipe_scale * max_steps``.

    The official weight decay schedule (``CosineWDSchedule``: 0.04 -> 0.4); the
    horizon is ``int(ipe_scale * max_steps)`` as there.

    Args:
        max_steps: Number of training steps.
        start_value: Value at step 0.
        end_value: Value at the horizon and after.
        ipe_scale: Stretch of the schedule; 1.25 in the official code.
    """

    def __call__(self, step: int) -> float:
        _check_step("CosineSchedule", step)
        weight = _half_cosine(step / self.horizon)
        return self.end_value + (self.start_value - self.end_value) * weight


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Linear warm-up, then half-cosine decay: the official learning rate schedule.

    For ``step < warmup_steps`` the value rises linearly from
    ``warmup_start_value`` to ``start_value``; then it decays along a half cosine
    from ``start_value`` to ``end_value`` at the horizon ``int(ipe_scale *
    max_steps)`` (``WarmupCosineSchedule`` of [1] with ``start_lr`` =
    ``warmup_start_value``, ``ref_lr`` = ``start_value``, ``final_lr`` =
    ``end_value``). Argument names follow ``lightly.utils.scheduler``.

    Args:
        max_steps: Number of training steps (warm-up included).
        warmup_steps: Number of warm-up steps, at most the horizon.
        start_value: Peak value, reached at the end of the warm-up.
        end_value: Value at the horizon and after.
        warmup_start_value: Value at step 0.
        ipe_scale: Stretch of the schedule; 1.25 in the official code.
    """

    max_steps: int
    warmup_steps: int
    start_value: float
    end_value: float
    warmup_start_value: float = 0.0
    ipe_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_common("WarmupCosineSchedule", self.max_steps, self.ipe_scale)
        if not 0 <= self.warmup_steps <= self.horizon:
            raise ValueError(
                "WarmupCosineSchedule: warmup_steps must be in [0, "
                f"{self.horizon}] (the horizon), got {self.warmup_steps}."
            )

    @property
    def horizon(self) -> int:
        return max(1, int(self.ipe_scale * self.max_steps))

    def __call__(self, step: int) -> float:
        _check_step("WarmupCosineSchedule", step)
        if step < self.warmup_steps:
            progress = step / self.warmup_steps
            return self.warmup_start_value + progress * (
                self.start_value - self.warmup_start_value
            )
        decay_steps = max(1, self.horizon - self.warmup_steps)
        weight = _half_cosine((step - self.warmup_steps) / decay_steps)
        return self.end_value + (self.start_value - self.end_value) * weight


@dataclass(frozen=True)
class MSNSchedules:
    """The four schedules of an MSN run; ``values(step)`` evaluates all of them."""

    lr: WarmupCosineSchedule
    weight_decay: CosineSchedule
    momentum: LinearSchedule
    sharpen_temperature: LinearSchedule

    @classmethod
    def official(
        cls,
        max_steps: int,
        warmup_steps: int,
        lr: float = 1e-3,
        start_lr: float = 2e-4,
        final_lr: float = 1e-6,
        weight_decay: float = 0.04,
        final_weight_decay: float = 0.4,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        sharpen_temperature: float = 0.25,
        final_sharpen_temperature: float = 0.25,
        ipe_scale: float = 1.25,
    ) -> MSNSchedules:
        """The official ViT-S/16 schedules [1] (``configs/pretrain/msn_vits16.yaml``).

        Args:
            max_steps: Number of training steps (epochs x iterations per epoch).
            warmup_steps: Learning-rate warm-up steps (15 epochs officially).
            lr: Peak learning rate, reached at the end of the warm-up.
            start_lr: Initial learning rate, at the start of the warm-up.
            final_lr: Final learning rate, at the end of the cosine decay.
            weight_decay: Start of the weight decay.
            final_weight_decay: End of the weight decay.
            momentum: Start of the EMA momentum.
            final_momentum: End of the EMA momentum.
            sharpen_temperature: Start of the target sharpening temperature.
            final_sharpen_temperature: End of the target sharpening temperature.
            ipe_scale: Stretch of all four schedules (1.25 officially).
        """
        return cls(
            lr=WarmupCosineSchedule(
                max_steps=max_steps,
                warmup_steps=warmup_steps,
                start_value=lr,
                end_value=final_lr,
                warmup_start_value=start_lr,
                ipe_scale=ipe_scale,
            ),
            weight_decay=CosineSchedule(
                max_steps, weight_decay, final_weight_decay, ipe_scale
            ),
            momentum=LinearSchedule(max_steps, momentum, final_momentum, ipe_scale),
            sharpen_temperature=LinearSchedule(
                max_steps, sharpen_temperature, final_sharpen_temperature, ipe_scale
            ),
        )

    def values(self, step: int) -> dict[str, float]:
        """All four values at ``step``, keyed by the field names."""
        return {
            "lr": self.lr(step),
            "weight_decay": self.weight_decay(step),
            "momentum": self.momentum(step),
            "sharpen_temperature": self.sharpen_temperature(step),
        }
