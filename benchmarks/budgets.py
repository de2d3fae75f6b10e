"""Accuracy against budget: runs of one profile at several epoch counts, side by side.

Each run (``python -m benchmarks.run --set trainer.max_epochs=N --name ...``) has its
own table; this puts their records together, so that one can read where in compute
the methods' lines cross: ``budgets.md`` (each method's kNN and few-shot top-1 per
budget, ``msn`` minus each method on the same few-shot draws, where each gap
changes sign or is heading, and the compute ``msn`` needs to match each method) and
``budgets.png`` (kNN and few-shot top-1 against images seen, one line per method)::

    python -m benchmarks.budgets cpu-standard cpu-standard-2ep cpu-standard-4ep \\
        cpu-standard-8ep cpu-standard-16ep --name cpu-standard-budgets

The runs must differ in their epochs only: the rest of the profile (ViT, data,
evaluation, precision, seed) and each method's recipe are checked to be the same.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import results
from benchmarks.methods import method_sort_key
from benchmarks.run import RESULTS_DIR, profile_differences
from lightly_msn.files import atomic_write_text


def epochs_of(record: dict[str, Any]) -> int:
    return int(record["pretrain"]["epochs"])


def load_budgets(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """The records of ``run_dirs``, by method, then by epochs.

    Raises:
        ValueError: A run has no records, two runs train a method for the same
            number of epochs, or a run differs from another in more than epochs.
    """
    records: list[dict[str, Any]] = []
    first_seen: dict[str, tuple[Path, dict[str, Any]]] = {}
    seen_epochs: dict[tuple[str, int], Path] = {}
    for run_dir in map(Path, run_dirs):
        run_records = results.load_records(run_dir)
        if not run_records:
            raise ValueError(f"no benchmark records (*.json) in {run_dir}")
        for record in run_records:
            method, epochs = record["method"], epochs_of(record)
            if (method, epochs) in seen_epochs:
                raise ValueError(
                    f"{method} trained for {epochs} epochs in both "
                    f"{seen_epochs[method, epochs]} and {run_dir}"
                )
            seen_epochs[method, epochs] = run_dir
            first_dir, first = first_seen.setdefault(method, (run_dir, record))
            differences = profile_differences(
                first["config"], record["config"], method, ["trainer.max_epochs"]
            )
            if record.get("recipe") != first.get("recipe"):
                differences.append(
                    f"recipe: {first.get('recipe')} -> {record.get('recipe')}"
                )
            if differences:
                raise ValueError(
                    f"{results.record_path(run_dir, method)} differs from "
                    f"{first_dir}'s {method} in more than epochs "
                    f"({'; '.join(differences)})"
                )
            records.append(record)
    return sorted(records, key=lambda r: (method_sort_key(r["method"]), epochs_of(r)))


def images_seen(record: dict[str, Any]) -> int:
    return epochs_of(record) * int(record["pretrain"]["train_images"])


def budget_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`benchmarks.results.flatten` of each record: kNN (k = 20), few-shot."""
    settings = results.fewshot_settings(records)
    return [results.flatten(r, [str(results.STAGE_K)], settings) for r in records]


