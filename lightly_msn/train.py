"""MSN pretraining with PyTorch Lightning: the module, run directories, ``pretrain``.

The training recipe follows the official implementation of [0]: AdamW without
weight decay on biases, 1-D parameters and prototypes; gradient clipping at 3.0 on
the encoder; a learning rate with linear warm-up then cosine decay, a cosine weight
decay schedule (0.04 -> 0.4), a linear EMA momentum schedule (0.996 -> 1.0) and a
target sharpening temperature schedule, all stretched over 1.25x the training
steps as in the official code.

:class:`MSNLightningModule` is a ``pytorch_lightning.LightningModule`` (the
distribution lightly itself depends on), so a lightly user's ``pl.Trainer`` trains
it. :func:`run_trainer_arguments` adds what a pretraining run directory needs to any
``Trainer``: atomic checkpoints, CSV metrics, the device-dependent choices that are
the same for every method (SyncBatchNorm on GPUs, the attention kernel on CPUs), and
a report of unreadable images. :func:`pretrain` (Python) and ``lightly-msn
pretrain`` (``LightningCLI``) both train through :func:`fit_and_export`, and the
benchmarks through :func:`run_trainer_arguments` too.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import math
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import Dataset

from lightly_msn.checkpoint import METADATA_KEY, export_backbone, vit_config
from lightly_msn.data import MSNDataModule
from lightly_msn.files import atomic_path, atomic_write_text
from lightly_msn.loss import MSNLoss, MSNLossOutput
from lightly_msn.model import MSN
from lightly_msn.schedules import MSNSchedules, apply_schedule

logger = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"
PLOT_FILE = "training.png"
METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_SETTINGS_KEY = "lightly_msn_run"


class MSNLightningModule(LightningModule):
    """MSN pretraining [0] as a Lightning module.

    Builds an :class:`~lightly_msn.model.MSN` model and an
    :class:`~lightly_msn.loss.MSNLoss`, and trains them with the official recipe.
    Batches are ``(views, ...)`` with ``views = [target view, random anchor
    views..., focal views...]`` as produced by ``MSNTransform``
    (:class:`~lightly_msn.data.MSNDataModule` serves them). Every argument is
    checked when the module is created.

    - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141

    Args:
        vit:
            A timm ViT name (created with ``num_classes=0``) or a
            ``VisionTransformer`` created with ``dynamic_img_size=True``.
        img_size:
            Random view size the ViT is created for (a name only).
        patch_size:
            Patch size of the ViT (a name only; ``None`` keeps the name's).
        vit_kwargs:
            Further ``timm.create_model`` arguments (a name only), e.g.
            ``{"embed_dim": 192, "depth": 4, "num_heads": 3, "drop_path_rate": 0.1}``.
        mask_ratio:
            Fraction of patches dropped from the random anchor views; ``None``: the
            paper's ratio for the model (0.15 for ViT-S/16).
        focal_masking:
            Make the focal anchors by token-level focal masking of the random
            anchor view instead of focal crops.
        num_focal_masks:
            Focal masks per image with ``focal_masking``.
        hidden_dim:
            Hidden dimension of the projection head (2048 in [0]).
        output_dim:
            Output dimension of the projection head and the prototypes (256).
        num_prototypes:
            Number of learnable prototypes (1024 in [0]); at least 2.
        num_random_views:
            Random views per image including the target view (the transform's
            ``random_views``); the remaining views are focal views.
        temperature:
            Temperature of the anchor predictions (0.1 in [0]).
        sinkhorn_iterations:
            Sinkhorn iterations on the targets (3 in the official code; 0 disables).
        me_max_weight:
            Weight of the mean-entropy maximisation regulariser (1.0).
        entropy_weight:
            Weight of the per-sample entropy term (official ``ent_weight``, 0).
        lr:
            Peak learning rate: linear warm-up from ``start_lr`` to ``lr`` over
            ``warmup_epochs``, then cosine decay to ``final_lr``.
        start_lr:
            Learning rate at the start of the linear warm-up.
        final_lr:
            Learning rate at the end of the cosine decay.
        warmup_epochs:
            Length of the linear learning-rate warm-up in epochs (15 of 800 in [0]);
            fractions are allowed.
        weight_decay:
            Start of the cosine weight decay schedule (0.04).
        final_weight_decay:
            End of the cosine weight decay schedule (0.4).
        momentum:
            Start of the linear EMA momentum schedule of the target encoder (0.996).
        final_momentum:
            End of the linear EMA momentum schedule (1.0).
        sharpen_temperature:
            Start of the linear schedule of the target sharpening temperature (0.25).
        final_sharpen_temperature:
            End of the linear schedule of the target sharpening temperature (0.25).
        schedule_scale:
            The schedules run over ``schedule_scale * max_steps`` steps (1.25 in the
            official code, so training stops before their end values).
        clip_grad:
            Maximum gradient norm of the encoder and head (0 disables); the
            prototypes are not clipped, as in the official code.
        max_steps:
            Total optimizer steps of the schedules; ``None`` takes the trainer's
            (its epochs times the batches per epoch).
        gather_distributed:
            Use the global batch for ME-MAX and Sinkhorn under DDP; ``None``:
            whenever the trainer runs more than one process.
        fast_class_token:
            Compute the last block for the class token only (the result is the
            same; see :class:`~lightly_msn.model.MSN`).
    """

    def __init__(
        self,
        vit: str | VisionTransformer = "vit_small_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        vit_kwargs: dict[str, Any] | None = None,
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
        warmup_epochs: float = 0.0,
        weight_decay: float = 0.04,
        final_weight_decay: float = 0.4,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        sharpen_temperature: float = 0.25,
        final_sharpen_temperature: float = 0.25,
        schedule_scale: float = 1.25,
        clip_grad: float = 3.0,
        max_steps: int | None = None,
        gather_distributed: bool | None = None,
        fast_class_token: bool = True,
    ) -> None:
        super().__init__()
        _check_module_arguments(locals())
        self.save_hyperparameters(ignore=["vit"])
        # a ViT instance is not a hyper-parameter; its name and shape are
        self.hparams["vit"] = vit if isinstance(vit, str) else None
        by_name = isinstance(vit, str)
        self.model = MSN(
            vit,
            img_size=img_size if by_name else None,
            patch_size=patch_size if by_name else None,
            mask_ratio=mask_ratio,
            focal_masking=focal_masking,
            num_focal_masks=num_focal_masks,
            hidden_dim=hidden_dim,
            output_dim=output_dim,
            num_prototypes=num_prototypes,
            fast_class_token=fast_class_token,
            **(vit_kwargs or {}) if by_name else {},
        )
        self.vit_config = vit_config(self.model.target_vit, self.model.model_name)
        self.criterion = MSNLoss(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=me_max_weight,
            entropy_weight=entropy_weight,
            gather_distributed=bool(gather_distributed),
        )
        self._max_steps = max_steps
        self._schedules: MSNSchedules | None = None
        self._loaded_run_settings: dict[str, Any] | None = None

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
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per epoch, when a trainer with sized data is attached."""
        trainer = self._trainer
        if trainer is None:
            return None
        trainer.fit_loop.setup_data()  # as estimated_stepping_batches does
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return None
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    @property
    def schedules(self) -> MSNSchedules:
        """The official lr / weight decay / momentum / sharpening schedules."""
        if self._schedules is None:
            hp = self._hp
            warmup_steps = 0
            if hp.warmup_epochs > 0:
                per_epoch = self.steps_per_epoch
                if per_epoch is None:
                    raise ValueError(
                        "MSNLightningModule: warmup_epochs needs a trainer and "
                        "training data of known length to size an epoch."
                    )
                warmup_steps = round(hp.warmup_epochs * per_epoch)
            self._schedules = MSNSchedules.official(
                max_steps=self.total_steps,
                warmup_steps=min(
                    warmup_steps, int(hp.schedule_scale * self.total_steps)
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

    def setup(self, stage: str) -> None:
        if self._hp.gather_distributed is None:
            self.criterion.gather_distributed = self.trainer.world_size > 1

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
        # fused: one multi-tensor kernel per step (CPU and CUDA) instead of a loop
        optimizer = torch.optim.AdamW(
            self.model.parameter_groups(), lr=self._hp.lr, fused=True
        )
        values = self.schedule_values(0)
        apply_schedule(optimizer, lr=values["lr"], weight_decay=values["weight_decay"])
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

    def run_settings(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one to continue it exactly."""
        trainer = self._trainer
        return {
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            **(trainer_settings(trainer) if trainer is not None else {}),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = self.vit_config
        checkpoint[RUN_SETTINGS_KEY] = self.run_settings()
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._loaded_run_settings = checkpoint.get(RUN_SETTINGS_KEY)
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    def on_train_start(self) -> None:
        if self._loaded_run_settings is not None:
            differences = describe_differences(
                self._loaded_run_settings, self.run_settings()
            )
            if differences:
                raise ValueError(
                    "the checkpoint was trained with another schedule; resuming would "
                    "change the run:\n" + "\n".join(differences)
                )


def trainer_settings(trainer: Trainer) -> dict[str, Any]:
    """The trainer settings that shape the schedules (stored in checkpoints)."""
    return {
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "world_size": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
    }


def _check_module_arguments(arguments: dict[str, Any]) -> None:
    """Raises ``ValueError`` for out-of-range ``MSNLightningModule`` arguments."""
    name = "MSNLightningModule"
    finite = {k: v for k, v in arguments.items() if isinstance(v, float)}
    for key, value in finite.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}: {key} must be finite, got {value}.")
    positive = ("lr", "temperature", "sharpen_temperature", "final_sharpen_temperature")
    for key in positive:
        if not arguments[key] > 0:
            raise ValueError(f"{name}: {key} must be > 0, got {arguments[key]}.")
    non_negative = (
        "start_lr",
        "final_lr",
        "warmup_epochs",
        "weight_decay",
        "final_weight_decay",
        "me_max_weight",
        "entropy_weight",
        "clip_grad",
    )
    for key in non_negative:
        if arguments[key] < 0:
            raise ValueError(f"{name}: {key} must be >= 0, got {arguments[key]}.")
    for key in ("momentum", "final_momentum"):
        if not 0.0 <= arguments[key] <= 1.0:
            raise ValueError(f"{name}: {key} must be in [0, 1], got {arguments[key]}.")
    if arguments["num_prototypes"] < 2:
        raise ValueError(
            f"{name}: num_prototypes must be >= 2 (with one prototype every target "
            f"is the same and there is nothing to learn), got "
            f"{arguments['num_prototypes']}."
        )
    if arguments["num_random_views"] < 1:
        raise ValueError(
            f"{name}: num_random_views must be >= 1, got "
            f"{arguments['num_random_views']}."
        )
    if arguments["schedule_scale"] < 1.0:
        raise ValueError(
            f"{name}: schedule_scale must be >= 1, got {arguments['schedule_scale']}."
        )
    if arguments["max_steps"] is not None and arguments["max_steps"] < 1:
        raise ValueError(
            f"{name}: max_steps must be positive, got {arguments['max_steps']}."
        )
    if not isinstance(arguments["vit"], str) and arguments["vit_kwargs"]:
        raise ValueError(f"{name}: vit_kwargs only apply when vit is a timm name.")


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


def describe_differences(
    saved: Mapping[str, Any], requested: Mapping[str, Any], ignore: Sequence[str] = ()
) -> list[str]:
    """One line per differing setting: ``"key: A in the checkpoint, B requested"``."""
    lines = []
    for key in sorted(set(saved) | set(requested)):
        if key in ignore:
            continue
        before, now = saved.get(key, "unset"), requested.get(key, "unset")
        if _normalised(before) != _normalised(now):
            lines.append(f"  {key}: {before!r} in the checkpoint, {now!r} requested")
    return lines


def _normalised(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normalised(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------
# What every run trained through the package gets (pretrain, the CLI, benchmarks)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing beside the final path and renaming.

    Lightning's own writer stages the file in the system's temporary folder, so on
    another file system the final move is a copy: a full disk then leaves a torn
    checkpoint under its final name. Here a crash leaves the previous file intact.
    """

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | Path,
        storage_options: Any | None = None,
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO does not take storage_options; got "
                f"{storage_options!r}."
            )
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)


class MetricsCSVLogger(Logger):
    """Logs metrics to ``<save_dir>/metrics.csv``, rewritten atomically on each save.

    One row per logging call (``step`` and the metrics given), as Lightning's
    ``CSVLogger``. When the file exists (a resumed run), the rows of the steps
    before the first step logged now are kept, so the file covers the whole run.
    Hyper-parameters go to ``hparams.yaml``.
    """

    def __init__(self, save_dir: str | Path) -> None:
        super().__init__()
        self._save_dir = Path(save_dir)
        self.path = self._save_dir / METRICS_FILE
        self._earlier_rows = _read_rows(self.path)
        self.rows: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @property
    def log_dir(self) -> str:
        return str(self._save_dir)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        values = dict(params) if isinstance(params, Mapping) else vars(params)
        plain = {k: v for k, v in values.items() if _is_plain(v)}
        atomic_write_text(self._save_dir / HPARAMS_FILE, yaml.safe_dump(plain))

    @rank_zero_only
    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        if not self.rows and self._earlier_rows and step is not None:
            self.rows = [r for r in self._earlier_rows if int(r["step"]) < step]
        row: dict[str, Any] = {"step": step}
        row.update({k: float(v) for k, v in metrics.items()})
        self.rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self.rows:
            return
        fields = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


class DistributedBatchNorm(Callback):
    """Synchronises BatchNorm statistics over the global batch under multi-GPU DDP.

    The projection heads' BatchNorm then normalises over all devices' images, as
    in the official code. ``torch.nn.SyncBatchNorm`` has no CPU kernel, so CPU
    (gloo) runs keep per-device statistics.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and trainer.strategy.root_device.type == "cuda":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(pl_module)


class CPULowPrecision(Callback):
    """What bfloat16 / float16 autocast on a CPU needs: the attention kernel, a warning.

    - On CPU under bfloat16 (or float16) autocast, the backward pass of
      ``scaled_dot_product_attention`` is several times slower than timm's explicit
      attention, so every timm ``Attention`` of the trained
      module uses the explicit one while it trains (timm's own ``fused_attn``
      switch, set once per fit and restored after it). Elsewhere timm's choice
      stands.
    - A CPU without native bfloat16 matrix instructions (AVX-512-BF16 or AMX, as
      oneDNN reports them) computes bfloat16 matrix products in a reference kernel
      that is tens of times slower than float32: a warning says so and names the
      precision to use instead.
    """

    def __init__(self) -> None:
        self._previous: list[tuple[Attention, bool]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        precision = str(trainer.precision)
        if trainer.strategy.root_device.type != "cpu":
            return
        if precision not in ("bf16-mixed", "16-mixed"):
            return
        if precision == "bf16-mixed" and not cpu_has_native_bfloat16():
            logger.warning(
                "this CPU has no native bfloat16 matrix instructions (AVX-512-BF16 "
                "or AMX): under precision=bf16-mixed its matrix products run in a "
                "reference kernel, many times slower than float32; train with "
                "precision='32-true' (--trainer.precision 32-true)"
            )
        for module in pl_module.modules():
            if isinstance(module, Attention):
                self._previous.append((module, bool(module.fused_attn)))
                module.fused_attn = False  # type: ignore[misc]

    def teardown(
        self, trainer: Trainer, pl_module: LightningModule, stage: str
    ) -> None:
        for module, fused in self._previous:
            module.fused_attn = fused  # type: ignore[misc]
        self._previous.clear()


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 matrix products natively on this CPU."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else True


class UnreadableImagesReport(Callback):
    """Logs, after each epoch, how many images failed to decode and were replaced."""

    def __init__(self) -> None:
        self._reported = 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, MSNDataModule):
            return
        failures = datamodule.num_load_failures()
        if failures > self._reported and trainer.is_global_zero:
            logger.warning(
                "epoch %d: %d image(s) could not be decoded and were replaced by "
                "the next image (%d in this run so far); see the warnings above "
                "for the files",
                trainer.current_epoch,
                failures - self._reported,
                failures,
            )
        self._reported = failures


def run_trainer_arguments(
    output_dir: str | Path,
    checkpoint_every_n_epochs: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """``Trainer`` arguments of a run directory, shared by every training path.

    Args:
        output_dir:
            The run directory: ``metrics.csv``, ``hparams.yaml``, TensorBoard
            events (when ``tensorboard`` is installed) and ``checkpoints/``.
        checkpoint_every_n_epochs:
            Write ``checkpoints/epoch=NNN.ckpt`` every this many epochs and
            ``checkpoints/last.ckpt`` after each; ``None`` writes no checkpoints.
        progress:
            Show the progress bar.

    Returns:
        ``logger``, ``callbacks``, ``plugins``, ``default_root_dir``,
        ``enable_checkpointing`` and ``enable_progress_bar`` for ``Trainer``; pass
        further callbacks by extending ``callbacks``.
    """
    output_dir = Path(output_dir)
    loggers: list[Logger] = [MetricsCSVLogger(output_dir)]
    if _tensorboard_available():
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(output_dir, name="", version="tensorboard"))
    callbacks: list[Callback] = [
        DistributedBatchNorm(),
        CPULowPrecision(),
        UnreadableImagesReport(),
    ]
    if checkpoint_every_n_epochs is not None:
        callbacks.insert(
            0,
            ModelCheckpoint(
                dirpath=output_dir / CHECKPOINT_DIR,
                filename="{epoch:03d}",
                save_top_k=-1,
                every_n_epochs=checkpoint_every_n_epochs,
                save_last=True,
                save_on_train_epoch_end=True,
            ),
        )
    return dict(
        default_root_dir=output_dir,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=checkpoint_every_n_epochs is not None,
        enable_progress_bar=progress,
    )


# ---------------------------------------------------------------------------------
# One training path: pretrain() and the command line


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


def prepare_output_dir(
    output_dir: str | Path, resume: str | Path | None, overwrite: bool = False
) -> Path | None:
    """Checks the run directory and resolves ``resume``; returns the checkpoint.

    A run never writes into another run's directory: a non-empty ``output_dir`` is
    refused unless the run resumes (``resume``) or ``overwrite`` is set, in which
    case what it deletes is logged first.

    Raises:
        FileExistsError: ``output_dir`` holds files and neither flag is given.
        FileNotFoundError: The checkpoint to resume from does not exist.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output directory {output_dir} is a file")
    if resume == "last":
        resume = output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if resume is not None:
        if overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if not Path(resume).is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {resume}")
        return Path(resume)
    entries = sorted(output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and not overwrite:
        raise FileExistsError(
            f"output directory {output_dir} already holds a run "
            f"({', '.join(e.name for e in entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); choose another output "
            "directory, continue it with resume='last' (--resume last), or replace "
            "it with overwrite (--overwrite)"
        )
    for entry in entries:
        logger.warning("overwrite: deleting %s", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return None


def check_compatible(module: MSNLightningModule, datamodule: MSNDataModule) -> None:
    """Raises ``ValueError`` if the data's views do not fit the model.

    Checked before any image is read: the view sizes must be multiples of the
    patch size, and the module must expect the data's number of random views.
    """
    patch = module.model.patch_size
    for what, size in (
        ("img_size", datamodule.img_size),
        ("focal_size", datamodule.focal_size),
    ):
        if size % patch:
            raise ValueError(
                f"{what}={size} is not a multiple of the ViT's patch size {patch}"
            )
    if module.hparams["num_random_views"] != datamodule.random_views:
        raise ValueError(
            f"the module expects {module.hparams['num_random_views']} random views "
            f"per image but the data makes {datamodule.random_views}"
        )


def check_resume(
    checkpoint_path: Path,
    module: MSNLightningModule,
    datamodule: MSNDataModule,
    trainer: Trainer,
) -> None:
    """Refuses a resume whose settings differ from the checkpoint's.

    Every hyper-parameter of the module and of the data that shapes the model or
    the schedules must be the same (loader settings such as ``num_workers`` may
    change), and so must the trainer's epochs, steps, devices and gradient
    accumulation; the message lists each difference on its own line. The number of
    steps (which also depends on the size of the data) is compared again when
    training starts.
    """
    from lightly_msn.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(checkpoint_path)
    if RUN_SETTINGS_KEY not in checkpoint or METADATA_KEY not in checkpoint:
        raise ValueError(
            f"cannot resume from {checkpoint_path}: it is not a checkpoint of "
            "lightly-msn pretrain (no run settings in it)"
        )
    saved_vit = checkpoint[METADATA_KEY]["kwargs"]
    requested_vit = module.vit_config["kwargs"]
    differences = describe_differences(saved_vit, requested_vit)
    saved_module = dict(checkpoint.get("hyper_parameters", {}))
    requested_module = dict(module.hparams)
    differences += describe_differences(
        saved_module, requested_module, ignore=RESUMABLE_MODULE_SETTINGS
    )
    saved_data = dict(checkpoint.get("datamodule_hyper_parameters", {}))
    differences += describe_differences(
        saved_data, dict(datamodule.hparams), ignore=RESUMABLE_DATA_SETTINGS
    )
    saved_run = checkpoint[RUN_SETTINGS_KEY]
    requested_run = trainer_settings(trainer)
    differences += describe_differences(
        {k: saved_run.get(k) for k in requested_run}, requested_run
    )
    if differences:
        raise ValueError(
            f"cannot resume from {checkpoint_path} with other settings; these "
            "differ:\n" + "\n".join(differences)
        )


# settings that may change when a run is resumed: they change neither the model nor
# the schedules nor the distribution of the views (where and how the views are made
# changes their random draws, as the number of loader workers does)
RESUMABLE_MODULE_SETTINGS = ("gather_distributed", "fast_class_token")
RESUMABLE_DATA_SETTINGS = (
    "num_workers",
    "on_bad_image",
    "data_dir",
    "augment",
    "in_memory",
    "memory_limit_gb",
    "cache_dir",
)


def prepare_run(
    module: MSNLightningModule,
    datamodule: MSNDataModule,
    output_dir: str | Path,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Checks a run before any image is read; returns the checkpoint to resume from.

    The data's views must fit the model (:func:`check_compatible`) and the run
    directory must be free (:func:`prepare_output_dir`, which deletes its content
    only with ``overwrite``). A checkpoint to resume from is checked against the
    trainer in :func:`fit_and_export`.
    """
    check_compatible(module, datamodule)
    return prepare_output_dir(output_dir, resume, overwrite)


def fit_and_export(
    trainer: Trainer,
    module: MSNLightningModule,
    datamodule: MSNDataModule,
    resume: Path | None = None,
) -> PretrainResult:
    """Trains ``module`` on ``datamodule`` and exports the target encoder.

    The one training path of :func:`pretrain` and ``lightly-msn pretrain``, after
    :func:`prepare_run` has checked the run: checks a checkpoint to resume from
    (:func:`check_resume`), fits, then writes ``backbone.safetensors`` and
    ``training.png`` into the trainer's run directory.
    """
    if resume is not None:
        check_resume(resume, module, datamodule, trainer)
    output_dir = Path(trainer.default_root_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    backbone_path = output_dir / BACKBONE_FILE
    metrics_path = output_dir / METRICS_FILE
    plot_path: Path | None = None
    if trainer.is_global_zero:
        export_backbone(
            module.model.backbone_state_dict("target"), module.vit_config, backbone_path
        )
        plot_path = plot_metrics(metrics_path, output_dir / PLOT_FILE)
    return PretrainResult(
        module=module,
        output_dir=output_dir,
        checkpoint=output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT,
        backbone=backbone_path,
        metrics=metrics_path,
        plot=plot_path,
    )


def pretrain(
    dataset: str | Path | Dataset = "digits",
    vit: str | VisionTransformer = "vit_tiny_patch16_224",
    img_size: int = 32,
    patch_size: int | None = 4,
    epochs: int = 10,
    devices: int | str = "auto",
    num_nodes: int = 1,
    accelerator: str = "auto",
    precision: str = "32-true",
    output_dir: str | Path = "runs/msn",
    resume: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    **settings: Any,
) -> PretrainResult:
    """Pretrains a ViT with MSN and exports its target encoder.

    Python counterpart of ``lightly-msn pretrain``, through the same training path
    (:func:`fit_and_export`). Writes to ``output_dir``:
    ``checkpoints/epoch=NNN.ckpt`` after every epoch and ``checkpoints/last.ckpt``,
    ``metrics.csv``, ``hparams.yaml`` (and TensorBoard events when ``tensorboard``
    is installed), ``training.png`` (loss and collapse diagnostics) and
    ``backbone.safetensors``. Every file is written beside its final path and
    renamed into place, so a crash never leaves a torn one.

    Args:
        dataset:
            An ImageFolder path, ``"cifar10"``, ``"digits"`` or a dataset instance
            (see :class:`~lightly_msn.data.MSNDataModule`).
        vit:
            A timm ViT name or instance.
        img_size:
            Random view size.
        patch_size:
            ViT patch size (``None`` keeps the model's).
        epochs:
            Training length, in epochs.
        devices:
            Passed to ``pytorch_lightning.Trainer``.
        num_nodes:
            Passed to ``pytorch_lightning.Trainer``.
        accelerator:
            Passed to ``pytorch_lightning.Trainer``.
        precision:
            Passed to ``pytorch_lightning.Trainer`` (``"bf16-mixed"`` for
            autocast; the loss stays float32).
        output_dir:
            Run folder; refused when it already holds a run, unless ``resume`` or
            ``overwrite`` is given.
        resume:
            A checkpoint to continue from exactly (step, schedules, EMA, optimizer
            and RNG states), or ``"last"`` for ``output_dir/checkpoints/last.ckpt``.
            Its settings must equal the ones given now.
        overwrite:
            Delete what ``output_dir`` holds first (each deleted path is logged).
        seed:
            Seed of every random number generator (Python, NumPy, torch, loader
            workers), set before the model is built; a ViT instance passed as
            ``vit`` was initialised earlier, so seed before creating it.
        progress:
            Show the progress bar.
        callbacks:
            Extra Lightning callbacks.
        **settings:
            Further arguments of :class:`~lightly_msn.data.MSNDataModule`
            (``batch_size``, ``focal_views``, ``num_workers``, ``transform``, ...)
            and of :class:`MSNLightningModule` (``lr``, ``mask_ratio``,
            ``num_prototypes``, ``warmup_epochs``, ...), by name.
    """
    from pytorch_lightning import seed_everything

    if epochs < 1:
        raise ValueError(f"pretrain: epochs must be >= 1, got {epochs}.")
    data_settings, module_settings = split_settings(settings)
    if isinstance(dataset, (str, Path)):
        datamodule = MSNDataModule(str(dataset), img_size=img_size, **data_settings)
    else:
        datamodule = MSNDataModule.from_dataset(
            dataset, img_size=img_size, **data_settings
        )
    seed_everything(seed, workers=True, verbose=False)
    module = MSNLightningModule(
        vit=vit,
        img_size=img_size,
        patch_size=patch_size,
        num_random_views=datamodule.random_views,
        **module_settings,
    )
    checkpoint = prepare_run(module, datamodule, output_dir, resume, overwrite)
    arguments = run_trainer_arguments(output_dir, progress=progress)
    arguments["callbacks"] += list(callbacks)
    trainer = Trainer(
        max_epochs=epochs,
        devices=devices,
        num_nodes=num_nodes,
        accelerator=accelerator,
        precision=precision,  # type: ignore[arg-type]
        log_every_n_steps=1,
        enable_model_summary=False,
        **arguments,
    )
    return fit_and_export(trainer, module, datamodule, resume=checkpoint)


def split_settings(
    settings: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits keyword arguments between ``MSNDataModule`` and ``MSNLightningModule``.

    Raises:
        TypeError: For a name that neither accepts.
    """
    data_names = set(inspect.signature(MSNDataModule).parameters)
    module_names = set(inspect.signature(MSNLightningModule).parameters)
    unknown = sorted(set(settings) - data_names - module_names)
    if unknown:
        raise TypeError(
            f"pretrain: unknown settings {unknown}; see MSNDataModule and "
            "MSNLightningModule for the valid names"
        )
    data = {k: v for k, v in settings.items() if k in data_names}
    module = {k: v for k, v in settings.items() if k in module_names}
    return data, module


def plot_metrics(metrics_path: Path, plot_path: Path) -> Path | None:
    """Plots loss and collapse diagnostics per step from the CSV metrics."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns: dict[str, list[tuple[int, float]]] = {}
    for row in _read_rows(metrics_path):
        for key in ("loss", "np", "max_p", "me_max_entropy", "lr"):
            if row.get(key) not in (None, ""):
                columns.setdefault(key, []).append((int(row["step"]), float(row[key])))
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
    with atomic_path(plot_path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    return plot_path


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as file:
        return list(csv.DictReader(file))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _tensorboard_available() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )
