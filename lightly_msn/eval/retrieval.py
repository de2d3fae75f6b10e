"""Image retrieval metrics of frozen features: precision@1, R-precision and MAP@R.

Computed by pytorch-metric-learning's ``AccuracyCalculator`` [0] with an exact faiss
inner-product search over L2-normalised features (cosine similarity). For each query
with ``R`` references of its class, R-precision is the fraction of its ``R`` nearest
references that share its class, and MAP@R averages the precision at every correct
position among those ``R`` [0].

- [0]: A Metric Learning Reality Check, 2020, https://arxiv.org/abs/2003.08505
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN
from torch import Tensor

from lightly_msn.eval.checks import check_features, check_labels
from lightly_msn.eval.knn import normalized_numpy

RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def retrieval_metrics(
    query_features: Tensor,
    query_labels: Tensor,
    reference_features: Tensor | None = None,
    reference_labels: Tensor | None = None,
    metrics: Sequence[str] = RETRIEVAL_METRICS,
) -> dict[str, float]:
    """Retrieval metrics in percent.

    Args:
        query_features:
            Features of the queries, (N, D).
        query_labels:
            Labels of the queries, (N,).
        reference_features:
            Features of the searched set. When omitted (together with
            ``reference_labels``), the queries are searched among themselves and
            every query's match with itself is excluded.
        reference_labels:
            Labels of the searched set; give it exactly when
            ``reference_features`` is given.
        metrics:
            Any of ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``.

    Returns:
        ``{metric: value in percent}``. Queries whose class has no reference are
        left out, as pytorch-metric-learning does.

    Raises:
        ValueError: If no query has a reference of its class (nothing to score).
    """
    unknown = set(metrics) - set(RETRIEVAL_METRICS)
    if unknown or not metrics:
        raise ValueError(
            f"metrics must be a non-empty subset of {RETRIEVAL_METRICS}, got {metrics}"
        )
    queries = _normalized(query_features, "query features")
    query_labels = check_labels(query_labels, len(queries), "query labels")
    if (reference_features is None) != (reference_labels is None):
        raise ValueError("give both reference_features and reference_labels, or none")
    calculator = AccuracyCalculator(
        include=tuple(metrics),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
    )
    if reference_features is None or reference_labels is None:
        _check_some_query_has_references(query_labels, None)
        result = calculator.get_accuracy(queries, query_labels)
    else:
        references = _normalized(reference_features, "reference features")
        reference_labels = check_labels(
            reference_labels, len(references), "reference labels"
        )
        if references.shape[1] != queries.shape[1]:
            raise ValueError(
                f"reference features have dimension {references.shape[1]}, queries "
                f"{queries.shape[1]}"
            )
        _check_some_query_has_references(query_labels, reference_labels)
        result = calculator.get_accuracy(
            queries, query_labels, references, reference_labels
        )
    return {name: 100.0 * float(result[name]) for name in metrics}


def _check_some_query_has_references(
    query_labels: Tensor, reference_labels: Tensor | None
) -> None:
    query_classes = torch.unique(query_labels).tolist()
    if reference_labels is None:
        classes, counts = torch.unique(query_labels, return_counts=True)
        if int(counts.max()) < 2:
            raise ValueError(
                f"every query class ({len(classes)} classes) has one query each; "
                "searched among themselves without self-matches, no query has a "
                "reference of its class"
            )
        return
    bank_classes = torch.unique(reference_labels).tolist()
    if not set(query_classes) & set(bank_classes):
        raise ValueError(
            f"none of the query classes {_ids(query_classes)} occurs in the reference "
            f"bank (bank classes {_ids(bank_classes)}); no query has a reference of "
            "its class"
        )


def _ids(classes: list[int], shown: int = 20) -> str:
    """``[0, 1, ...]`` with at most ``shown`` class ids."""
    if len(classes) <= shown:
        return str(classes)
    return str(classes[:shown])[:-1] + f", ... ({len(classes)} classes)]"


def _normalized(features: Tensor, name: str) -> Tensor:
    return torch.from_numpy(normalized_numpy(check_features(features, name)))
