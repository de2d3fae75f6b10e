"""``msn``: this package's MSN (``lightly_msn.train.MSNLightningModule``).

The method under test is the package's own training module, unchanged: the official
recipe of [0] (patch dropping on the random anchor views only, learnable prototypes,
Sinkhorn and ME-MAX, linear warm-up then cosine learning rate, cosine weight decay
0.04 -> 0.4, EMA momentum 0.996 -> 1, gradient clipping 3.0), with the learning rate
of ViT-S/16 (1e-3 for a batch of 1024) scaled linearly to the batch size.

It is not a subclass of ``BenchmarkMethod`` because its optimizer and schedules are
the package's; it has the same interface (``from_config``, ``make_transform``,
``make_device_transform``, ``backbone_features``).

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from benchmarks.methods.base import BenchmarkConfig, make_vit
from benchmarks.methods.msn_lightly import msn_transform_kwargs
from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.train import MSNLightningModule
from lightly_msn.transforms import MSNTransform


class MSNMethod(MSNLightningModule):
    name: ClassVar[str] = "msn"
    config: BenchmarkConfig
    recipe: dict[str, Any]
    defaults: ClassVar[dict[str, Any]] = dict(
        lr_per_256=2.5e-4,  # 1e-3 for a batch of 1024 (official ViT-S/16)
        start_lr_fraction=0.2,  # official start_lr 2e-4 for lr 1e-3
        final_lr=1e-6,
        weight_decay=0.04,
        final_weight_decay=0.4,
        momentum=0.996,
        mask_ratio=0.15,
        num_prototypes=1024,
        hidden_dim=2048,
        output_dim=256,
        temperature=0.1,
        sharpen_temperature=0.25,
        me_max_weight=1.0,
        feature_norm=True,  # class token after the final norm, as for the others
    )

    @classmethod
    def from_config(cls, config: BenchmarkConfig) -> MSNMethod:
        recipe = config.recipe(cls.name, cls.defaults)
        lr = recipe["lr_per_256"] * config.global_batch_size / 256
        method = cls(
            vit=make_vit(config),
            img_size=config.img_size,  # the data module's, as Lightning's logger asks
            mask_ratio=recipe["mask_ratio"],
            num_prototypes=recipe["num_prototypes"],
            hidden_dim=recipe["hidden_dim"],
            output_dim=recipe["output_dim"],
            temperature=recipe["temperature"],
            sharpen_temperature=recipe["sharpen_temperature"],
            final_sharpen_temperature=recipe["sharpen_temperature"],
            me_max_weight=recipe["me_max_weight"],
            num_random_views=2,
            lr=lr,
            start_lr=lr * recipe["start_lr_fraction"],
            final_lr=recipe["final_lr"],
            warmup_epochs=config.warmup_epochs,
            weight_decay=recipe["weight_decay"],
            final_weight_decay=recipe["final_weight_decay"],
            momentum=recipe["momentum"],
        )
        method.config = config
        method.recipe = recipe
        return method

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        return MSNTransform(**msn_transform_kwargs(config))

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        return DeviceMultiViewTransform.msn(**msn_transform_kwargs(config))

    def backbone_features(self, images: Tensor) -> Tensor:
        return self.model.backbone_features(
            images, encoder="target", norm=bool(self.recipe["feature_norm"])
        )