def budget_table(records: Sequence[dict[str, Any]]) -> str:
    """Each method's accuracy per budget: one row per method and epoch count."""
    settings = results.fewshot_settings(records)
    lines = results.table_head(
        ["method", "epochs", "images seen", "training (min)"]
        + [f"kNN k={results.STAGE_K}", "gain"]
        + [results.setting_label(s) for s in settings]
    )
    for record, row in zip(records, budget_rows(records), strict=True):
        gain = row["knn_gain"]
        cells = [
            row["method"],
            str(row["epochs"]),
            f"{images_seen(record):,}",
            results.format_number(row["pretrain_wall_time_s"] / 60, 0),
            results.format_number(row[f"knn_top1_k{results.STAGE_K}"]),
            "–" if gain is None else f"{gain:+.1f}",
        ] + [results.format_number(row[f"fewshot_{s}_mean"]) for s in settings]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_budget_table(
    records: Sequence[dict[str, Any]], reference: str = results.PAIRED_REFERENCE
) -> str | None:
    """``reference`` minus each method on the same few-shot draws, per budget.

    The rows of :func:`benchmarks.results.paired_table` for each epoch count, by
    method, then epochs; ``None`` when no budget has ``reference`` and another
    method.
    """
    settings = results.fewshot_settings(records)
    rows = [
        (method, epochs, cells)
        for epochs in sorted({epochs_of(r) for r in records})
        for method, cells in results.paired_rows(
            [r for r in records if epochs_of(r) == epochs], settings, reference
        )
    ]
    if not rows:
        return None
    rows.sort(key=lambda row: (method_sort_key(row[0]), row[1]))
    header = ["method", "epochs"] + [results.setting_label(s) for s in settings]
    lines = results.table_head(header)
    for method, epochs, cells in rows:
        lines.append("| " + " | ".join([method, str(epochs), *cells]) + " |")
    return "\n".join(lines) + "\n"


def measures(
    records: Sequence[dict[str, Any]], per_class_only: bool = False
) -> list[tuple[str, str]]:
    """``(flatten key, label)`` of kNN top-1 (k = 20) and the few-shot settings.

    ``per_class_only`` leaves out the settings not counted in labels per class
    (``"1%"``).
    """
    settings = results.fewshot_settings(records)
    if per_class_only:
        settings = [s for s in settings if not s.endswith("%")]
    knn = (f"knn_top1_k{results.STAGE_K}", f"kNN top-1, k={results.STAGE_K}")
    return [knn] + [
        (f"fewshot_{s}_mean", f"few-shot top-1, {results.setting_label(s)}")
        for s in settings
    ]


def rows_by_method(
    records: Sequence[dict[str, Any]],
) -> dict[str, dict[int, dict[str, Any]]]:
    """:func:`budget_rows` by method, then by epochs."""
    values: dict[str, dict[int, dict[str, Any]]] = {}
    for record, row in zip(records, budget_rows(records), strict=True):
        values.setdefault(record["method"], {})[epochs_of(record)] = row
    return values


PROJECTION_DOUBLINGS = 3  # how far past the largest budget a trend is projected


def gap_trend(epochs: Sequence[int], gaps: Sequence[float]) -> tuple[float, float]:
    """Least-squares line of the gap against ``log2(epochs)``: (slope, intercept).

    The slope is the change of the gap per doubling of the budget.
    """
    xs = [math.log2(e) for e in epochs]
    x_mean, y_mean = sum(xs) / len(xs), sum(gaps) / len(gaps)
    spread = sum((x - x_mean) ** 2 for x in xs)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, gaps, strict=True))
    slope /= spread
    return slope, y_mean - slope * x_mean


def crossing_verdict(
    epochs: Sequence[int], gaps: Sequence[float], reference: str
) -> str:
    """Where the lines of ``reference`` and another method cross, or would.

    Args:
        epochs: The budgets, ascending (at least two).
        gaps: ``reference`` minus the other method at each budget.
        reference: The name the verdict uses for the first method.

    Returns:
        The budget intervals where the gap changes sign; otherwise where the fitted
        trend (:func:`gap_trend`) reaches zero, when it heads there within
        ``PROJECTION_DOUBLINGS`` doublings of the largest budget.
    """
    signed = [(e, math.copysign(1, g)) for e, g in zip(epochs, gaps, strict=True) if g]
    if not signed:
        return "level at every budget"
    changes = [
        f"{e0} and {e1}"
        for (e0, s0), (e1, s1) in zip(signed, signed[1:], strict=False)
        if s0 != s1
    ]
    last = "level" if gaps[-1] == 0 else "ahead" if gaps[-1] > 0 else "behind"
    if changes:
        return f"cross between {', '.join(changes)} epochs; {reference} {last} after"
    side = signed[0][1]
    level = " or level" if len(signed) < len(gaps) else ""
    verdict = f"{reference} {'ahead' if side > 0 else 'behind'}{level} at every budget"
    slope, intercept = gap_trend(epochs, gaps)
    if slope == 0 or math.copysign(1, slope) == side:
        return f"{verdict}; not closing"
    horizon = epochs[-1] * 2**PROJECTION_DOUBLINGS
    log2_crossing = -intercept / slope
    if log2_crossing > math.log2(horizon):
        return f"{verdict}; closing, would cross beyond {horizon} epochs"
    return (
        f"{verdict}; would cross near {2**log2_crossing:.0f} epochs on the fitted trend"
    )


