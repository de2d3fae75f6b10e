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

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from pytorch_lightning import LightningModule, Trainer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightly_msn.data import MSNDataModule, default_focal_size, normalization
from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.schedules import weight_decay_groups

SECTIONS = ("seed_everything", "trainer", "data", "vit", "benchmark", "methods")


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run holds constant across methods.

    A profile (``benchmarks/configs/<name>.yaml``) has the sections of ``lightly-msn
    pretrain``'s configuration, ``trainer`` (``pytorch_lightning.Trainer``
    arguments) and ``data`` (:class:`~lightly_msn.data.MSNDataModule` arguments:
    the dataset, view sizes, batch size, loader, training subset), plus:

    - ``vit``: the ViT every method trains (``patch_size``, ``embed_dim``,
      ``depth``, ``num_heads`` of timm's ``VisionTransformer``);
    - ``benchmark``: the evaluation and what else the harness holds constant
      (the fields below);
    - ``methods``: per-method overrides of recipe values, e.g.
      ``{"msn": {"lr_per_256": 5e-4}}``.

    Attributes:
        trainer: ``Trainer`` arguments (``max_epochs``, ``precision``,
            ``accelerator``, ``devices``, ``num_nodes``, ``strategy``).
        data: ``MSNDataModule`` arguments; ``focal_size`` and ``focal_views`` are
            the local / focal views of every multi-crop method.
        vit: ``VisionTransformer`` arguments of the shared ViT.
        seed: Seed of the subsets, the initialisation and the augmentations.
        warmup_epochs: Linear learning-rate warm-up before the cosine decay.
        bank_subset: Labelled images embedded for kNN, few-shot and retrieval
            (``None``: the whole train split).
        test_subset: Test images evaluated (``None``: the whole test split).
        monitor_bank, monitor_test: Sizes of the small kNN evaluation run after
            every epoch (0 disables it).
        knn_ks: Neighbour counts of the final kNN evaluation.
        fewshot: Labelled images per class (``"1"``) or percent of the bank
            (``"1%"``) of the few-shot evaluation.
        fewshot_seeds: Number of few-shot splits per setting.
        stages: Fractions of the budget (e.g. ``[0.25, 0.5]``) at which kNN
            (k = 20) and few-shot (``stage_shots`` per class) accuracy are measured
            on the full bank and test set, besides the initialisation and the end;
            ``None`` measures kNN on the monitor sets after every epoch instead.
        stage_shots: Labelled images per class of the few-shot accuracy of the
            stages (the final evaluation must include this setting and k = 20).
        methods: Per-method keyword overrides of recipe values.
    """

    trainer: dict[str, Any]
    data: dict[str, Any]
    vit: dict[str, Any]
    seed: int = 0
    warmup_epochs: float = 1
    bank_subset: int | None = 10000
    test_subset: int | None = 2000
    monitor_bank: int = 1000
    monitor_test: int = 1000
    knn_ks: tuple[int, ...] = (20, 200)
    fewshot: tuple[str, ...] = ("1", "2", "5", "1%")
    fewshot_seeds: int = 3
    stages: tuple[float, ...] | None = None
    stage_shots: int = 5
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_keys("trainer", self.trainer, inspect.signature(Trainer).parameters)
        _check_keys("data", self.data, inspect.signature(MSNDataModule).parameters)
        _check_keys("vit", self.vit, inspect.signature(VisionTransformer).parameters)
        for key in ("max_epochs",):
            if key not in self.trainer:
                raise ValueError(f"BenchmarkConfig: trainer.{key} is required.")
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if key not in self.vit:
                raise ValueError(f"BenchmarkConfig: vit.{key} is required.")
        # the data module checks the data arguments (no image is read)
        MSNDataModule(**{**self.data, "dataset": "digits"})
        for name, size in (
            ("img_size", self.img_size),
            ("focal_size", self.local_size),
        ):
            if size % self.patch_size:
                raise ValueError(
                    f"BenchmarkConfig: data.{name}={size} is not a multiple of "
                    f"vit.patch_size={self.patch_size}."
                )
        if self.embed_dim % self.vit["num_heads"]:
            raise ValueError(
                f"BenchmarkConfig: vit.embed_dim={self.embed_dim} is not divisible "
                f"by vit.num_heads={self.vit['num_heads']}."
            )
        if self.epochs < 1:
            raise ValueError(
                f"BenchmarkConfig: trainer.max_epochs must be >= 1, got {self.epochs}."
            )
        self.knn_ks = tuple(int(k) for k in self.knn_ks)
        self.fewshot = tuple(str(setting) for setting in self.fewshot)
        if self.stages is not None:
            self.stages = tuple(float(f) for f in self.stages)
            if not all(0 < f < 1 for f in self.stages):
                raise ValueError(
                    f"BenchmarkConfig: stages must lie in (0, 1), got {self.stages}."
                )
            if 20 not in self.knn_ks or str(self.stage_shots) not in self.fewshot:
                raise ValueError(
                    "BenchmarkConfig: with stages the final evaluation needs k=20 in "
                    f"knn_ks and '{self.stage_shots}' in fewshot."
                )

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> BenchmarkConfig:
        """Builds a config from a profile's sections (see the class docstring)."""
        unknown = sorted(set(profile) - set(SECTIONS))
        if unknown:
            raise ValueError(
                f"BenchmarkConfig: unknown sections {unknown}; a profile has "
                f"{list(SECTIONS)}."
            )
        benchmark = dict(profile.get("benchmark") or {})
        known = {f.name for f in fields(cls)} - {"trainer", "data", "vit", "seed"}
        _check_keys("benchmark", benchmark, known)
        return cls(
            trainer=dict(profile.get("trainer") or {}),
            data=dict(profile.get("data") or {}),
            vit=dict(profile.get("vit") or {}),
            seed=int(profile.get("seed_everything", 0)),
            methods=dict(profile.get("methods") or {}),
            **{k: v for k, v in benchmark.items() if k != "methods"},
        )

    def to_dict(self) -> dict[str, Any]:
        """The profile sections of this config (what ``from_profile`` reads)."""
        benchmark = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("trainer", "data", "vit", "seed", "methods")
        }
        return {
            "seed_everything": self.seed,
            "trainer": dict(self.trainer),
            "data": dict(self.data),
            "vit": dict(self.vit),
            "benchmark": benchmark,
            "methods": dict(self.methods),
        }

    def recipe(self, method: str, defaults: dict[str, Any]) -> dict[str, Any]:
        """A method's recipe values: ``defaults`` updated by ``methods[method]``."""
        overrides = self.methods.get(method, {})
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(
                f"methods.{method} has unknown keys {unknown}; valid keys are "
                f"{sorted(defaults)}."
            )
        return {**defaults, **overrides}

    @property
    def augment(self) -> str:
        """Where every method's views are made: ``"device"`` or ``"loader"``.

        ``data.augment`` of the profile; ``"auto"`` (the default) is ``"device"``, as
        for ``MSNDataModule`` without a per-image transform.
        """
        augment = self.data.get("augment", "auto")
        return "device" if augment == "auto" else str(augment)

    def datamodule(self, method: Any) -> MSNDataModule:
        """The training data of every method, with the method's multi-view transform.

        ``method`` (a method class) gives its ``DeviceMultiViewTransform`` preset
        (``make_device_transform``) when ``augment`` is ``"device"``, else lightly's
        per-image transform (``make_transform``).
        """
        if self.augment == "device":
            transform = method.make_device_transform(self)
        else:
            transform = method.make_transform(self)
        return MSNDataModule(
            **{**self.data, "subset_seed": self.seed, "transform": transform}
        )

    # what the methods read, from the sections
    @property
    def img_size(self) -> int:
        return int(self.data.get("img_size", 32))

    @property
    def local_size(self) -> int:
        return int(self.data.get("focal_size") or default_focal_size(self.img_size))

    @property
    def num_local_views(self) -> int:
        return int(self.data.get("focal_views", 10))

    @property
    def normalize(self) -> dict[str, list[float]]:
        return normalization(self.data.get("normalize"), self.img_size)

    @property
    def gaussian_blur(self) -> float:
        blur = self.data.get("gaussian_blur")
        return (0.0 if self.img_size <= 64 else 0.5) if blur is None else float(blur)

    @property
    def batch_size(self) -> int:
        return int(self.data.get("batch_size", 64))

    @property
    def epochs(self) -> int:
        return int(self.trainer["max_epochs"])

    @property
    def patch_size(self) -> int:
        return int(self.vit["patch_size"])

    @property
    def embed_dim(self) -> int:
        return int(self.vit["embed_dim"])

    @property
    def global_batch_size(self) -> int:
        devices = self.trainer.get("devices", 1)
        devices = devices if isinstance(devices, int) else 1
        return self.batch_size * devices * int(self.trainer.get("num_nodes", 1))


