"""``lightly-msn pretrain``: MSN pretraining from the command line, on ``LightningCLI``.

Every argument of :class:`~lightly_msn.train.MSNLightningModule` (``--model.*``),
:class:`~lightly_msn.data.MSNDataModule` (``--data.*``) and Lightning's ``Trainer``
(``--trainer.*``) is an option, described by its docstring; ``--config run.yaml``
reads them from a file and ``--print_config`` prints the resolved configuration.
On top: ``--output_dir``, ``--resume`` and ``--overwrite``. The run trains through
the same path as :func:`lightly_msn.train.pretrain` and writes its resolved
configuration to ``<output_dir>/config.yaml``.

Examples::

    lightly-msn pretrain --data.dataset cifar10 --data.data_dir data/cifar10 \\
        --trainer.max_epochs 100 --output_dir runs/cifar10
    lightly-msn pretrain --config configs/msn_vits16_imagenet.yaml \\
        --data.dataset /data/imagenet --trainer.devices 8
    lightly-msn pretrain --config configs/small_images.yaml --print_config
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightly_msn.data import SMALL_IMAGE_SIZE, MSNDataModule
from lightly_msn.files import atomic_write_text
from lightly_msn.train import (
    MSNLightningModule,
    PretrainResult,
    fit_and_export,
    prepare_run,
    run_trainer_arguments,
)

logger = logging.getLogger(__name__)

PROG = "lightly-msn pretrain"
CONFIG_FILE = "config.yaml"
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 10,
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}
# The small-data recipe ("A recipe for small data" in the training docs), the command
# line's defaults: it trains on 32 px images unless told otherwise. Found by the
# project's fair tuning on CIFAR-10: 4e-3 per 256 images (1e-3 at the default batch
# of 64), 64 prototypes, EMA momentum from 0.97, a warm-up of a tenth of the default
# 10 epochs.
SMALL_DATA_RECIPE: dict[str, Any] = {
    "lr": 1e-3,
    "start_lr": 2e-4,
    "warmup_epochs": 1.0,
    "num_prototypes": 64,
    "momentum": 0.97,
}
MODEL_DEFAULTS: dict[str, Any] = {
    "model.vit": "vit_tiny_patch16_224",
    "model.patch_size": 4,
    **{f"model.{key}": value for key, value in SMALL_DATA_RECIPE.items()},
}


class PretrainCLI(LightningCLI):
    """``LightningCLI`` for MSN pretraining into a run directory."""

    def __init__(self, args: Sequence[str] | None = None) -> None:
        self.checkpoint: Path | None = None
        super().__init__(
            MSNLightningModule,
            MSNDataModule,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            seed_everything_default=0,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": PROG, "description": __doc__.split("\n\n")[0]},
            args=list(args) if args is not None else None,
            run=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir",
            type=str,
            default="runs/msn",
            help="Run directory (checkpoints, metrics, config, backbone); refused "
            "when it already holds a run, unless --resume or --overwrite is given.",
        )
        parser.add_argument(
            "--resume",
            type=str | None,
            default=None,
            help="Continue a run exactly from a checkpoint, or 'last' for "
            "OUTPUT_DIR/checkpoints/last.ckpt; its settings must equal these.",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Delete what OUTPUT_DIR holds before training (each deleted path "
            "is logged).",
        )
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.random_views", "model.num_random_views")
        parser.set_defaults(MODEL_DEFAULTS)

    def before_instantiate_classes(self) -> None:
        """Warns when the small-image defaults are about to train on large images."""
        config = self.config
        small_defaults = all(
            config[key] == MODEL_DEFAULTS[key]
            for key in ("model.vit", "model.patch_size")
        )
        if config["data"]["img_size"] > SMALL_IMAGE_SIZE and small_defaults:
            logger.warning(
                "%s: --data.img_size %d with the defaults made for images of %d px "
                "and smaller (ViT-Tiny with 4 px patches, the small-data recipe); for "
                "larger images start from the paper's recipe: --config "
                "configs/msn_vits16_imagenet.yaml",
                PROG,
                config["data"]["img_size"],
                SMALL_IMAGE_SIZE,
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer of ``--trainer.*`` plus the run directory's logger and files.

        The run directory is checked (and, with ``--overwrite``, emptied) here,
        after the model and data arguments were validated by their classes.
        """
        config = self.config
        self.checkpoint = prepare_run(
            self.model,
            self.datamodule,
            config["output_dir"],
            resume=config["resume"],
            overwrite=config["overwrite"],
        )
        trainer_config = {**self.config_init["trainer"], **kwargs}
        check_training_length(trainer_config)
        if trainer_config.pop("default_root_dir", None) is not None:
            raise ValueError("set the run directory with --output_dir")
        checkpointing = trainer_config.pop("enable_checkpointing", None) is not False
        run = run_trainer_arguments(
            config["output_dir"],
            checkpoint_every_n_epochs=1 if checkpointing else None,
            progress=trainer_config.pop("enable_progress_bar", None) is not False,
        )
        for key in ("logger", "callbacks", "plugins"):
            extra = trainer_config.pop(key, None)
            if extra not in (None, True, False):
                run[key] += list(extra) if isinstance(extra, list) else [extra]
        config_text = self.parser.dump(self.config, skip_none=False)
        run["callbacks"].append(SaveConfig(config_text, config["output_dir"]))
        return Trainer(**trainer_config, **run)

    def run(self) -> PretrainResult:
        """Trains and exports the backbone."""
        return fit_and_export(
            self.trainer, self.model, self.datamodule, resume=self.checkpoint
        )


def check_training_length(trainer_config: dict[str, Any]) -> None:
    """Refuses a trainer that would train nothing (and export an untrained ViT)."""
    epochs = trainer_config.get("max_epochs")
    steps = trainer_config.get("max_steps", -1)
    if epochs is not None and (epochs == 0 or epochs < -1):
        raise ValueError(f"--trainer.max_epochs must be >= 1, got {epochs}")
    if epochs == -1 and (steps is None or steps < 1):
        raise ValueError(
            "--trainer.max_epochs -1 (no epoch limit) needs --trainer.max_steps >= 1"
        )
    if steps is not None and (steps == 0 or steps < -1):
        raise ValueError(f"--trainer.max_steps must be >= 1 or -1, got {steps}")


class SaveConfig(Callback):
    """Writes the resolved configuration to ``<output_dir>/config.yaml``.

    When the fit starts, that is after the data was read and checked, so a run that
    stops on bad data leaves its run directory empty.
    """

    def __init__(self, text: str, output_dir: str | Path) -> None:
        self.text = text
        self.path = Path(output_dir) / CONFIG_FILE

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            atomic_write_text(self.path, self.text)


def run_pretrain_cli(args: Sequence[str]) -> int:
    """Entry point of ``lightly-msn pretrain``; returns the exit code.

    Errors in the arguments, the data or the run directory are printed to stderr as
    one line (``lightly-msn pretrain: error: ...``) with exit code 2.
    """
    try:
        with warnings.catch_warnings():
            # the console script passes its arguments on: not a mix of two sources
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            cli = PretrainCLI(args)
        result = cli.run()
    except (ValueError, TypeError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if not cli.trainer.is_global_zero:
        return 0
    print(f"checkpoint: {result.checkpoint}")
    print(f"backbone:   {result.backbone}")
    print(f"metrics:    {result.metrics}")
    print(f"config:     {result.output_dir / CONFIG_FILE}")
    if result.plot is not None:
        print(f"plot:       {result.plot}")
    return 0
