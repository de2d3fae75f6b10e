"""One evaluation of frozen features for ``lightly-msn eval`` and the benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.evaluate import evaluation_record
from benchmarks.methods.base import BenchmarkConfig
from benchmarks.run import load_profile
from lightly_msn.data import CIFAR10_NORMALIZE, IMAGENET_NORMALIZE, eval_transform
from lightly_msn.eval import (
    KNNClassifier,
    evaluate_features,
    few_shot_eval,
    retrieval_metrics,
)
from lightly_msn.eval.cli import result_rows


def _clusters(
    num_per_class: int, seed: int, num_classes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    centres = 3 * torch.eye(num_classes, 8)
    return centres[labels] + torch.randn(len(labels), 8, generator=generator), labels


def test_evaluate_features_runs_each_protocol_once_for_cli_and_benchmark() -> None:
    bank, test = _clusters(10, seed=0), _clusters(4, seed=1)
    evaluation = evaluate_features(
        bank, test, knn_ks=(5, 10), shots=[1, 0.5], seeds=2, progress=False
    )
    knn = KNNClassifier(ks=(5, 10)).fit(*bank).score(*test)
    assert evaluation.knn == {
        k: {"top1": knn[f"knn_top1@{k}"], "top5": knn[f"knn_top5@{k}"]} for k in (5, 10)
    }
    assert evaluation.retrieval == retrieval_metrics(*test, *bank)
    fewshot = few_shot_eval(*bank, *test, shots=[1, 0.5], seeds=2, progress=False)
    assert [r.accuracies for r in evaluation.fewshot] == [r.accuracies for r in fewshot]

    # the benchmark's JSON record keeps its keys and shape
    record = evaluation_record(evaluation)
    assert set(record) == {"knn", "fewshot", "retrieval"}
    assert record["knn"]["10"] == evaluation.knn[10]
    assert [entry["setting"] for entry in record["fewshot"]] == ["1", "50%"]
    assert set(record["fewshot"][0]) == {
        "setting",
        "labels_per_class",
        "mean",
        "std",
        "accuracies",
    }
    assert record["fewshot"][1]["labels_per_class"] == 5.0
    assert record["retrieval"] == evaluation.retrieval

    # the command line's table holds the same numbers
    rows = {
        (r["protocol"], r["setting"], r["metric"]): r for r in result_rows(evaluation)
    }
    assert rows["knn", "k=5", "top1"]["mean"] == round(evaluation.knn[5]["top1"], 4)
    assert rows["fewshot", "50%", "top1"]["runs"] == 2
    assert rows["retrieval", "test->train", "precision_at_1"]["mean"] == round(
        evaluation.retrieval["precision_at_1"], 4
    )


def test_evaluate_features_skips_the_protocols_not_asked_for() -> None:
    evaluation = evaluate_features(
        _clusters(3, seed=0), _clusters(2, seed=1), knn_ks=(), retrieval=False, shots=()
    )
    assert (evaluation.knn, evaluation.retrieval, evaluation.fewshot) == ({}, {}, [])
    assert result_rows(evaluation) == []


def _image(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    ("profile", "resize"), [("cpu-quick", 32), ("imagenet-vits16", 256)]
)
def test_the_benchmark_evaluates_with_the_package_transform(
    profile: str, resize: int
) -> None:
    from torchvision import transforms as T

    from benchmarks.run import evaluation_transform

    config = BenchmarkConfig.from_profile(load_profile(profile))
    image = _image(300, 260)
    expected = T.Compose(
        [
            T.Resize(resize),
            T.CenterCrop(config.img_size),
            T.ToTensor(),
            T.Normalize(**config.normalize),
        ]
    )
    assert torch.equal(evaluation_transform(config)(image), expected(image))


def test_eval_transform_resizes_crops_and_normalises() -> None:
    image = _image(40, 32)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    plain = eval_transform(32, normalize=None)(image)
    assert plain.shape == (3, 32, 32)
    torch.testing.assert_close(plain, pixels[:, :, 4:36])  # centre crop, no resize
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(3, 1, 1)
    torch.testing.assert_close(eval_transform(32)(image), (plain - mean) / std)
    small = eval_transform(16, CIFAR10_NORMALIZE)(image)
    assert small.shape == (3, 16, 16)
