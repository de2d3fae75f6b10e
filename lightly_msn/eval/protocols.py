"""Every evaluation protocol over one pair of feature sets: kNN, retrieval, few-shot.

The one place that runs the protocols on frozen features: ``lightly-msn eval`` turns
the result into its table, the benchmark into its JSON record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightly_msn.eval.fewshot import DEFAULT_SHOTS, FewShotResult, Shots, few_shot_eval
from lightly_msn.eval.knn import KNNClassifier
from lightly_msn.eval.retrieval import retrieval_metrics


@dataclass
class FeatureEvaluation:
    """The results of :func:`evaluate_features`; a protocol that did not run is empty.

    Attributes:
        knn:
            ``{k: {"top1": ..., "top5": ...}}``, accuracies in percent.
        retrieval:
            ``{metric: value}`` in percent, the test features searched in the bank.
        fewshot:
            One :class:`FewShotResult` per few-shot setting.
    """

    knn: dict[int, dict[str, float]] = field(default_factory=dict)
    retrieval: dict[str, float] = field(default_factory=dict)
    fewshot: list[FewShotResult] = field(default_factory=list)


def evaluate_features(
    bank: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    knn_ks: Sequence[int] = (20, 200),
    retrieval: bool = True,
    shots: Sequence[Shots] = DEFAULT_SHOTS,
    seeds: int = 3,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> FeatureEvaluation:
    """Scores ``test`` against the labelled ``bank`` with the selected protocols.

    Args:
        bank:
            Labelled ``(features, labels)``: the kNN neighbours, the pool of the
            few-shot draws and the retrieval references.
        test:
            ``(features, labels)`` scored by every protocol; its labels must index
            the same classes as the bank's.
        knn_ks:
            Neighbour counts of the weighted kNN classifier (empty: no kNN).
        retrieval:
            Compute precision@1, R-precision and MAP@R of the test queries.
        shots:
            Few-shot settings, images per class (int) or a fraction of the bank
            (float); empty: no few-shot evaluation.
        seeds:
            Few-shot draws per setting (seeds ``0 .. seeds - 1``).
        device:
            Where the few-shot classifiers are fit (default: CUDA when available).
        progress:
            Show the few-shot progress bar.

    Returns:
        A :class:`FeatureEvaluation`.
    """
    result = FeatureEvaluation()
    if knn_ks:
        scores = KNNClassifier(ks=tuple(knn_ks)).fit(*bank).score(*test)
        result.knn = {
            k: {metric: scores[f"knn_{metric}@{k}"] for metric in ("top1", "top5")}
            for k in knn_ks
        }
    if retrieval:
        result.retrieval = retrieval_metrics(*test, *bank)
    if shots:
        result.fewshot = few_shot_eval(
            *bank, *test, shots=shots, seeds=seeds, device=device, progress=progress
        )
    return result
