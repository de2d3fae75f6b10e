"""Two CPU processes (gloo DDP) train like one process with the doubled batch.

The per-rank loss is the local cross-entropy plus the ME-MAX term of the global
mean prediction (``gather_distributed=True``), and Sinkhorn normalises the global
batch; DDP averages the gradients. So the averaged loss and every update equal
those of a single process that sees both halves at once. Two things are made
deterministic for the comparison: the views are fixed tensors with no patch
dropping (random masks differ per rank), the dataset is one global batch (so every
step sees the same images however the distributed sampler orders and splits
them), and the heads' BatchNorm layers run in
eval mode (per-sample, so the batch split does not matter). In real multi-GPU runs
``pretrain`` converts them to ``SyncBatchNorm``, whose statistics are those of the
global batch; torch's SyncBatchNorm has no CPU kernel, hence eval mode here.
"""

import csv
from pathlib import Path

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from tests._train_helpers import FixedViews, tiny_module

STEPS = 3
GLOBAL_BATCH = 8


class BatchNormInEvalMode(Callback):
    def on_train_batch_start(
        self, trainer: Trainer, module: LightningModule, batch: object, index: int
    ) -> None:
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm1d):
                layer.eval()


def train(tmp_path: Path, devices: int) -> tuple[list[float], LightningModule]:
    torch.manual_seed(0)
    module = tiny_module(mask_ratio=0.0, max_steps=STEPS, gather_distributed=True)
    trainer = Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=CSVLogger(tmp_path, name="", version=str(devices)),
        callbacks=[BatchNormInEvalMode()],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(
        FixedViews(size=GLOBAL_BATCH), batch_size=GLOBAL_BATCH // devices
    )
    trainer.fit(module, loader)
    with (tmp_path / str(devices) / "metrics.csv").open() as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file) if row["loss"]]
    return losses, module


def test_two_process_ddp_equals_one_process_with_the_doubled_batch(
    tmp_path: Path,
) -> None:
    single_losses, single = train(tmp_path, devices=1)
    ddp_losses, ddp = train(tmp_path, devices=2)
    assert len(single_losses) == len(ddp_losses) == STEPS
    torch.testing.assert_close(
        torch.tensor(ddp_losses), torch.tensor(single_losses), atol=1e-5, rtol=1e-5
    )
    # the updates agree too: prototypes and the EMA target after the last step
    for name in ("prototypes.weight", "target_backbone.vit.blocks.1.mlp.fc2.weight"):
        torch.testing.assert_close(
            ddp.model.state_dict()[name],
            single.model.state_dict()[name],
            atol=1e-5,
            rtol=1e-4,
        )
