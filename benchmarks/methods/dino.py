"""``dino``: self-distillation with no labels (DINO [0]) from lightly's components.

As lightly's ViT benchmark (``benchmarks/imagenet/vitb16/dino.py``): a student and
an EMA teacher ``MaskedVisionTransformerTIMM``, ``DINOProjectionHead`` (no weight
normalisation of the last layer, frozen during the first 1 % of training: lightly's
and the official recipe freeze it for the first of 100 epochs), ``DINOLoss`` with
a teacher temperature of 0.04, two global and ``num_local_views`` local crops,
AdamW with learning rate 5e-4 per 256 images and a cosine weight decay 0.04 -> 0.4.

- [0]: Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from lightly.transforms import DINOTransform
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.optim import Optimizer

from benchmarks.methods.base import (
    BenchmarkConfig,
    BenchmarkMethod,
    make_masked_vit,
    views_of,
)
from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.schedules import apply_schedule


def dino_transform_kwargs(config: BenchmarkConfig) -> dict[str, Any]:
    """``DINOTransform`` / ``IBOTTransform`` arguments of ``dino`` and ``ibot``.

    Two global views of ``img_size`` and ``num_local_views`` local views; no blur on
    small images (``config.gaussian_blur`` 0), else the recipe's 1.0 / 0.1 / 0.5.
    """
    blur = config.gaussian_blur
    return dict(
        global_crop_size=config.img_size,
        local_crop_size=config.local_size,
        n_local_views=config.num_local_views,
        gaussian_blur=(blur and 1.0, blur and 0.1, blur),
        normalize=config.normalize,
    )


class DINO(BenchmarkMethod):
    name: ClassVar[str] = "dino"
    defaults: ClassVar[dict[str, Any]] = dict(
        lr_per_256=5e-4,
        weight_decay=0.04,
        final_weight_decay=0.4,
        output_dim=4096,  # 65536 on ImageNet; fewer prototypes for small data
        teacher_temp=0.04,
        momentum=0.996,
        # as a fraction of the budget, not one epoch: a one-epoch profile would
        # otherwise never train the last layer
        freeze_last_layer_fraction=0.01,
    )

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__(config)
        output_dim = int(self.recipe["output_dim"])
        self.teacher_backbone = make_masked_vit(config)
        self.teacher_head = DINOProjectionHead(
            input_dim=config.embed_dim, output_dim=output_dim, norm_last_layer=False
        )
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        self.student_head = DINOProjectionHead(
            input_dim=config.embed_dim,
            output_dim=output_dim,
            norm_last_layer=False,
        )
        for module in (self.teacher_backbone, self.teacher_head):
            module.requires_grad_(False)
        self.criterion = DINOLoss(output_dim=output_dim)

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        return DINOTransform(**dino_transform_kwargs(config))

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        return DeviceMultiViewTransform.dino(**dino_transform_kwargs(config))

    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.student_backbone, self.student_head]

    @torch.no_grad()
    def backbone_features(self, images: Tensor) -> Tensor:
        return self.teacher_backbone(images=images)

    def update_teacher(self) -> None:
        momentum = self.momentum(float(self.recipe["momentum"]))
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.update_teacher()
        views = views_of(batch)
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_backbone(global_views))
        student_out = [self.student_head(self.student_backbone(global_views))]
        if len(views) > 2:
            local_views = torch.cat(views[2:])
            student_out.append(self.student_head(self.student_backbone(local_views)))
        loss = self.criterion(
            teacher_out=list(teacher_out.float().chunk(2)),
            student_out=list(torch.cat(student_out).float().chunk(len(views))),
            teacher_temp=float(self.recipe["teacher_temp"]),
        )
        self.log_loss(loss, batch_size=len(views[0]))
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        total_steps = self.total_steps
        frozen_fraction = float(self.recipe["freeze_last_layer_fraction"])
        if self.trainer.global_step < total_steps * frozen_fraction:
            for param in self.student_head.last_layer.parameters():
                param.grad = None
        apply_schedule(
            optimizer,
            weight_decay=cosine_schedule(
                step=self.trainer.global_step,
                max_steps=total_steps,
                start_value=float(self.recipe["weight_decay"]),
                end_value=float(self.recipe["final_weight_decay"]),
            ),
        )
