"""Evaluation of a pretrained method with ``lightly_msn.eval``: kNN, few-shot, MAP@R.

The benchmark only wires the package's evaluation toolkit to the methods: every
number comes from ``lightly_msn.eval`` (``embed``, ``KNNClassifier``,
``few_shot_eval``, ``retrieval_metrics``).
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
from lightly_msn.eval.fewshot import few_shot_eval, parse_shots
from lightly_msn.eval.knn import KNNClassifier
from lightly_msn.eval.retrieval import retrieval_metrics
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


def evaluate_features(
    bank: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    knn_ks: tuple[int, ...] = (20, 200),
    fewshot: tuple[str, ...] = ("1", "2", "5", "1%"),
    fewshot_seeds: int = 3,
    progress: bool = False,
) -> dict[str, Any]:
    """kNN top-1/top-5, few-shot top-1 and retrieval metrics of frozen features.

    Args:
        bank: Labelled (features, labels): kNN neighbours, few-shot draws and the
            retrieval reference set.
        test: (features, labels) scored by every metric.

    Returns:
        ``{"knn": {k: {"top1", "top5"}}, "fewshot": [...], "retrieval": {...}}``.
    """
    bank_features, bank_labels = bank
    test_features, test_labels = test
    knn = KNNClassifier(ks=knn_ks).fit(bank_features, bank_labels)
    scores = knn.score(test_features, test_labels)
    knn_result = {
        str(k): {"top1": scores[f"knn_top1@{k}"], "top5": scores[f"knn_top5@{k}"]}
        for k in knn_ks
    }
    shots = parse_shots(",".join(fewshot))
    fewshot_results = few_shot_eval(
        bank_features,
        bank_labels,
        test_features,
        test_labels,
        shots=shots,
        seeds=fewshot_seeds,
        progress=progress,
    )
    return {
        "knn": knn_result,
        "fewshot": [
            {
                "setting": result.name,
                "labels_per_class": result.labels_per_class,
                "mean": result.mean,
                "std": result.std,
                "accuracies": list(result.accuracies),
            }
            for result in fewshot_results
        ],
        "retrieval": retrieval_metrics(
            test_features, test_labels, bank_features, bank_labels
        ),
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
