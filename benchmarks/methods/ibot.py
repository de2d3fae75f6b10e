"""``ibot``: DINO on the class token plus masked patch distillation (iBOT [0]).

As lightly's ViT benchmark (``benchmarks/imagenet/vitb16/ibot.py``), on top of
``dino``: the ``DINOProjectionHead`` also projects the patch tokens, and
``IBOTPatchLoss`` distils the teacher's patch tokens into the student's at the
patches that ``random_block_mask`` hides from the student's global views. Teacher
temperature warmed up linearly 0.04 -> 0.07, gradient clipping 3.0; the optimizer,
weight decay schedule and EMA are ``dino``'s.

- [0]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021,
  https://arxiv.org/abs/2111.07832
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from lightly.loss import IBOTPatchLoss
from lightly.models.utils import random_block_mask
from lightly.transforms import IBOTTransform
from lightly.utils.scheduler import linear_warmup_schedule
from torch import Tensor
from torch.optim import Optimizer

from benchmarks.methods.base import BenchmarkConfig, views_of
from benchmarks.methods.dino import DINO, dino_transform_kwargs
from lightly_msn.device_transforms import DeviceMultiViewTransform


class IBOT(DINO):
    name: ClassVar[str] = "ibot"
    defaults: ClassVar[dict[str, Any]] = dict(
        DINO.defaults,
        output_dim=4096,  # 8192 in lightly's ImageNet benchmark
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        teacher_temp_warmup_fraction=0.3,  # 30 of lightly's 100 epochs
        clip_grad=3.0,
    )

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__(config)
        self.patch_criterion = IBOTPatchLoss(output_dim=int(self.recipe["output_dim"]))

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        return IBOTTransform(**dino_transform_kwargs(config))

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        return DeviceMultiViewTransform.ibot(**dino_transform_kwargs(config))

    def block_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """Random blocks of patches hidden from the student, ``(B, H, W)``."""
        height, width = self.teacher_backbone.vit.patch_embed.grid_size
        return random_block_mask(
            size=(batch_size, height, width),
            min_num_masks_per_block=(min(height, width) // 3) ** 2,
            device=device,
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.update_teacher()
        views = views_of(batch)
        global_views = torch.cat(views[:2])
        block_mask = self.block_mask(len(global_views), global_views.device)
        # the class token (index 0) is never masked
        mask = torch.nn.functional.pad(block_mask.flatten(start_dim=1), (1, 0))

        with torch.no_grad():
            teacher_tokens = self.teacher_backbone.encode(global_views)
            teacher_cls_out = self.teacher_head(teacher_tokens[:, 0]).float()
            teacher_patch_out = self.teacher_head(teacher_tokens[mask]).float()

        student_tokens = self.student_backbone.encode(global_views, mask=mask)
        student_cls = [student_tokens[:, 0]]
        if len(views) > 2:
            local_tokens = self.student_backbone.encode(torch.cat(views[2:]))
            student_cls.append(local_tokens[:, 0])
        student_cls_out = self.student_head(torch.cat(student_cls)).float()
        student_patch_out = self.student_head(student_tokens[mask]).float()

        teacher_temp = linear_warmup_schedule(
            step=self.trainer.global_step,
            warmup_steps=int(
                self.recipe["teacher_temp_warmup_fraction"]
                * self.trainer.estimated_stepping_batches
            ),
            start_value=float(self.recipe["warmup_teacher_temp"]),
            end_value=float(self.recipe["teacher_temp"]),
        )
        cls_loss = self.criterion(
            teacher_out=list(teacher_cls_out.chunk(2)),
            student_out=list(student_cls_out.chunk(len(views))),
            teacher_temp=teacher_temp,
        )
        patch_loss = self.patch_criterion(
            teacher_out=teacher_patch_out,
            student_out=student_patch_out,
            mask=block_mask,
            teacher_temp=teacher_temp,
        )
        loss = cls_loss + patch_loss
        self.log_loss(
            loss, batch_size=len(views[0]), cls_loss=cls_loss, patch_loss=patch_loss
        )
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        # lightly's benchmark clips the gradient norm (after unscaling under AMP)
        self.clip_gradients(
            optimizer,
            gradient_clip_val=float(self.recipe["clip_grad"]),
            gradient_clip_algorithm="norm",
        )
