"""Speed and memory of the evaluation: faiss kNN vs lightly, few-shot fits, solvers.

Run: ``python benchmarks/perf_eval.py`` (about 5 minutes on 2 CPU cores).

1. kNN, 50,000 x 384 bank, 10,000 queries, k=200, T=0.1: wall time (median of
   ``--repeats``) and peak resident memory above the inputs of
   ``KNNClassifier.fit + predict`` vs ``lightly.utils.benchmarking.knn_predict`` in
   query batches of 512, both from the same raw features in the same process.
2. Few-shot protocol on 50,000 x 384 train / 10,000 x 384 test features: the time of
   n = 1, 2, 5 per class and 1 % x 3 seeds.
3. Logistic-regression solvers on the same few-shot features (seed 0): our torch
   L-BFGS, scikit-learn's lbfgs and cyanure (the official solver, when installed),
   all on the objective ``sum CE + lambda / 2 ||W||^2``, lambda = 2.5e-4.

Synthetic features: 10 Gaussian class clusters whose separation is set so that the
accuracies are neither trivial nor chance.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lightly_msn.eval.fewshot import (
    OFFICIAL_REGULARIZATION,
    few_shot_eval,
    fit_logistic_regression,
    preprocess_features,
    sample_few_shot,
)
from lightly_msn.eval.knn import KNNClassifier

NUM_CLASSES = 10
DIM = 384


def clustered_features(num: int, seed: int, separation: float = 0.3):  # noqa: ANN201
    centres = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(99))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num,), generator=generator)
    noise = torch.randn(num, DIM, generator=generator)
    return separation * centres[labels] + noise, labels


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(function: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """Wall seconds and peak RSS growth (MiB) of one call (Linux: resets VmHWM)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    peak = (_rss_kib("VmHWM") - before) / 1024
    return seconds, peak, result


def knn_benchmark(repeats: int, k: int, temperature: float) -> None:
    from lightly.utils.benchmarking import knn_predict

    bank, bank_labels = clustered_features(50_000, seed=0)
    queries, query_labels = clustered_features(10_000, seed=1)

    def ours() -> torch.Tensor:
        classifier = KNNClassifier(ks=(k,), temperature=temperature)
        return classifier.fit(bank, bank_labels).predict(queries)[k][:, 0]

    def lightly() -> torch.Tensor:
        bank_t = F.normalize(bank, dim=1).T.contiguous()
        normalized = F.normalize(queries, dim=1)
        return torch.cat(
            [
                knn_predict(
                    normalized[start : start + 512],
                    bank_t,
                    bank_labels,
                    NUM_CLASSES,
                    knn_k=k,
                    knn_t=temperature,
                )[:, 0]
                for start in range(0, len(normalized), 512)
            ]
        )

    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "lightly": []}
    predictions = {}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, function in (("lightly", lightly), ("ours", ours)):
            seconds, peak, predictions[name] = measure(function)
            runs[name].append((seconds, peak))
    agreement = (predictions["ours"] == predictions["lightly"]).float().mean().item()
    accuracy = (predictions["ours"] == query_labels).float().mean().item()
    time_ours = statistics.median(s for s, _ in runs["ours"])
    time_lightly = statistics.median(s for s, _ in runs["lightly"])
    peak_ours = max(p for _, p in runs["ours"])
    peak_lightly = max(p for _, p in runs["lightly"])
    print(f"\n## kNN: 50,000 x {DIM} bank, 10,000 queries, k={k}, median of {repeats}")
    print("| method | time (s) | peak memory above inputs (MiB) |")
    print("| --- | ---: | ---: |")
    print(
        f"| lightly knn_predict (batch 512) | {time_lightly:.2f} | {peak_lightly:.0f} |"
    )
    print(f"| lightly_msn KNNClassifier (faiss) | {time_ours:.2f} | {peak_ours:.0f} |")
    # as in perf_components: the ratio within each round, where both sides saw the
    # same load, then its median
    round_ratio = statistics.median(
        lightly_run[0] / ours_run[0]
        for lightly_run, ours_run in zip(runs["lightly"], runs["ours"], strict=True)
    )
    print(
        f"speed-up {time_lightly / time_ours:.2f}x (ratio of medians; median of "
        f"per-round ratios {round_ratio:.2f}x), memory ratio "
        f"{peak_ours / peak_lightly:.2f}; top-1 agreement {100 * agreement:.2f} %, "
        f"top-1 accuracy {100 * accuracy:.1f} %"
    )


