"""Few-shot linear evaluation of frozen features, the protocol of MSN [0].

For ``n`` labelled images per class (the paper: 1, 2 and 5 per class, and 1 % of the
train set), several random draws (seeds), an L2-regularised multinomial logistic
regression without intercept is fit on the frozen features of the drawn images and
scored top-1 on the **full** test set; the table reports mean and standard deviation
over the draws.

As in the official ``logistic_eval.py``, each feature vector is centred (its own mean
over the feature dimensions is subtracted, cyanure's ``preprocess(centering=True,
columns=False)``) and L2-normalised, and the objective is

    sum_i cross_entropy(W x_i, y_i) + regularization / 2 * ||W||^2

(cyanure's ``lambd = 0.00025 / n`` on its mean loss is this with
``regularization = 0.00025``). It is minimised by full-batch L-BFGS in torch, which
runs on the GPU when one is given (the project's documentation compares it with
scikit-learn's ``lbfgs`` and cyanure on the same features).

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from lightly_msn.eval.checks import check_features, check_labels

OFFICIAL_REGULARIZATION = 2.5e-4  # logistic_eval.py's default --lambd
DEFAULT_SHOTS: tuple[int | float, ...] = (1, 2, 5, 0.01)
VALIDATION_FRACTION = 0.2  # of every class, when a regularisation grid is given

Shots = int | float  # an int n: n images per class; a float in (0, 1): that fraction


@dataclass
class FewShotResult:
    """Top-1 test accuracies (percent) of one few-shot setting over several draws."""

    shots: Shots
    seeds: list[int]
    num_labelled: list[int]
    accuracies: list[float]
    regularizations: list[float] = field(default_factory=list)
    num_classes: int = 1

    @property
    def name(self) -> str:
        """``"1"``, ``"5"`` or ``"1%"``: the setting as written on the command line."""
        return format_shots(self.shots)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Sample standard deviation over the draws (0 for a single draw)."""
        if len(self.accuracies) < 2:
            return 0.0
        return float(np.std(self.accuracies, ddof=1))

    @property
    def labels_per_class(self) -> float:
        """Average number of labelled images per class (the plot's x axis)."""
        return float(np.mean(self.num_labelled)) / self.num_classes


def parse_shots(spec: str) -> list[Shots]:
    """Parses ``"1,2,5,1%"`` into ``[1, 2, 5, 0.01]``."""
    shots: list[Shots] = []
    for part in (item.strip() for item in spec.split(",")):
        try:
            if part.endswith("%"):
                fraction = float(part[:-1]) / 100.0
                if not 0.0 < fraction < 1.0:
                    raise ValueError
                shots.append(fraction)
            else:
                count = int(part)
                if count < 1:
                    raise ValueError
                shots.append(count)
        except ValueError:
            raise ValueError(
                f"bad few-shot setting {part!r} in {spec!r}: use positive ints "
                "(images per class) or percentages in (0, 100), e.g. '1,2,5,1%'"
            ) from None
    return shots


def format_shots(shots: Shots) -> str:
    if isinstance(shots, float):
        return f"{100.0 * shots:g}%"
    return str(shots)


def sample_few_shot(labels: Tensor, shots: Shots, seed: int) -> Tensor:
    """Indices of a class-balanced random draw of labelled examples.

    Args:
        labels:
            (N,) class ids of the labelled pool.
        shots:
            An int ``n``: exactly ``n`` examples of every class. A float fraction
            ``p``: ``max(1, round(p * count))`` examples of every class (stratified).
        seed:
            The same seed gives the same draw; each class is drawn independently.

    Returns:
        Sorted int64 indices into ``labels``.
    """
    labels = check_labels(labels, len(labels))
    generator = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for class_id in torch.unique(labels).tolist():
        members = torch.nonzero(labels == class_id).flatten().numpy()
        if isinstance(shots, float):
            count = max(1, round(shots * len(members)))
        else:
            count = shots
            if len(members) < count:
                raise ValueError(
                    f"class {class_id} has {len(members)} labelled images, fewer than "
                    f"the {count} per class requested"
                )
        chosen.append(generator.choice(members, size=count, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()


def preprocess_features(features: Tensor) -> Tensor:
    """Centres every row on its own mean and L2-normalises it (official protocol)."""
    features = features.float()
    return F.normalize(features - features.mean(dim=1, keepdim=True), dim=1)


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    regularization: float = OFFICIAL_REGULARIZATION,
    max_iter: int = 500,
) -> Tensor:
    """Multinomial logistic regression without intercept, by full-batch L-BFGS.

    Minimises ``sum_i CE(W x_i, y_i) + regularization / 2 * ||W||^2`` on the device
    of ``features`` (float64 on CPU for a tight optimum, float32 on GPU).

    Returns:
        The weights ``W``, shape (num_classes, D).
    """
    if regularization <= 0:
        raise ValueError(f"regularization must be positive, got {regularization}")
    dtype = torch.float32 if features.is_cuda else torch.float64
    inputs = features.to(dtype)
    targets = labels.to(features.device)
    weights = torch.zeros(
        num_classes, inputs.shape[1], dtype=dtype, device=inputs.device
    ).requires_grad_()
    # The objective is divided by n so that the gradient tolerance does not depend
    # on the number of labelled images.
    scale = 1.0 / len(inputs)
    optimizer = torch.optim.LBFGS(
        [weights],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weights.T, targets, reduction="sum")
        loss = scale * (loss + 0.5 * regularization * weights.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach().float()


def few_shot_eval(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    shots: Sequence[Shots] = DEFAULT_SHOTS,
    seeds: int | Sequence[int] = 3,
    regularization: float | Sequence[float] = OFFICIAL_REGULARIZATION,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[FewShotResult]:
    """Runs the few-shot protocol for every setting in ``shots``.

    Args:
        train_features:
            Features of the labelled pool the few-shot examples are drawn from.
        train_labels:
            Labels of the labelled pool the few-shot examples are drawn from.
        test_features:
            Features of the test examples; every test example is scored.
        test_labels:
            Labels of the test examples.
        shots:
            Ints (images per class) and fractions (e.g. 0.01 for 1 %).
        seeds:
            A count (seeds ``0..count-1``) or explicit seeds; one draw each.
        regularization:
            One value (default: the official 2.5e-4), or a grid: then each draw
            holds out 20 % of every class (at least one image), picks the value
            with the best held-out accuracy and refits on all drawn images. A grid
            needs at least 2 images per class.
        device:
            Where the logistic regression runs; defaults to CUDA when available.

    Returns:
        One ``FewShotResult`` per setting, in the order of ``shots``.
    """
    train_features = preprocess_features(
        check_features(train_features, "train features")
    )
    train_labels = check_labels(train_labels, len(train_features), "train labels")
    test_features = preprocess_features(check_features(test_features, "test features"))
    test_labels = check_labels(test_labels, len(test_features), "test labels")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test features have dimension {test_features.shape[1]}, train features "
            f"{train_features.shape[1]}"
        )
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("give at least one seed")
    grid = (
        [regularization]
        if isinstance(regularization, (int, float))
        else list(regularization)
    )
    if not grid:
        raise ValueError("the regularization grid is empty")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    test_features = test_features.to(device)
    test_labels = test_labels.to(device)

    results = []
    runs = tqdm(
        total=len(shots) * len(seed_list), desc="few-shot", disable=not progress
    )
    for setting in shots:
        result = FewShotResult(
            shots=setting,
            seeds=seed_list,
            num_labelled=[],
            accuracies=[],
            num_classes=len(torch.unique(train_labels)),
        )
        for seed in seed_list:
            indices = sample_few_shot(train_labels, setting, seed)
            features = train_features[indices].to(device)
            labels = train_labels[indices].to(device)
            chosen = _select_regularization(features, labels, num_classes, grid, seed)
            weights = fit_logistic_regression(features, labels, num_classes, chosen)
            result.accuracies.append(_accuracy(weights, test_features, test_labels))
            result.num_labelled.append(len(indices))
            result.regularizations.append(chosen)
            runs.update()
        results.append(result)
    runs.close()
    return results


def _accuracy(weights: Tensor, features: Tensor, labels: Tensor) -> float:
    predictions = (features @ weights.T).argmax(dim=1)
    return 100.0 * (predictions == labels).float().mean().item()


def _select_regularization(
    features: Tensor, labels: Tensor, num_classes: int, grid: list[float], seed: int
) -> float:
    if len(grid) == 1:
        return float(grid[0])
    generator = np.random.default_rng(seed)
    held_out: list[int] = []
    for class_id in torch.unique(labels).tolist():
        members = torch.nonzero(labels == class_id).flatten().cpu().numpy()
        if len(members) < 2:
            raise ValueError(
                f"choosing the regularization needs >= 2 labelled images per class; "
                f"class {class_id} has {len(members)} (give a single value instead)"
            )
        count = max(1, math.floor(VALIDATION_FRACTION * len(members)))
        held_out.extend(generator.choice(members, size=count, replace=False).tolist())
    is_held_out = torch.zeros(len(labels), dtype=torch.bool)
    is_held_out[held_out] = True
    is_held_out = is_held_out.to(features.device)
    fit_x, fit_y = features[~is_held_out], labels[~is_held_out]
    val_x, val_y = features[is_held_out], labels[is_held_out]
    scores = [
        _accuracy(
            fit_logistic_regression(fit_x, fit_y, num_classes, value), val_x, val_y
        )
        for value in grid
    ]
    # the first best value wins: list the grid from strong to weak to prefer simpler
    return float(grid[int(np.argmax(scores))])
