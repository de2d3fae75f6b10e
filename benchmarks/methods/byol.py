"""``byol``: bootstrap your own latent (BYOL [0]) from lightly's components.

An online ViT with ``BYOLProjectionHead`` and ``BYOLPredictionHead`` predicts the
projection of an EMA target network (momentum 0.99 -> 1, cosine) on the other of
two ``BYOLTransform`` views; symmetric negative cosine similarity; AdamW with
learning rate 5e-4 per 256 images.

- [0]: Bootstrap your own latent, 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import update_momentum
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from torch import Tensor, nn

from benchmarks.methods.base import (
    BenchmarkConfig,
    BenchmarkMethod,
    make_masked_vit,
    views_of,
)
from lightly_msn.device_transforms import DeviceMultiViewTransform


class BYOL(BenchmarkMethod):
    name: ClassVar[str] = "byol"
    defaults: ClassVar[dict[str, Any]] = dict(
        lr_per_256=5e-4, weight_decay=0.05, momentum=0.99
    )

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__(config)
        self.backbone = make_masked_vit(config)
        self.projection_head = BYOLProjectionHead(config.embed_dim, 4096, 256)
        self.prediction_head = BYOLPredictionHead(256, 4096, 256)
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projection_head = copy.deepcopy(self.projection_head)
        for module in (self.target_backbone, self.target_projection_head):
            module.requires_grad_(False)
        self.criterion = NegativeCosineSimilarity()

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        blur = config.gaussian_blur
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(
                input_size=config.img_size,
                gaussian_blur=blur and 1.0,
                normalize=config.normalize,
            ),
            view_2_transform=BYOLView2Transform(
                input_size=config.img_size,
                gaussian_blur=blur and 0.1,
                normalize=config.normalize,
            ),
        )

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        blur = config.gaussian_blur
        return DeviceMultiViewTransform.byol(
            input_size=config.img_size,
            gaussian_blur=(blur and 1.0, blur and 0.1),
            normalize=config.normalize,
        )

    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.backbone, self.projection_head, self.prediction_head]

    @torch.no_grad()
    def backbone_features(self, images: Tensor) -> Tensor:
        return self.target_backbone(images=images)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        momentum = self.momentum(float(self.recipe["momentum"]))
        update_momentum(self.backbone, self.target_backbone, m=momentum)
        update_momentum(self.projection_head, self.target_projection_head, m=momentum)
        views = views_of(batch)
        images = torch.cat(views[:2])
        predictions = self.prediction_head(self.projection_head(self.backbone(images)))
        with torch.no_grad():
            targets = self.target_projection_head(self.target_backbone(images))
        p0, p1 = predictions.float().chunk(2)
        z0, z1 = targets.float().chunk(2)
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        self.log_loss(loss, batch_size=len(views[0]))
        return loss