def crossing_table(
    records: Sequence[dict[str, Any]], reference: str = results.PAIRED_REFERENCE
) -> str | None:
    """``reference`` minus each method per budget and measure, and where they cross.

    One row per method and measure (kNN top-1, each few-shot mean), over the
    budgets both methods have; ``None`` without ``reference`` and another method
    sharing at least two budgets.
    """
    values = rows_by_method(records)
    if reference not in values:
        return None
    lines = results.table_head(
        ["method", "measure", "epochs", f"{reference} minus method"]
        + ["per doubling", "lines"]
    )
    header_length = len(lines)
    measured = measures(records)
    for method, by_epochs in values.items():
        if method == reference:
            continue
        for key, label in measured:
            epochs = [
                e
                for e in sorted(by_epochs)
                if e in values[reference]
                and by_epochs[e][key] is not None
                and values[reference][e][key] is not None
            ]
            if len(epochs) < 2:
                continue
            gaps = [values[reference][e][key] - by_epochs[e][key] for e in epochs]
            cells = [
                method,
                label,
                " / ".join(map(str, epochs)),
                " / ".join(f"{gap:+.1f}" for gap in gaps),
                f"{gap_trend(epochs, gaps)[0]:+.1f}",
                crossing_verdict(epochs, gaps, reference),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == header_length:
        return None
    return "\n".join(lines) + "\n"


def epochs_to_reach(
    curve: Sequence[tuple[int, float]], target: float
) -> tuple[str, float]:
    """The budget at which an accuracy curve first reaches ``target``.

    Args:
        curve: ``(epochs, accuracy)`` points, by epochs.
        target: The accuracy to reach.

    Returns:
        ``("", epochs)`` interpolated linearly in log epochs between the two points
        around the first crossing; ``("≤", smallest budget)`` when the curve starts
        at or above ``target``; ``(">", largest budget)`` when it never reaches it.
    """
    if curve[0][1] >= target:
        return "≤", float(curve[0][0])
    for (e0, v0), (e1, v1) in zip(curve, curve[1:], strict=False):
        if v0 < target <= v1:
            fraction = (target - v0) / (v1 - v0)
            return "", e0 * (e1 / e0) ** fraction
    return ">", float(curve[-1][0])


def compute_ratio_table(
    records: Sequence[dict[str, Any]], reference: str = results.PAIRED_REFERENCE
) -> str | None:
    """The compute ``reference`` needs to match each method at each of its budgets.

    A cell is the budget at which ``reference``'s line first reaches the method's
    accuracy (:func:`epochs_to_reach`), as a multiple of the method's budget; one
    row per method and measure, one column per budget. ``None`` without
    ``reference`` and another method.
    """
    values = rows_by_method(records)
    if reference not in values or len(values) < 2:
        return None
    others = {method: rows for method, rows in values.items() if method != reference}
    budgets = sorted({e for rows in others.values() for e in rows})
    measured = measures(records)
    curves = {
        key: [
            (e, row[key])
            for e, row in sorted(values[reference].items())
            if row[key] is not None
        ]
        for key, _ in measured
    }
    lines = results.table_head(["method", "measure"] + [f"{e} ep" for e in budgets])
    for method, by_epochs in others.items():
        for key, label in measured:
            curve = curves[key]
            cells = [method, label]
            for e in budgets:
                value = by_epochs.get(e, {}).get(key)
                if value is None or not curve:
                    cells.append("–")
                    continue
                bound, needed = epochs_to_reach(curve, value)
                cells.append(f"{bound}{needed / e:.1f}x")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_budgets(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """kNN top-1 and few-shot top-1 (per-class settings) against images seen.

    One panel per measure, one line per method, a logarithmic axis with a tick at
    each budget; the dashed line is the initialisation's kNN accuracy when all
    methods share it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = measures(records, per_class_only=True)
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(10, 3.5 * rows), squeeze=False)
    flat_rows = budget_rows(records)
    seen = [images_seen(r) for r in records]
    ticks = dict(zip(seen, (epochs_of(r) for r in records), strict=True))
    methods = sorted({r["method"] for r in records}, key=method_sort_key)
    for (key, label), axis in zip(panels, axes.flat, strict=False):
        for method in methods:
            points = [
                (x, row[key])
                for x, row in zip(seen, flat_rows, strict=True)
                if row["method"] == method and row[key] is not None
            ]
            if points:
                axis.plot(
                    *zip(*points, strict=True),
                    marker="o",
                    label=method,
                    color=results.method_color(method),
                )
        axis.set_xscale("log")
        axis.set_xticks(sorted(ticks), [f"{ticks[x]} ep\n{x:,}" for x in sorted(ticks)])
        axis.minorticks_off()
        axis.set_xlabel("images seen (epochs)")
        axis.set_ylabel(f"{label} (%)")
        axis.grid(True, alpha=0.3)
    initial = {row["knn_top1_init"] for row in flat_rows}
    if len(initial) == 1 and None not in initial:
        axes[0][0].axhline(
            initial.pop(), color="grey", linestyle="--", label="initialisation"
        )
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    axes[0][0].legend(fontsize="small")
    return results.save_figure(figure, path)


def summarize_budgets(run_dirs: Sequence[Path], out_dir: Path) -> str:
    """Writes ``budgets.md`` and ``budgets.png`` to ``out_dir``; returns the tables."""
    records = load_budgets(run_dirs)
    names = ", ".join(f"`{Path(d).name}`" for d in run_dirs)
    text = (
        f"Accuracy against budget, from the runs {names} (training minutes are "
        "each run's own: runs made on other days or machines differ in speed):\n\n"
        + budget_table(records)
    )
    paired = paired_budget_table(records)
    if paired is not None:
        text += (
            f"\nFew-shot top-1 of `{results.PAIRED_REFERENCE}` minus each method on "
            "the same draws, per budget (mean ± standard error, draws "
            f"`{results.PAIRED_REFERENCE}` wins):\n\n" + paired
        )
    crossings = crossing_table(records)
    if crossings is not None:
        text += (
            f"\nWhere the lines cross: `{results.PAIRED_REFERENCE}` minus each method "
            "per budget, the change of that gap per doubling of the budget (a "
            "least-squares line against log2 epochs) and where it changes sign, or "
            f"where the line would reach zero within {2**PROJECTION_DOUBLINGS}x the "
            "largest budget. Few-shot gaps of about one point are within the noise "
            "of the draws (standard errors in the table above):\n\n" + crossings
        )
    ratios = compute_ratio_table(records)
    if ratios is not None:
        text += (
            f"\nCompute `{results.PAIRED_REFERENCE}` needs to match each method: the "
            f"budget at which `{results.PAIRED_REFERENCE}`'s line first reaches the "
            "method's accuracy at each of its budgets (interpolated linearly in log "
            "epochs), as a multiple of that budget; ≤ when "
            f"`{results.PAIRED_REFERENCE}`'s smallest budget already reaches it, > "
            "when its largest does not:\n\n" + ratios
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "budgets.md", text)
    plot_budgets(records, out_dir / "budgets.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.budgets",
        description="Put runs of one profile at several budgets side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", help="run names (folders of --results-dir)")
    parser.add_argument(
        "--name", required=True, help="folder for budgets.md and budgets.png"
    )
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    try:
        text = summarize_budgets(
            [results_dir / run for run in args.runs], results_dir / args.name
        )
    except ValueError as error:
        parser.error(str(error))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