def _check_keys(section: str, values: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"BenchmarkConfig: unknown keys in {section}: {unknown}; valid keys are "
            f"{sorted(set(known) - {'self', 'args', 'kwargs'})}."
        )


def make_masked_vit(
    config: BenchmarkConfig, **kwargs: Any
) -> MaskedVisionTransformerTIMM:
    """The ViT shared by all methods, in lightly's wrapper: the same weights for all.

    timm's ViT without classifier, for any image size: ``dynamic_img_size`` lets
    local / focal views of another resolution pass through the same trunk (the
    position embedding is resampled to their grid). Lightly's wrapper initialises it
    MAE-style, with a fixed 2-D sin-cos position embedding.

    The weights are drawn from their own generator seeded with ``config.seed``, so
    every method starts from the same network whatever it builds before or after (its
    heads, prototypes): the "at init" accuracies agree and the gains compare.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vit = VisionTransformer(
            img_size=config.img_size,
            num_classes=0,
            dynamic_img_size=True,
            **{**config.vit, **kwargs},
        )
        return MaskedVisionTransformerTIMM(vit=vit)


def make_vit(config: BenchmarkConfig, **kwargs: Any) -> VisionTransformer:
    """The trunk of :func:`make_masked_vit`, for methods that mask on their own.

    ``msn`` and ``pmsn`` take it: they would otherwise keep timm's initialisation and
    a learnable position embedding, and a short run would compare initialisations
    rather than methods.
    """
    return make_masked_vit(config, **kwargs).vit


class BenchmarkMethod(LightningModule):
    """Common base of the benchmarked self-supervised methods.

    Subclasses set ``name``, build their modules in ``__init__(config)``, and
    implement ``training_step``, ``backbone_features``, ``make_transform``,
    ``make_device_transform`` and ``trainable_modules``. The default optimizer is
    AdamW with the learning rate ``lr_per_256 * global_batch_size / 256``, linear
    warm-up and cosine decay per step, and no weight decay on biases and 1-D
    (normalisation) parameters (the package's
    :func:`~lightly_msn.schedules.weight_decay_groups`, as for ``msn``).
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__()
        self.config = config
        self.recipe = config.recipe(self.name, self.defaults)

    @classmethod
    def from_config(cls, config: BenchmarkConfig) -> BenchmarkMethod:
        """Builds the method for ``config``."""
        return cls(config)

    @classmethod
    def make_transform(cls, config: BenchmarkConfig) -> Callable[[Any], Any]:
        """lightly's per-image multi-view transform of the method."""
        raise NotImplementedError

    @classmethod
    def make_device_transform(cls, config: BenchmarkConfig) -> DeviceMultiViewTransform:
        """The same views as ``make_transform``, for whole batches on the device."""
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

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (at least 1), for the per-step schedules."""
        return max(1, int(self.trainer.estimated_stepping_batches))

    def momentum(self, start: float = 0.996) -> float:
        """Teacher EMA momentum, cosine from ``start`` to 1 over training."""
        return cosine_schedule(
            step=self.trainer.global_step,
            max_steps=self.total_steps,
            start_value=start,
            end_value=1.0,
        )

    def configure_optimizers(self) -> Any:
        decay, no_decay, _ = weight_decay_groups(self.trainable_modules())
        decay["weight_decay"] = self.recipe["weight_decay"]
        optimizer = torch.optim.AdamW(
            [decay, no_decay],
            lr=self.lr,
            betas=tuple(self.recipe.get("betas", (0.9, 0.999))),
        )
        total_steps = self.total_steps
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


def views_of(batch: Any) -> list[Tensor]:
    """The list of views of a ``(views, labels)`` batch."""
    views = batch[0]
    return list(views) if isinstance(views, (list, tuple)) else [views]
