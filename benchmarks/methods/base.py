"""What every benchmarked method shares: the run configuration, the ViT, the optimizer.

A method is one module in ``benchmarks/methods/`` defining a subclass of
:class:`BenchmarkMethod`, a ``LightningModule`` with three extra members:

- ``from_config(config)``: builds the method for a :class:`BenchmarkConfig`;
- ``make_transform(config)``: the multi-view augmentation producing its batches;
- ``backbone_features(images)``: the frozen representation that is evaluated
  (the class token of the teacher / target / only encoder).

Everything that must be held constant across methods (backbone architecture, image
size, epochs, batch size, optimizer family, warm-up) comes from the config; what is
part of a method's recipe (learning rate per 256 images, weight decay, heads,
temperatures, views) is set in its module, following lightly's benchmarks and the
methods' papers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from lightning import LightningModule
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.optim import Optimizer

from lightly_msn.data import CIFAR10_NORMALIZE, IMAGENET_NORMALIZE
from lightly_msn.data import eval_transform as data_eval_transform


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run holds constant across methods.

    Attributes:
        preset: ``"cifar10"`` (32 px, patch 4) or ``"imagefolder"`` (224 px,
            patch 16); sets the defaults of the image and view sizes.
        data: ``"cifar10"``, ``"digits"`` or an ImageFolder path with ``train/``
            and ``test/`` sub-folders (see ``lightly_msn.data.build_dataset``).
        data_dir: Local root for ``data="cifar10"``.
        img_size, patch_size: Size of the global / random views and ViT patches.
        local_size: Size of the local / focal views (multi-crop methods).
        num_local_views: Number of local / focal views per image.
        embed_dim, depth, num_heads: The ViT, identical for all methods.
        epochs, batch_size: Per-device batch size; the global batch is
            ``batch_size * devices * num_nodes``.
        warmup_epochs: Linear learning-rate warm-up before the cosine decay.
        train_subset: Images used for pretraining (balanced per class; ``None``:
            all).
        bank_subset: Labelled images embedded for kNN, few-shot and retrieval
            (``None``: the whole train split).
        test_subset: Test images evaluated (``None``: the whole test split).
        monitor_bank, monitor_test: Sizes of the small kNN evaluation run after
            every epoch (0 disables it).
        knn_ks: Neighbour counts of the final kNN evaluation.
        fewshot: Labelled images per class (``"1"``) or percent of the bank
            (``"1%"``) of the few-shot evaluation.
        fewshot_seeds: Number of few-shot splits per setting.
        gaussian_blur: Blur probability of the augmentations (0 for 32 px).
        normalize: Mean and std of the input normalisation.
        precision, accelerator, devices, num_nodes, strategy: Lightning Trainer
            settings (``bf16-mixed`` on GPUs; DDP over ``devices`` x ``num_nodes``).
        num_workers: Data loader workers per device.
        seed: Seed of the subsets, the initialisation and the augmentations.
        method_overrides: Per-method keyword overrides of recipe values, e.g.
            ``{"msn": {"lr_per_256": 5e-4}}``.
    """

    preset: str = "cifar10"
    data: str = "cifar10"
    data_dir: str | None = ".data/cifar10"
    img_size: int = 32
    patch_size: int = 4
    local_size: int = 16
    num_local_views: int = 4
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    epochs: int = 10
    batch_size: int = 128
    warmup_epochs: int = 1
    train_subset: int | None = 5000
    bank_subset: int | None = 10000
    test_subset: int | None = 2000
    monitor_bank: int = 1000
    monitor_test: int = 1000
    knn_ks: tuple[int, ...] = (20, 200)
    fewshot: tuple[str, ...] = ("1", "2", "5", "1%")
    fewshot_seeds: int = 3
    gaussian_blur: float = 0.0
    normalize: dict[str, list[float]] = field(
        default_factory=lambda: dict(CIFAR10_NORMALIZE)
    )
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 2
    seed: int = 0
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"BenchmarkConfig: unknown preset {self.preset!r}; choose one of "
                f"{sorted(PRESETS)}."
            )
        for name in ("img_size", "local_size"):
            size = getattr(self, name)
            if size % self.patch_size:
                raise ValueError(
                    f"BenchmarkConfig: {name}={size} is not a multiple of "
                    f"patch_size={self.patch_size}."
                )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"BenchmarkConfig: embed_dim={self.embed_dim} is not divisible by "
                f"num_heads={self.num_heads}."
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"BenchmarkConfig: epochs ({self.epochs}) and batch_size "
                f"({self.batch_size}) must be positive."
            )
        self.knn_ks = tuple(int(k) for k in self.knn_ks)
        self.fewshot = tuple(str(setting) for setting in self.fewshot)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchmarkConfig:
        """Builds a config from a preset's defaults updated with ``values``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"BenchmarkConfig: unknown keys {unknown}; valid keys are "
                f"{sorted(known)}."
            )
        preset = values.get("preset", "cifar10")
        if preset not in PRESETS:
            raise ValueError(
                f"BenchmarkConfig: unknown preset {preset!r}; choose one of "
                f"{sorted(PRESETS)}."
            )
        return cls(**{**PRESETS[preset], **values})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def recipe(self, method: str, defaults: dict[str, Any]) -> dict[str, Any]:
        """A method's recipe values: ``defaults`` updated by ``method_overrides``."""
        overrides = self.method_overrides.get(method, {})
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(
                f"method_overrides[{method!r}] has unknown keys {unknown}; valid keys "
                f"are {sorted(defaults)}."
            )
        return {**defaults, **overrides}

    @property
    def global_batch_size(self) -> int:
        devices = self.devices if isinstance(self.devices, int) else 1
        return self.batch_size * devices * self.num_nodes


