"""Plot of few-shot accuracy against the number of labelled images per class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightly_msn.eval.fewshot import FewShotResult


def plot_few_shot(
    results: Sequence[FewShotResult],
    path: str | Path,
    title: str = "few-shot linear evaluation",
    knn_top1: float | None = None,
) -> Path:
    """Writes a PNG of mean +- std top-1 accuracy vs labelled images per class.

    Args:
        results:
            Output of ``few_shot_eval``.
        path:
            The PNG file to write (parent folders are created).
        knn_top1:
            Optionally drawn as a horizontal reference line (full-label kNN).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no few-shot results to plot")
    ordered = sorted(results, key=lambda result: result.labels_per_class)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.errorbar(
        [result.labels_per_class for result in ordered],
        [result.mean for result in ordered],
        yerr=[result.std for result in ordered],
        marker="o",
        capsize=3,
        label="logistic regression",
    )
    # settings with the same labels per class (e.g. "1" and "1%" on a small set)
    # share one annotation
    names: dict[float, list[str]] = {}
    for result in ordered:
        names.setdefault(result.labels_per_class, []).append(result.name)
    for result in ordered:
        if names[result.labels_per_class][0] != result.name:
            continue
        axis.annotate(
            ", ".join(names[result.labels_per_class]),
            (result.labels_per_class, result.mean),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    if knn_top1 is not None:
        axis.axhline(knn_top1, color="grey", linestyle="--", label="kNN, all labels")
    axis.set_xscale("log")
    axis.set_xticks(sorted(names), [f"{x:g}" for x in sorted(names)])
    axis.minorticks_off()
    axis.set_xlabel("labelled images per class")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