def few_shot_benchmark(seeds: int) -> None:
    train, train_labels = clustered_features(50_000, seed=2, separation=0.2)
    test, test_labels = clustered_features(10_000, seed=3, separation=0.2)
    shots = (1, 2, 5, 0.01)
    print(f"\n## few-shot: 50,000 x {DIM} train, 10,000 test, {seeds} seeds")
    print("| setting | labelled | top-1 (%) | fit + score time, all seeds (s) |")
    print("| --- | ---: | ---: | ---: |")
    total = 0.0
    for setting in shots:
        start = time.perf_counter()
        (result,) = few_shot_eval(
            train, train_labels, test, test_labels, [setting], seeds, progress=False
        )
        seconds = time.perf_counter() - start
        total += seconds
        print(
            f"| {result.name} | {result.num_labelled[0]} | {result.mean:.1f} ± "
            f"{result.std:.1f} | {seconds:.2f} |"
        )
    print(f"whole table: {total:.1f} s")
    solver_comparison(train, train_labels, test, test_labels, shots)


def solver_comparison(train, train_labels, test, test_labels, shots) -> None:  # noqa: ANN001
    from sklearn.linear_model import LogisticRegression

    train = preprocess_features(train)
    test = preprocess_features(test)
    lam = OFFICIAL_REGULARIZATION

    def objective(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> float:
        logits = x.double() @ weights.double().T
        loss = F.cross_entropy(logits, y, reduction="sum")
        return (loss + 0.5 * lam * weights.double().pow(2).sum()).item()

    def torch_lbfgs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fit_logistic_regression(x, y, NUM_CLASSES, lam)

    def sklearn_lbfgs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = LogisticRegression(C=1.0 / lam, fit_intercept=False, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x.numpy(), y.numpy())
        return torch.from_numpy(model.coef_).float()

    solvers = {"torch L-BFGS (ours)": torch_lbfgs, "scikit-learn lbfgs": sklearn_lbfgs}
    try:
        from cyanure.estimators import Classifier

        def cyanure_official(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # logistic_eval.py: lambd / n on the mean loss, tol 1e-3, 300 epochs
            model = Classifier(
                loss="multiclass-logistic",
                penalty="l2",
                fit_intercept=False,
                lambda_1=lam / len(x),
                tol=1e-3,
                max_iter=300,
                verbose=False,
            )
            model.fit(x.double().numpy(), y.numpy())
            return torch.from_numpy(model.get_weights().T).float()

        solvers["cyanure (official settings)"] = cyanure_official
    except ImportError:
        print("(cyanure not installed: pip install cyanure to compare it)")
    print("\n## logistic-regression solvers, same features, seed 0")
    print("| setting | solver | time (s) | objective | top-1 (%) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for setting in shots:
        indices = sample_few_shot(train_labels, setting, seed=0)
        x, y = train[indices], train_labels[indices]
        for name, solver in solvers.items():
            start = time.perf_counter()
            weights = solver(x, y)
            seconds = time.perf_counter() - start
            accuracy = (
                100 * ((test @ weights.T).argmax(1) == test_labels).float().mean()
            )
            print(
                f"| {setting} | {name} | {seconds:.3f} | {objective(x, y, weights):.4f}"
                f" | {accuracy:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-knn", action="store_true")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    if not args.skip_knn:
        knn_benchmark(args.repeats, k=200, temperature=0.1)
    few_shot_benchmark(args.seeds)


if __name__ == "__main__":
    main()
