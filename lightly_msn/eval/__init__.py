"""Evaluation of frozen features: faiss kNN, retrieval metrics and few-shot."""

from lightly_msn.eval.embed import embed
from lightly_msn.eval.fewshot import (
    FewShotResult,
    few_shot_eval,
    fit_logistic_regression,
    parse_shots,
    preprocess_features,
    sample_few_shot,
)
from lightly_msn.eval.knn import KNNClassifier
from lightly_msn.eval.plots import plot_few_shot
from lightly_msn.eval.protocols import FeatureEvaluation, evaluate_features
from lightly_msn.eval.retrieval import RETRIEVAL_METRICS, retrieval_metrics

__all__ = [
    "RETRIEVAL_METRICS",
    "FeatureEvaluation",
    "FewShotResult",
    "KNNClassifier",
    "embed",
    "evaluate_features",
    "few_shot_eval",
    "fit_logistic_regression",
    "parse_shots",
    "plot_few_shot",
    "preprocess_features",
    "retrieval_metrics",
    "sample_few_shot",
]
