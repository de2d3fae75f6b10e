"""``msn_lightly``: MSN as lightly composes it in ``examples/pytorch/msn.py``.

The baseline that ``msn`` must beat: lightly's ``MaskedVisionTransformerTIMM``,
``MSNProjectionHead`` and ``MSNLoss`` wired exactly as in lightly's example, i.e.

- one ``random_token_mask`` with ratio 0.15 over ``(width // patch_size) ** 2``
  tokens for every anchor view, the focal views included;
- prototypes passed to the loss as ``prototypes.data`` (they receive no gradient);
- a constant EMA momentum of 0.996 and a constant target sharpening of 0.25.

Only the optimizer schedule is the harness's (AdamW, warm-up and cosine decay), so
that all methods share it.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from lightly.loss import MSNLoss
from lightly.models import utils
from lightly.models.modules.heads import MSNProjectionHead
from lightly.transforms import MSNTransform
from torch import Tensor, nn

from benchmarks.methods.base import (
    BenchmarkConfig,
    BenchmarkMethod,
    make_masked_vit,
    views_of,
)
from lightly_msn.device_transforms import DeviceMultiViewTransform


def msn_transform_kwargs(config: BenchmarkConfig) -> dict[str, Any]:
    """``MSNTransform`` arguments shared by ``msn``, ``msn_lightly`` and ``pmsn``.

    One target and one anchor random view plus ``num_local_views`` focal views; the
    colour jitter strength 0.5 of the official configuration (``msn_vits16.yaml``).
    """
    return dict(
        random_size=config.img_size,
        focal_size=config.local_size,
        random_views=2,
        focal_views=config.num_local_views,
        cj_strength=0.5,
        gaussian_blur=config.gaussian_blur,
        normalize=config.normalize,
    )


class MSNLightly(BenchmarkMethod):
    name: ClassVar[str] = "msn_lightly"
    defaults: ClassVar[dict[str, Any]] = dict(
        lr_per_256=2.5e-4,  # 1e-3 for a batch of 1024 (official ViT-S/16)
        weight_decay=0.04,
        mask_ratio=0.15,
        momentum=0.996,
        num_prototypes=1024,
    )

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__(config)
        self.mask_ratio = float(self.recipe["mask_ratio"])
        self.backbone = make_masked_vit(config)
        self.projection_head = MSNProjectionHead(input_dim=config.embed_dim)
        self.anchor_backbone = copy.deepcopy(self.backbone)
        self.anchor_projection_head = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone)
        utils.deactivate_requires_grad(self.projection_head)
        self.prototypes = nn.Linear(256, self.recipe["num_prototypes"], bias=False)
        self.criterion = MSNLoss()

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        return MSNTransform(**msn_transform_kwargs(config))

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        return DeviceMultiViewTransform.msn(**msn_transform_kwargs(config))

    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.anchor_backbone, self.anchor_projection_head, self.prototypes]

    @torch.no_grad()
    def backbone_features(self, images: Tensor) -> Tensor:
        return self.backbone(images=images)

    def forward_masked(self, images: Tensor) -> Tensor:
        batch_size, _, _, width = images.shape
        seq_length = (width // self.config.patch_size) ** 2
        idx_keep, _ = utils.random_token_mask(
            size=(batch_size, seq_length),
            mask_ratio=self.mask_ratio,
            device=images.device,
        )
        out = self.anchor_backbone(images=images, idx_keep=idx_keep)
        return self.anchor_projection_head(out)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        momentum = float(self.recipe["momentum"])
        utils.update_momentum(self.anchor_backbone, self.backbone, momentum)
        utils.update_momentum(
            self.anchor_projection_head, self.projection_head, momentum
        )
        views = views_of(batch)
        targets = self.projection_head(self.backbone(images=views[0]))
        anchors = self.forward_masked(views[1])
        anchors_focal = self.forward_masked(torch.cat(views[2:], dim=0))
        anchors = torch.cat([anchors, anchors_focal], dim=0)
        loss = self.criterion(anchors, targets, self.prototypes.weight.data)
        self.log_loss(loss, batch_size=len(views[0]))
        return loss
