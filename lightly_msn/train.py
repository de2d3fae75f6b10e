"""MSN pretraining with PyTorch Lightning: the module, ``pretrain`` and the CLI.

The training recipe follows the official implementation of [0]: AdamW without
weight decay on biases, 1-D parameters and prototypes; gradient clipping at 3.0 on
the encoder; a learning rate with linear warm-up then cosine decay, a cosine weight
decay schedule (0.04 -> 0.4), a linear EMA momentum schedule (0.996 -> 1.0) and a
target sharpening temperature schedule, all stretched over 1.25x the training
steps as in the official code.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from lightly_msn.checkpoint import METADATA_KEY, export_backbone, vit_config
from lightly_msn.loss import MSNLoss, MSNLossOutput
from lightly_msn.model import MSN
from lightly_msn.schedules import MSNSchedules

logger = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"
PLOT_FILE = "training.png"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


class MSNLightningModule(LightningModule):
    """MSN pretraining [0] as a Lightning module.

    Builds an :class:`~lightly_msn.model.MSN` model and an
    :class:`~lightly_msn.loss.MSNLoss`, and trains them with the official recipe.
    Batches are ``(views, ...)`` with ``views = [target view, random anchor
    views..., focal views...]`` as produced by ``MSNTransform``.

    - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141

    Attributes:
        model:
            A timm ViT name or ``VisionTransformer`` instance (see ``MSN``).
        img_size:
            Passed to :class:`~lightly_msn.model.MSN`.
        patch_size:
            Passed to :class:`~lightly_msn.model.MSN`.
        mask_ratio:
            Passed to :class:`~lightly_msn.model.MSN`.
        focal_masking:
            Passed to :class:`~lightly_msn.model.MSN`.
        num_focal_masks:
            Passed to :class:`~lightly_msn.model.MSN`.
        hidden_dim:
            Passed to :class:`~lightly_msn.model.MSN`.
        output_dim:
            Passed to :class:`~lightly_msn.model.MSN`.
        num_prototypes:
            Passed to :class:`~lightly_msn.model.MSN`.
        num_random_views:
            Random views per image including the target view (the transform's
            ``random_views``); the remaining views are focal views.
        temperature:
            Temperature of the anchor predictions (0.1 in [0]).
        sinkhorn_iterations:
            Sinkhorn iterations on the targets (3 in the official code; 0 disables).
        me_max_weight:
            Weight of the mean-entropy maximisation regulariser.
        entropy_weight:
            Weight of the per-sample entropy term (official ``ent_weight``, 0).
        lr:
            Peak learning rate: linear warm-up from ``start_lr`` to ``lr`` over
            ``warmup_steps``, then cosine decay to ``final_lr``.
        start_lr:
            Learning rate at the start of the linear warm-up.
        final_lr:
            Learning rate at the end of the cosine decay.
        warmup_steps:
            Length of the linear learning-rate warm-up, in steps.
        weight_decay:
            Start of the cosine weight decay schedule.
        final_weight_decay:
            End of the cosine weight decay schedule.
        momentum:
            Start of the linear EMA momentum schedule of the target encoder.
        final_momentum:
            End of the linear EMA momentum schedule of the target encoder.
        sharpen_temperature:
            Start of the linear schedule of the target sharpening temperature.
        final_sharpen_temperature:
            End of the linear schedule of the target sharpening temperature.
        schedule_scale:
            The schedules run over ``schedule_scale * max_steps`` steps (1.25 in the
            official code, so training stops before their end values).
        clip_grad:
            Maximum gradient norm of the encoder and head (0 disables); the
            prototypes are not clipped, as in the official code.
        max_steps:
            Total optimizer steps; ``None`` takes the trainer's estimate.
        gather_distributed:
            Use the global batch for ME-MAX and Sinkhorn under DDP.
    """

    def __init__(
        self,
        model: str | VisionTransformer = "vit_small_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        mask_ratio: float | None = None,
        focal_masking: bool = False,
        num_focal_masks: int = 10,
        hidden_dim: int = 2048,
        output_dim: int = 256,
        num_prototypes: int = 1024,
        num_random_views: int = 2,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        me_max_weight: float = 1.0,
        entropy_weight: float = 0.0,
        lr: float = 1e-3,
        start_lr: float = 2e-4,
        final_lr: float = 1e-6,
        warmup_steps: int = 0,
        weight_decay: float = 0.04,
        final_weight_decay: float = 0.4,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        sharpen_temperature: float = 0.25,
        final_sharpen_temperature: float = 0.25,
        schedule_scale: float = 1.25,
        clip_grad: float = 3.0,
        max_steps: int | None = None,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if num_random_views < 1:
            raise ValueError(
                f"MSNLightningModule: num_random_views must be >= 1, got "
                f"{num_random_views}."
            )
        if schedule_scale < 1.0:
            raise ValueError(
                "MSNLightningModule: schedule_scale must be >= 1, got "
                f"{schedule_scale}."
            )
        if max_steps is not None and max_steps < 1:
            raise ValueError(
                f"MSNLightningModule: max_steps must be positive, got {max_steps}."
            )
        if clip_grad < 0:
            raise ValueError(
                f"MSNLightningModule: clip_grad must be >= 0, got {clip_grad}."
            )
        self.save_hyperparameters(ignore=["model"])
        self.model = MSN(
            model,
            img_size=img_size if isinstance(model, str) else None,
            patch_size=patch_size if isinstance(model, str) else None,
            mask_ratio=mask_ratio,
            focal_masking=focal_masking,
            num_focal_masks=num_focal_masks,
            hidden_dim=hidden_dim,
            output_dim=output_dim,
            num_prototypes=num_prototypes,
        )
        self.vit_config = vit_config(self.model.target_vit, self.model.model_name)
        self.criterion = MSNLoss(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=me_max_weight,
            entropy_weight=entropy_weight,
            gather_distributed=gather_distributed,
        )
        self._max_steps = max_steps
        self._schedules: MSNSchedules | None = None

    @property
    def _hp(self) -> Any:
        return self.hparams

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the schedules' horizon / 1.25)."""
        if self._max_steps is None:
            self._max_steps = max(1, int(self.trainer.estimated_stepping_batches))
        return self._max_steps

    @property
    def schedules(self) -> MSNSchedules:
        """The official lr / weight decay / momentum / sharpening schedules."""
        if self._schedules is None:
            hp = self._hp
            self._schedules = MSNSchedules.official(
                max_steps=self.total_steps,
                warmup_steps=min(
                    hp.warmup_steps, int(hp.schedule_scale * self.total_steps)
                ),
                lr=hp.lr,
                start_lr=hp.start_lr,
                final_lr=hp.final_lr,
                weight_decay=hp.weight_decay,
                final_weight_decay=hp.final_weight_decay,
                momentum=hp.momentum,
                final_momentum=hp.final_momentum,
                sharpen_temperature=hp.sharpen_temperature,
                final_sharpen_temperature=hp.final_sharpen_temperature,
                ipe_scale=hp.schedule_scale,
            )
        return self._schedules

    def schedule_values(self, step: int) -> dict[str, float]:
        """The learning rate, weight decay, momentum and sharpening at ``step``."""
        return self.schedules.values(step)

    def compute_loss(self, views: Sequence[Tensor], step: int) -> MSNLossOutput:
        """MSN loss and diagnostics of a batch of views; the loss is in float32.

        Under autocast (``bf16-mixed``) the encoders run in low precision, but the
        projections are cast to float32 and the loss runs with autocast disabled,
        as the official code does (``h.float(), z.float()``).
        """
        anchors, targets = self.model(views, num_random_views=self._hp.num_random_views)
        sharpen = self.schedule_values(step)["sharpen_temperature"]
        with torch.autocast(anchors.device.type, enabled=False):
            return self.criterion.compute(
                anchors.float(),
                targets.float(),
                self.model.prototypes.weight.float(),
                target_sharpen_temperature=sharpen,
            )

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        views = batch[0]
        output = self.compute_loss(views, self.global_step)
        batch_size = views[0].shape[0]
        values = self.schedule_values(self.global_step)
        self.log(
            "loss",
            output.loss.detach(),
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        self.log_dict(
            {
                "np": float(output.num_target_prototypes),
                "max_p": float(output.max_target_probability),
                "me_max_entropy": float(output.me_max_entropy),
            },
            prog_bar=True,
            batch_size=batch_size,
        )
        self.log_dict(
            {
                "lr": values["lr"],
                "weight_decay": values["weight_decay"],
                "momentum": values["momentum"],
                "sharpen_temperature": values["sharpen_temperature"],
                "min_p": float(output.min_target_probability),
            },
            batch_size=batch_size,
        )
        return output.loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        values = self.schedule_values(self.global_step)
        for optimizer in self.trainer.optimizers:
            apply_schedule(
                optimizer, lr=values["lr"], weight_decay=values["weight_decay"]
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step already counts this batch's optimizer step
        step = max(0, self.global_step - 1)
        self.model.update_target(self.schedule_values(step)["momentum"])

    def configure_optimizers(self) -> Optimizer:
        groups = self.model.parameter_groups()
        values = self.schedule_values(0) if self._max_steps else None
        # fused: one multi-tensor kernel per step (CPU and CUDA) instead of a loop
        optimizer = torch.optim.AdamW(groups, lr=self._hp.lr, fused=True)
        if values is not None:
            apply_schedule(
                optimizer, lr=values["lr"], weight_decay=values["weight_decay"]
            )
        return optimizer

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        self.clip_anchor_gradients()

    def clip_anchor_gradients(self) -> None:
        """Clips the encoder and head gradients (not prototypes) to ``clip_grad``."""
        if self._hp.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(
                list(self.model.anchor_parameters()), self._hp.clip_grad, foreach=True
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = self.vit_config
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])


def apply_schedule(optimizer: Optimizer, lr: float, weight_decay: float) -> None:
    """Sets the learning rate of every group and the weight decay of decayed groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay


def collect_rng_states() -> dict[str, Any]:
    """RNG states of torch, numpy and Python as tensors and plain containers.

    Only tensors and built-in types, so checkpoints load with
    ``torch.load(weights_only=True)``.
    """
    # the global numpy generator is what user code and augmentations draw from
    np_state: Any = np.random.get_state()  # noqa: NPY002
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Restores what :func:`collect_rng_states` saved."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    np.random.set_state(np_state)  # noqa: NPY002
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class PretrainResult:
    """What :func:`pretrain` produced.

    Attributes:
        module: The trained Lightning module (its ``model`` is the MSN model).
        output_dir: The run folder.
        checkpoint: Path of the last checkpoint (``checkpoints/last.ckpt``).
        backbone: Path of the exported target encoder (``backbone.safetensors``).
        metrics: Path of the CSV metrics.
        plot: Path of the loss / diagnostics plot (``None`` without metrics).
    """

    module: MSNLightningModule
    output_dir: Path
    checkpoint: Path
    backbone: Path
    metrics: Path
    plot: Path | None


def pretrain(
    data: str | Path | Dataset = "digits",
    data_dir: str | Path | None = None,
    model: str | VisionTransformer = "vit_tiny_patch16_224",
    img_size: int = 32,
    patch_size: int | None = 4,
    focal_size: int | None = None,
    random_views: int = 2,
    focal_views: int = 10,
    epochs: int = 10,
    batch_size: int = 64,
    warmup_epochs: float = 0.0,
    devices: int | str = "auto",
    num_nodes: int = 1,
    accelerator: str = "auto",
    precision: str = "32-true",
    num_workers: int = 2,
    output_dir: str | Path = "runs/msn",
    resume: str | Path | None = None,
    seed: int = 0,
    on_bad_image: str = "fail",
    transform: Any = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    **module_kwargs: Any,
) -> PretrainResult:
    """Pretrains a ViT with MSN and exports its target encoder.

    Writes to ``output_dir``: ``checkpoints/epoch=NNN.ckpt`` after every epoch and
    ``checkpoints/last.ckpt`` (Lightning writes each checkpoint to a temporary
    file and renames it, so a crash never corrupts the last good one),
    ``metrics.csv`` (and TensorBoard events when ``tensorboard`` is installed),
    ``training.png`` (loss and collapse diagnostics) and ``backbone.safetensors``.

    Args:
        data:
            An ImageFolder path, ``"cifar10"``, ``"digits"`` (see
            :func:`lightly_msn.data.build_dataset`) or a dataset instance whose
            items start with the image (``ImageFolder``, ``LightlyDataset``); its
            ``transform`` is replaced by the MSN transform.
        data_dir:
            Root for ``"cifar10"``.
        model:
            A timm ViT name or instance.
        img_size:
            Random view size.
        patch_size:
            ViT patch size (``patch_size=None`` keeps the model's).
        focal_size:
            Focal view size; default ``img_size // 2`` for images up to 64 px,
            else ``img_size * 3 // 7`` (96 for 224, as in [0]).
        random_views:
            Random views per image, including the target.
        focal_views:
            Focal views per image.
        epochs:
            Training length, in epochs.
        batch_size:
            Per-device batch size.
        warmup_epochs:
            Learning rate warm-up, in epochs (15 of 800 in [0]).
        devices:
            Passed to ``lightning.Trainer``.
        num_nodes:
            Passed to ``lightning.Trainer``.
        accelerator:
            Passed to ``lightning.Trainer``.
        precision:
            Passed to ``lightning.Trainer`` (``precision="bf16-mixed"`` for
            autocast; the loss stays float32).
        num_workers:
            Data loading processes per device.
        output_dir:
            Run folder.
        resume:
            A checkpoint to continue from exactly (step, schedules, EMA, optimizer
            and RNG states), or ``"last"`` for ``output_dir/checkpoints/last.ckpt``.
        seed:
            Seed of every random number generator (Python, NumPy, torch, loader
            workers), set before the model is built; a ViT instance passed as
            ``model`` was initialised earlier, so seed before creating it.
        on_bad_image:
            ``"fail"`` or ``"skip"`` unreadable image files.
        transform:
            Replaces the default ``MSNTransform`` (must return
            ``[random views..., focal views...]``).
        progress:
            Show the progress bar.
        callbacks:
            Extra Lightning callbacks.
        **module_kwargs:
            Further arguments of :class:`MSNLightningModule` (``lr``,
            ``mask_ratio``, ``num_prototypes``, ...).
    """
    from lightning import seed_everything

    from lightly_msn.data import build_dataset
    from lightly_msn.transforms import MSNTransform

    if epochs < 1:
        raise ValueError(f"pretrain: epochs must be >= 1, got {epochs}.")
    if batch_size < 2:
        raise ValueError(f"pretrain: batch_size must be >= 2, got {batch_size}.")
    output_dir = Path(output_dir)
    checkpoint_dir = output_dir / CHECKPOINT_DIR
    if resume == "last":
        resume = checkpoint_dir / LAST_CHECKPOINT
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(
            f"pretrain: checkpoint to resume from not found: {resume}"
        )
    seed_everything(seed, workers=True, verbose=False)

    if transform is None:
        focal_size = focal_size or (
            img_size // 2 if img_size <= 64 else img_size * 3 // 7
        )
        kwargs: dict[str, Any] = dict(random_size=img_size, focal_size=focal_size)
        if img_size <= 64:
            transform = MSNTransform.for_cifar10(random_views, focal_views, **kwargs)
        else:
            transform = MSNTransform(
                random_views=random_views, focal_views=focal_views, **kwargs
            )
    dataset = _dataset_with_transform(
        data, data_dir, transform, on_bad_image, img_size, build_dataset
    )
    if len(dataset) < batch_size:  # type: ignore[arg-type]
        raise ValueError(
            f"pretrain: the dataset has {len(dataset)} images, fewer than one batch "  # type: ignore[arg-type]
            f"of {batch_size}; lower --batch-size."
        )

    loggers: list[Logger] = [CSVLogger(output_dir, name="", version="")]
    if _tensorboard_available():
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(output_dir, name="", version="tensorboard"))
    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="{epoch:03d}",
        save_top_k=-1,
        every_n_epochs=1,
        save_last=True,
        save_on_train_epoch_end=True,
    )
    trainer = Trainer(
        max_epochs=epochs,
        devices=devices,
        num_nodes=num_nodes,
        accelerator=accelerator,
        precision=precision,  # type: ignore[arg-type]
        callbacks=[checkpointing, *callbacks],
        logger=loggers,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=output_dir,
        sync_batchnorm=False,
        use_distributed_sampler=True,
    )
    world_size = trainer.world_size
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    steps_per_epoch = len(dataset) // (batch_size * world_size)  # type: ignore[arg-type]
    if steps_per_epoch < 1:
        raise ValueError(
            f"pretrain: {len(dataset)} images are fewer than one global batch of "  # type: ignore[arg-type]
            f"{batch_size} x {world_size} devices; lower --batch-size."
        )
    total_steps = steps_per_epoch * epochs
    module = MSNLightningModule(
        model=model,
        img_size=img_size,
        patch_size=patch_size,
        num_random_views=random_views,
        max_steps=total_steps,
        warmup_steps=int(warmup_epochs * steps_per_epoch),
        gather_distributed=world_size > 1,
        **module_kwargs,
    )
    if world_size > 1 and trainer.strategy.root_device.type == "cuda":
        # heads' BatchNorm over the global batch; SyncBatchNorm has no CPU kernel
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    metrics_path = output_dir / "metrics.csv"
    # Lightning's CSV logger starts a new file; keep the rows before the resume
    earlier_rows = _read_rows(metrics_path) if resume is not None else []
    trainer.fit(module, loader, ckpt_path=str(resume) if resume is not None else None)

    backbone_path = output_dir / BACKBONE_FILE
    plot_path: Path | None = None
    if trainer.is_global_zero:
        _prepend_rows(metrics_path, earlier_rows)
        export_backbone(
            module.model.backbone_state_dict("target"), module.vit_config, backbone_path
        )
        plot_path = plot_metrics(metrics_path, output_dir / PLOT_FILE)
    return PretrainResult(
        module=module,
        output_dir=output_dir,
        checkpoint=checkpoint_dir / LAST_CHECKPOINT,
        backbone=backbone_path,
        metrics=metrics_path,
        plot=plot_path,
    )


def run_pretrain_cli(args: argparse.Namespace) -> int:
    """``lightly-msn pretrain``: runs :func:`pretrain` with the parsed arguments."""
    devices: int | str = (
        int(args.devices) if str(args.devices).isdigit() else args.devices
    )
    try:
        result = pretrain(
            data=args.data,
            data_dir=args.data_dir,
            model=args.model,
            img_size=args.img_size,
            patch_size=args.patch_size,
            focal_views=args.focal_views,
            epochs=args.epochs,
            batch_size=args.batch_size,
            warmup_epochs=args.warmup_epochs,
            devices=devices,
            num_nodes=args.num_nodes,
            accelerator=args.accelerator,
            precision=args.precision,
            num_workers=args.num_workers,
            output_dir=args.output_dir,
            resume=args.resume,
            seed=args.seed,
            on_bad_image=args.on_bad_image,
            lr=args.lr,
            mask_ratio=args.mask_ratio,
            num_prototypes=args.num_prototypes,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as error:
        print(f"lightly-msn pretrain: error: {error}")
        return 2
    print(f"checkpoint: {result.checkpoint}")
    print(f"backbone:   {result.backbone}")
    print(f"metrics:    {result.metrics}")
    if result.plot is not None:
        print(f"plot:       {result.plot}")
    return 0


def plot_metrics(metrics_path: Path, plot_path: Path) -> Path | None:
    """Plots loss and collapse diagnostics per step from Lightning's CSV metrics."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns: dict[str, list[tuple[int, float]]] = {}
    with metrics_path.open() as file:
        for row in csv.DictReader(file):
            for key in ("loss_step", "loss", "np", "max_p", "me_max_entropy", "lr"):
                if row.get(key) not in (None, ""):
                    columns.setdefault(key, []).append(
                        (int(row["step"]), float(row[key]))
                    )
    if "loss_step" in columns:
        columns["loss"] = columns.pop("loss_step")
    panels = [
        ("loss", "MSN loss"),
        ("np", "distinct target prototypes"),
        ("max_p", "mean max target probability"),
        ("me_max_entropy", "ME-MAX entropy (nats)"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for axis, (key, title) in zip(axes, panels, strict=True):
        points = columns.get(key, [])
        if points:
            axis.plot(*zip(*points, strict=True))
        axis.set_title(title)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
    return plot_path


def _dataset_with_transform(
    data: str | Path | Dataset,
    data_dir: str | Path | None,
    transform: Any,
    on_bad_image: str,
    img_size: int,
    build_dataset: Any,
) -> Dataset:
    if not isinstance(data, (str, Path)):
        if not hasattr(data, "transform"):
            raise ValueError(
                "pretrain: a dataset instance needs a 'transform' attribute (as "
                "ImageFolder and LightlyDataset have) for the MSN views."
            )
        data.transform = transform
        return data
    min_size = None if data == "digits" else img_size
    dataset: Dataset = build_dataset(
        str(data),
        split="train",
        data_dir=data_dir,
        transform=transform,
        on_bad_image=on_bad_image,
        img_size=img_size,
        min_size=min_size,
    )
    return dataset


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as file:
        return list(csv.DictReader(file))


def _prepend_rows(path: Path, earlier_rows: list[dict[str, str]]) -> None:
    """Puts the rows of steps before the first step in ``path`` in front of it."""
    rows = _read_rows(path)
    first_step = min((int(row["step"]) for row in rows), default=None)
    if first_step is None:
        return
    earlier = [row for row in earlier_rows if int(row["step"]) < first_step]
    if not earlier:
        return
    fields = list(dict.fromkeys([*rows[0].keys(), *earlier[0].keys()]))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows([*earlier, *rows])


def _tensorboard_available() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )
