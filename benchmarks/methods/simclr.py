"""``simclr``: contrastive learning of two augmented views (SimCLR [0]).

lightly's ``SimCLRProjectionHead`` (2048 hidden, 128 output) and ``NTXentLoss``
(temperature 0.2, as MoCo v3 [1] uses for ViTs; negatives from all devices), two
``SimCLRTransform`` views, AdamW with learning rate 5e-4 per 256 images.

- [0]: A Simple Framework for Contrastive Learning of Visual Representations,
  2020, https://arxiv.org/abs/2002.05709
- [1]: An Empirical Study of Training Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.02057
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from torch import Tensor, nn

from benchmarks.methods.base import (
    BenchmarkConfig,
    BenchmarkMethod,
    make_masked_vit,
    views_of,
)
from lightly_msn.device_transforms import DeviceMultiViewTransform


class SimCLR(BenchmarkMethod):
    name: ClassVar[str] = "simclr"
    defaults: ClassVar[dict[str, Any]] = dict(
        lr_per_256=5e-4, weight_decay=0.05, temperature=0.2
    )

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__(config)
        self.backbone = make_masked_vit(config)
        self.projection_head = SimCLRProjectionHead(
            input_dim=config.embed_dim, hidden_dim=2048, output_dim=128
        )
        self.criterion = NTXentLoss(
            temperature=float(self.recipe["temperature"]),
            gather_distributed=config.global_batch_size > config.batch_size,
        )

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        return SimCLRTransform(**cls.transform_kwargs(config))

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        return DeviceMultiViewTransform.simclr(**cls.transform_kwargs(config))

    @staticmethod
    def transform_kwargs(config: BenchmarkConfig) -> dict[str, Any]:
        return dict(
            input_size=config.img_size,
            gaussian_blur=config.gaussian_blur,
            normalize=config.normalize,
        )

    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.backbone, self.projection_head]

    @torch.no_grad()
    def backbone_features(self, images: Tensor) -> Tensor:
        return self.backbone(images=images)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        views = views_of(batch)
        projections = self.projection_head(self.backbone(images=torch.cat(views[:2])))
        loss = self.criterion(*projections.float().chunk(2))
        self.log_loss(loss, batch_size=len(views[0]))
        return loss
