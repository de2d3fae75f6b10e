"""Evaluation of a pretrained method with ``lightly_msn.eval``: kNN, few-shot, MAP@R.

The benchmark only wires the package's evaluation toolkit to the methods: every
number comes from ``lightly_msn.eval`` (``embed``, ``evaluate_features``,
``KNNClassifier``); this module turns them into the benchmark's JSON record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightly_msn.eval.embed import embed
from lightly_msn.eval.knn import KNNClassifier
from lightly_msn.eval.protocols import FeatureEvaluation
from lightly_msn.files import atomic_write_text


class FeatureExtractor(nn.Module):
    """Wraps a method as the module ``embed`` expects: images -> (N, D) features."""

    def __init__(self, method: Any) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: Tensor) -> Tensor:
        features: Tensor = self.method.backbone_features(images)
        return features


def embed_method(
    method: Any, dataset: Dataset, batch_size: int = 256, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """Features and labels of ``dataset`` under ``method.backbone_features``."""
    return embed(
        FeatureExtractor(method),
        dataset,
        batch_size=batch_size,
        device=next(method.parameters()).device,
        progress=progress,
    )


def evaluation_record(evaluation: FeatureEvaluation) -> dict[str, Any]:
    """The ``knn``, ``fewshot`` and ``retrieval`` entries of a benchmark record.

    Args:
        evaluation: The result of ``lightly_msn.eval.evaluate_features`` on the
            bank and test features.

    Returns:
        ``{"knn": {k: {"top1", "top5"}}, "fewshot": [...], "retrieval": {...}}``
        (``k`` as a string, as in the JSON records ``benchmarks/results.py`` reads).
    """
    return {
        "knn": {str(k): scores for k, scores in evaluation.knn.items()},
        "fewshot": [
            {
                "setting": result.name,
                "labels_per_class": result.labels_per_class,
                "mean": result.mean,
                "std": result.std,
                "accuracies": list(result.accuracies),
            }
            for result in evaluation.fewshot
        ],
        "retrieval": evaluation.retrieval,
    }


class KNNMonitor(Callback):
    """kNN top-1 on a small bank before training and after every epoch.

    Runs on the global-zero rank only; the time it takes is recorded so that it can
    be subtracted from the pretraining wall time. With ``path`` the curve is saved
    after every point (atomically) and read back when the run resumes, so a
    resumed run's curve still starts at the initialisation.
    """

    def __init__(
        self, bank: Dataset, test: Dataset, k: int = 20, path: Path | None = None
    ) -> None:
        self.bank = bank
        self.test = test
        self.k = k
        self.path = path
        self.curve: list[dict[str, float]] = []
        if path is not None and path.is_file():
            self.curve = json.loads(path.read_text())
        self.seconds = 0.0

    def measure(self, trainer: Trainer, method: LightningModule, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        with torch.no_grad():
            bank = embed_method(method, self.bank)
            test = embed_method(method, self.test)
        knn = KNNClassifier(ks=(self.k,)).fit(*bank)
        top1 = knn.score(*test)[f"knn_top1@{self.k}"]
        self.curve = [point for point in self.curve if point["epoch"] < epoch]
        self.curve.append({"epoch": epoch, "top1": top1})
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.curve))
        self.seconds += time.perf_counter() - start

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.measure(trainer, pl_module, epoch=0)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.measure(trainer, pl_module, epoch=trainer.current_epoch + 1)
