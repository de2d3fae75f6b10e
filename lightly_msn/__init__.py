"""Masked Siamese Networks (MSN) for the lightly self-supervised learning library.

Assran et al., "Masked Siamese Networks for Label-Efficient Learning", ECCV 2022,
https://arxiv.org/abs/2204.07141

Every public component keeps the class name, constructor arguments and forward
signature of its lightly counterpart, so switching is a one-line import change::

    # from lightly.loss import MSNLoss
    from lightly_msn import MSNLoss

Names are imported lazily, so ``import lightly_msn`` (and ``lightly-msn --version``)
stays fast and does not import torch until a component is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "MSNLoss": "lightly_msn.loss",
    "MSNLossOutput": "lightly_msn.loss",
    "prototype_probabilities": "lightly_msn.loss",
    "sharpen": "lightly_msn.loss",
    "sinkhorn": "lightly_msn.loss",
    "PMSNLoss": "lightly_msn.pmsn_loss",
    "PMSNCustomLoss": "lightly_msn.pmsn_loss",
    "MSNProjectionHead": "lightly_msn.heads",
    "MSNPrototypes": "lightly_msn.heads",
    "random_token_mask": "lightly_msn.masking",
    "focal_token_mask": "lightly_msn.masking",
    "update_momentum": "lightly_msn.ema",
    "cosine_schedule": "lightly_msn.schedules",
    "WarmupCosineSchedule": "lightly_msn.schedules",
    "CosineSchedule": "lightly_msn.schedules",
    "LinearSchedule": "lightly_msn.schedules",
    "MSNSchedules": "lightly_msn.schedules",
    "MSNTransform": "lightly_msn.transforms",
    "MSNViewTransform": "lightly_msn.transforms",
    "DeviceMultiViewTransform": "lightly_msn.device_transforms",
    "ViewSpec": "lightly_msn.device_transforms",
    "MSN": "lightly_msn.model",
    "load_backbone": "lightly_msn.model",
    "MSNLightningModule": "lightly_msn.train",
    "pretrain": "lightly_msn.train",
}

# a literal list, so that linters see the TYPE_CHECKING imports as re-exports
__all__ = [
    "__version__",
    "MSNLoss",
    "MSNLossOutput",
    "prototype_probabilities",
    "sharpen",
    "sinkhorn",
    "PMSNLoss",
    "PMSNCustomLoss",
    "MSNProjectionHead",
    "MSNPrototypes",
    "random_token_mask",
    "focal_token_mask",
    "update_momentum",
    "cosine_schedule",
    "WarmupCosineSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "MSNSchedules",
    "MSNTransform",
    "MSNViewTransform",
    "DeviceMultiViewTransform",
    "ViewSpec",
    "MSN",
    "load_backbone",
    "MSNLightningModule",
    "pretrain",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lightly_msn.device_transforms import DeviceMultiViewTransform, ViewSpec
    from lightly_msn.ema import update_momentum
    from lightly_msn.heads import MSNProjectionHead, MSNPrototypes
    from lightly_msn.loss import (
        MSNLoss,
        MSNLossOutput,
        prototype_probabilities,
        sharpen,
        sinkhorn,
    )
    from lightly_msn.masking import focal_token_mask, random_token_mask
    from lightly_msn.model import MSN, load_backbone
    from lightly_msn.pmsn_loss import PMSNCustomLoss, PMSNLoss
    from lightly_msn.schedules import (
        CosineSchedule,
        LinearSchedule,
        MSNSchedules,
        WarmupCosineSchedule,
        cosine_schedule,
    )
    from lightly_msn.train import MSNLightningModule, pretrain
    from lightly_msn.transforms import MSNTransform, MSNViewTransform


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightly_msn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
