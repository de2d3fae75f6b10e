"""``mae``: masked autoencoder (MAE [0]) from lightly's components.

As lightly's ViT benchmark (``benchmarks/imagenet/vitb16/mae.py``): 75 % of the
patches are dropped, ``MaskedVisionTransformerDecoderTIMM`` reconstructs their
pixels, mean squared error on the masked patches, one ``MAETransform`` view, AdamW
with learning rate 1.5e-4 per 256 images, betas (0.9, 0.95), weight decay 0.05.
The decoder is scaled down with the encoder (ImageNet: 512 wide, 8 deep).

- [0]: Masked Autoencoders Are Scalable Vision Learners, 2021,
  https://arxiv.org/abs/2111.06377
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from lightly.models import utils
from lightly.models.modules import (
    MaskedVisionTransformerDecoderTIMM,
)
from lightly.models.modules.masked_vision_transformer_timm import init_weights
from lightly.transforms import MAETransform
from torch import Tensor, nn

from benchmarks.methods.base import (
    BenchmarkConfig,
    BenchmarkMethod,
    make_masked_vit,
    views_of,
)
from lightly_msn.device_transforms import DeviceMultiViewTransform


class MAE(BenchmarkMethod):
    name: ClassVar[str] = "mae"
    defaults: ClassVar[dict[str, Any]] = dict(
        lr_per_256=1.5e-4,
        weight_decay=0.05,
        betas=(0.9, 0.95),
        mask_ratio=0.75,
        decoder_dim=128,
        decoder_depth=2,
        decoder_heads=4,
    )

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__(config)
        self.backbone = make_masked_vit(config)
        vit = self.backbone.vit
        decoder_dim = int(self.recipe["decoder_dim"])
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(config.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            embed_dim=decoder_dim,
            depth=int(self.recipe["decoder_depth"]),
            num_heads=int(self.recipe["decoder_heads"]),
        )
        self.prediction_head = nn.Linear(decoder_dim, config.patch_size**2 * 3)
        self.decoder_embed.apply(init_weights)
        self.prediction_head.apply(init_weights)
        self.criterion = nn.MSELoss()

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        return MAETransform(input_size=config.img_size, normalize=config.normalize)

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        return DeviceMultiViewTransform.mae(
            input_size=config.img_size, normalize=config.normalize
        )

    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.backbone, self.decoder_embed, self.decoder, self.prediction_head]

    @torch.no_grad()
    def backbone_features(self, images: Tensor) -> Tensor:
        return self.backbone(images=images)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = views_of(batch)[0]
        batch_size = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(batch_size, self.sequence_length),
            mask_ratio=float(self.recipe["mask_ratio"]),
            device=images.device,
        )
        encoded = self.decoder_embed(self.backbone.encode(images, idx_keep=idx_keep))
        tokens = encoded.new_zeros(batch_size, self.sequence_length, encoded.shape[-1])
        tokens = utils.set_at_index(tokens, idx_keep, encoded)
        decoded = self.decoder(tokens, idx_mask=idx_mask)
        predictions = self.prediction_head(utils.get_at_index(decoded, idx_mask))
        # idx_mask counts the class token; the patches do not
        targets = utils.get_at_index(
            utils.patchify(images, self.config.patch_size), idx_mask - 1
        )
        loss = self.criterion(predictions.float(), targets.float())
        self.log_loss(loss, batch_size=batch_size)
        return loss
