"""Tiny models and datasets shared by the model / training tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

TINY_VIT: dict[str, Any] = dict(
    img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
)
TINY_HEAD: dict[str, Any] = dict(hidden_dim=32, output_dim=16, num_prototypes=8)


def tiny_vit(**overrides: Any) -> Any:
    from lightly_msn.model import create_vit

    kwargs = {**TINY_VIT, **overrides}
    return create_vit("vit_tiny_patch16_224", **kwargs)


def quiet_cpu_trainer(max_steps: int = 1) -> Any:
    """A Lightning ``Trainer`` on one CPU: no logger, checkpoints, bars or summary."""
    from pytorch_lightning import Trainer

    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def tiny_module(**overrides: Any) -> Any:
    from lightly_msn.train import MSNLightningModule

    kwargs: dict[str, Any] = dict(vit=tiny_vit(), max_steps=10, **TINY_HEAD)
    kwargs.update(overrides)
    return MSNLightningModule(**kwargs)


class FixedViews(Dataset):
    """Deterministic MSN views: 2 random views of 16 px and 2 focal views of 8 px."""

    def __init__(self, size: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.views = [
            torch.randn(size, 3, 16, 16, generator=generator) for _ in range(2)
        ] + [torch.randn(size, 3, 8, 8, generator=generator) for _ in range(2)]

    def __len__(self) -> int:
        return self.views[0].shape[0]

    def __getitem__(self, index: int) -> tuple[list[Tensor], int]:
        return [view[index] for view in self.views], 0


TINY_PRETRAIN: dict[str, Any] = dict(
    img_size=16,
    patch_size=4,
    focal_size=8,
    focal_views=2,
    batch_size=8,
    num_workers=0,
    accelerator="cpu",
    devices=1,
    progress=False,
    **TINY_HEAD,
)


class RandomImages(Dataset):
    """Random RGB PIL images with a ``transform`` attribute, as ImageFolder has."""

    def __init__(self, size: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, (size, 16, 16, 3), dtype=np.uint8)
        self.images = [Image.fromarray(p) for p in pixels]
        self.transform: Any = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), index % 2
