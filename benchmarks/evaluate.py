"""Evaluation of a pretrained method with ``lightly_msn.eval``: kNN, few-shot, MAP@R.

The benchmark only wires the package's evaluation toolkit to the methods: every
number comes from ``lightly_msn.eval`` (``embed``, ``evaluate_features``); this module
turns them into the benchmark's JSON record and measures accuracy during training.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightly_msn.eval.embed import embed
from lightly_msn.eval.protocols import FeatureEvaluation, evaluate_features


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


class ProgressEvaluation(Callback):
    """kNN (and few-shot) accuracy during training, against the compute spent.

    Measures at the start of training (the initialisation) and then either after
    every epoch (``fractions=None``) or when the optimizer steps reach the given
    fractions of the run's total (``(0.25, 0.5)``: after a quarter and half of the
    budget). Each point records the epoch, step, images seen, the training wall
    time so far (the time spent here excluded) and the accuracies: kNN top-1 with
    ``k`` neighbours and, with ``shots``, the few-shot top-1 (mean over ``seeds``
    draws) at ``shots`` labelled images per class.

    Runs on the global-zero rank. The points and times are part of the callback's
    state, so they are saved in checkpoints and a resumed run continues the curve.
    Each point also goes to the trainer's loggers, its keys prefixed with
    ``progress/`` (``progress/top1``, ``progress/images_seen``, ...), so a run
    stopped before its end still leaves the points it measured in ``metrics.csv``.
    """

    def __init__(
        self,
        bank: Dataset,
        test: Dataset,
        k: int = 20,
        fractions: tuple[float, ...] | None = None,
        shots: int | None = None,
        seeds: int = 3,
        global_batch_size: int = 1,
    ) -> None:
        if fractions is not None and not all(0 < f < 1 for f in fractions):
            raise ValueError(f"fractions must lie in (0, 1), got {fractions}")
        self.bank = bank
        self.test = test
        self.k = k
        self.fractions = tuple(sorted(fractions)) if fractions is not None else None
        self.shots = shots
        self.seeds = seeds
        self.global_batch_size = global_batch_size
        self.curve: list[dict[str, float]] = []
        self.seconds = 0.0  # spent measuring in this process
        self.train_seconds = 0.0  # trained before this process (resumed runs)
        self._start = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve, "train_seconds": self.elapsed_training()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict["curve"])
        self.train_seconds = float(state_dict["train_seconds"])

    def elapsed_training(self) -> float:
        """Training wall time so far, measurements excluded, resumed runs included."""
        if not self._start:
            return self.train_seconds
        return self.train_seconds + time.perf_counter() - self._start - self.seconds

    def measure(self, trainer: Trainer, method: LightningModule, epoch: float) -> None:
        """Records a point; ``epoch`` counts the epochs trained (may be fractional)."""
        if not trainer.is_global_zero:
            return
        trained = self.elapsed_training()
        start = time.perf_counter()
        with torch.no_grad():
            bank = embed_method(method, self.bank)
            test = embed_method(method, self.test)
        evaluation = evaluate_features(
            bank,
            test,
            knn_ks=(self.k,),
            retrieval=False,
            shots=(self.shots,) if self.shots else (),
            seeds=self.seeds,
        )
        point: dict[str, float] = {
            "epoch": epoch,
            "step": trainer.global_step,
            "images_seen": trainer.global_step * self.global_batch_size,
            "train_seconds": trained,
            "top1": evaluation.knn[self.k]["top1"],
        }
        if evaluation.fewshot:
            point["fewshot_top1"] = evaluation.fewshot[0].mean
        self.curve = [p for p in self.curve if p["step"] < point["step"]] + [point]
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"progress/{key}": value for key, value in point.items()},
                step=trainer.global_step,
            )
        self.seconds += time.perf_counter() - start

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()
        self.seconds = 0.0
        if trainer.global_step == 0:
            self.measure(trainer, pl_module, epoch=0)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.fractions is None:
            return
        total = trainer.estimated_stepping_batches
        done = {p["step"] for p in self.curve}
        for fraction in self.fractions:
            step = max(1, round(fraction * total))
            if trainer.global_step == step and step not in done:
                epoch = trainer.current_epoch + (batch_idx + 1) / max(
                    1, trainer.num_training_batches
                )
                self.measure(trainer, pl_module, epoch=epoch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fractions is None:
            self.measure(trainer, pl_module, epoch=trainer.current_epoch + 1)