# Defaults per data preset; a profile or the command line overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        preset="cifar10",
        img_size=32,
        patch_size=4,
        local_size=16,
        gaussian_blur=0.0,
        normalize=dict(CIFAR10_NORMALIZE),
    ),
    "imagefolder": dict(
        preset="imagefolder",
        img_size=224,
        patch_size=16,
        local_size=96,
        embed_dim=384,
        depth=12,
        num_heads=6,
        num_local_views=10,
        gaussian_blur=0.5,
        normalize=dict(IMAGENET_NORMALIZE),
    ),
}


def make_vit(config: BenchmarkConfig, **kwargs: Any) -> VisionTransformer:
    """The ViT shared by all methods: timm's, without classifier, any image size.

    ``dynamic_img_size`` lets local / focal views of another resolution pass through
    the same trunk (the position embedding is resampled to their grid).

    Every method starts from the same initialisation, lightly's: its ViT wrapper
    (``MaskedVisionTransformerTIMM``, which all lightly-based methods put around this
    ViT) re-initialises it MAE-style, with a fixed 2-D sin-cos position embedding.
    ``msn`` and ``pmsn`` would otherwise keep timm's initialisation and a learnable
    position embedding, and in a short run the comparison would measure the
    initialisation rather than the method.
    """
    vit = VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        num_classes=0,
        dynamic_img_size=True,
        **kwargs,
    )
    MaskedVisionTransformerTIMM(vit=vit)  # initialises ``vit`` in place
    return vit


def eval_transform(config: BenchmarkConfig) -> Callable[[Any], Tensor]:
    """Deterministic evaluation transform: resize, centre crop, normalise."""
    resize = config.img_size if config.img_size <= 64 else config.img_size * 256 // 224
    return data_eval_transform(config.img_size, config.normalize, resize=resize)


class BenchmarkMethod(LightningModule):
    """Common base of the benchmarked self-supervised methods.

    Subclasses set ``name``, build their modules in ``__init__(config)``, and
    implement ``training_step``, ``backbone_features``, ``make_transform`` and
    ``trainable_modules``. The default optimizer is AdamW with the learning rate
    ``lr_per_256 * global_batch_size / 256``, linear warm-up and cosine decay per
    step, and no weight decay on biases and normalisation parameters (lightly's
    ``get_weight_decay_parameters``), as in lightly's ViT benchmarks.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__()
        self.config = config
        self.recipe = config.recipe(self.name, self.defaults)

    @classmethod
    def from_config(
        cls, config: BenchmarkConfig, steps_per_epoch: int = 1
    ) -> BenchmarkMethod:
        """Builds the method; ``steps_per_epoch`` sizes step-based schedules."""
        return cls(config)

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        raise NotImplementedError

    def backbone_features(self, images: Tensor) -> Tensor:
        """The class token ``(B, embed_dim)`` evaluated by kNN and few-shot."""
        raise NotImplementedError

    def trainable_modules(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        scale = self.config.global_batch_size / 256
        return float(self.recipe["lr_per_256"]) * scale

    def momentum(self, start: float = 0.996) -> float:
        """Teacher EMA momentum, cosine from ``start`` to 1 over training."""
        return cosine_schedule(
            step=self.trainer.global_step,
            max_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            start_value=start,
            end_value=1.0,
        )

    def configure_optimizers(self) -> Any:
        decay, no_decay = get_weight_decay_parameters(self.trainable_modules())
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.recipe["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
            betas=tuple(self.recipe.get("betas", (0.9, 0.999))),
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        scheduler = CosineWarmupScheduler(
            optimizer=optimizer,
            warmup_epochs=int(steps_per_epoch * self.config.warmup_epochs),
            max_epochs=total_steps,
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def log_loss(self, loss: Tensor, batch_size: int, **extra: Tensor) -> None:
        values = {"loss": loss.detach(), **{k: v.detach() for k, v in extra.items()}}
        self.log_dict(values, prog_bar=True, batch_size=batch_size, sync_dist=True)


def set_weight_decay(optimizer: Optimizer, weight_decay: float) -> None:
    """Sets the weight decay of the parameter groups that have one (a schedule)."""
    for group in optimizer.param_groups:
        if group["weight_decay"] != 0.0:
            group["weight_decay"] = weight_decay


def views_of(batch: Any) -> list[Tensor]:
    """The list of views of a ``(views, labels)`` batch."""
    views = batch[0]
    return list(views) if isinstance(views, (list, tuple)) else [views]
