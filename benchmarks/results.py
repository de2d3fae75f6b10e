"""Benchmark results: one JSON record per method, a CSV, a Markdown table, plots.

A record (written by ``benchmarks.run``) is a dict with the keys

- ``method``, ``run``, ``config``, ``recipe``, ``hardware``;
- ``pretrain``: ``epochs``, ``steps``, ``train_images``, ``wall_time_s``,
  ``images_per_s``, ``peak_memory_mb``, ``memory_kind`` (``"rss"`` or ``"gpu"``),
  ``final_loss``;
- ``knn``: ``{k: {"top1", "top5"}}`` in percent;
- ``fewshot``: a list of ``{"setting", "labels_per_class", "mean", "std",
  "accuracies"}`` (top-1 percent over the few-shot draws);
- ``retrieval``: ``{"mean_average_precision_at_r", "precision_at_1",
  "r_precision"}`` in percent;
- ``knn_curve``: ``[{"epoch", "top1"}]``, epoch 0 being the initialisation.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.methods import METHOD_ORDER, method_sort_key
from lightly_msn.files import atomic_path, atomic_write_text

RECORD_SUFFIX = ".json"
STAGE_K = 20  # the k of the kNN accuracy measured during training
NOT_RECORDS = frozenset({"summary.json"})
PAIRED_REFERENCE = "msn"  # the method the paired few-shot table compares against


def record_path(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / f"{method}{RECORD_SUFFIX}"


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """Writes ``run_dir/<method>.json`` atomically (a crash leaves the old file)."""
    if "method" not in record:
        raise ValueError("a benchmark record needs a 'method' key")
    path = record_path(run_dir, record["method"])
    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """All method records of a run, in table order."""
    records = [
        json.loads(path.read_text())
        for path in sorted(Path(run_dir).glob(f"*{RECORD_SUFFIX}"))
        if path.name not in NOT_RECORDS
    ]
    return sorted(records, key=lambda record: method_sort_key(record["method"]))


def fewshot_settings(records: Sequence[dict[str, Any]]) -> list[str]:
    """The few-shot settings present in any record, in first-seen order."""
    settings: list[str] = []
    for record in records:
        for entry in record.get("fewshot", []):
            if entry["setting"] not in settings:
                settings.append(entry["setting"])
    return settings


def knn_ks(records: Sequence[dict[str, Any]]) -> list[str]:
    ks: list[str] = []
    for record in records:
        for k in record.get("knn", {}):
            if k not in ks:
                ks.append(k)
    return sorted(ks, key=int)


def flatten(
    record: dict[str, Any], ks: Sequence[str], settings: Sequence[str]
) -> dict[str, Any]:
    """One CSV / table row of a record; missing values are ``None``."""
    pretrain = record.get("pretrain", {})
    fewshot = {entry["setting"]: entry for entry in record.get("fewshot", [])}
    row: dict[str, Any] = {"method": record["method"]}
    for k in ks:
        row[f"knn_top1_k{k}"] = record.get("knn", {}).get(k, {}).get("top1")
    for setting in settings:
        entry = fewshot.get(setting, {})
        row[f"fewshot_{setting}_mean"] = entry.get("mean")
        row[f"fewshot_{setting}_std"] = entry.get("std")
    row["map_at_r"] = record.get("retrieval", {}).get("mean_average_precision_at_r")
    initial = initial_knn(record)
    row["knn_top1_init"] = initial
    final = row.get(f"knn_top1_k{STAGE_K}")
    row["knn_gain"] = None if initial is None or final is None else final - initial
    row["epochs"] = pretrain.get("epochs")
    row["pretrain_wall_time_s"] = pretrain.get("wall_time_s")
    row["images_per_s"] = pretrain.get("images_per_s")
    row["peak_memory_mb"] = pretrain.get("peak_memory_mb")
    row["memory_kind"] = pretrain.get("memory_kind")
    return row


def initial_knn(record: dict[str, Any]) -> float | None:
    """kNN top-1 (k = 20) of the initialisation on the final bank and test set.

    Known when the run measured its progress on the full sets (``stages``); the
    per-epoch monitor uses smaller sets, whose numbers are not comparable.
    """
    if record.get("knn_curve_sets") != "bank":
        return None
    for point in record.get("knn_curve", []):
        if point["step"] == 0:
            return float(point["top1"])
    return None


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> Path:
    ks, settings = knn_ks(records), fewshot_settings(records)
    rows = [flatten(record, ks, settings) for record in records]
    with atomic_path(path) as temporary, temporary.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_number(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _best(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def setting_label(setting: str) -> str:
    """A few-shot column's name: ``"5 per class"`` or ``"1% labelled"``."""
    return f"{setting} {'labelled' if setting.endswith('%') else 'per class'}"


def table_head(header: Sequence[str]) -> list[str]:
    """A Markdown table's header and alignment lines (numbers right-aligned)."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One Markdown table: accuracies (best in bold), retrieval, time, memory.

    Few-shot cells are ``mean ± std`` over the draws; accuracies and MAP@R are
    percentages.
    """
    ks, settings = knn_ks(records), fewshot_settings(records)
    rows = [flatten(record, ks, settings) for record in records]
    memory_kinds = {row["memory_kind"] for row in rows if row["memory_kind"]}
    memory = "GPU" if memory_kinds == {"gpu"} else "RSS"
    with_init = any(row["knn_top1_init"] is not None for row in rows)
    header = (
        ["method"]
        + ([f"kNN k={STAGE_K} at init", "gain"] if with_init else [])
        + [f"kNN k={k}" for k in ks]
        + [setting_label(s) for s in settings]
        + ["MAP@R", "pretrain (min)", "img/s", f"peak {memory} (MB)"]
    )
    accuracy_columns = [f"knn_top1_k{k}" for k in ks] + [
        f"fewshot_{s}_mean" for s in settings
    ]
    best = {
        column: _best([row[column] for row in rows])
        for column in [*accuracy_columns, "map_at_r"]
    }

    def cell(row: dict[str, Any], column: str, text: str) -> str:
        value = row[column]
        return f"**{text}**" if value is not None and value == best[column] else text

    lines = table_head(header)
    for row in rows:
        cells = [row["method"]]
        if with_init:
            gain = row["knn_gain"]
            cells += [
                format_number(row["knn_top1_init"]),
                "–" if gain is None else f"{gain:+.1f}",
            ]
        cells += [
            cell(row, f"knn_top1_k{k}", format_number(row[f"knn_top1_k{k}"]))
            for k in ks
        ]
        for setting in settings:
            mean, std = row[f"fewshot_{setting}_mean"], row[f"fewshot_{setting}_std"]
            text = (
                f"{format_number(mean)} ± {format_number(std)}"
                if mean is not None
                else "–"
            )
            cells.append(cell(row, f"fewshot_{setting}_mean", text))
        cells.append(cell(row, "map_at_r", format_number(row["map_at_r"])))
        wall = row["pretrain_wall_time_s"]
        cells.append(format_number(None if wall is None else wall / 60))
        cells.append(format_number(row["images_per_s"], 0))
        cells.append(format_number(row["peak_memory_mb"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _stage_percent(point: dict[str, Any], last: dict[str, Any]) -> int:
    return round(100 * point["step"] / last["step"]) if last["step"] else 100


def _stage_shots_label(staged: Sequence[dict[str, Any]]) -> str:
    """``"5 per class"`` when all staged records measured the same few-shot setting."""
    shots = {r["config"]["benchmark"]["stage_shots"] for r in staged if "config" in r}
    return f"{shots.pop()} per class" if len(shots) == 1 else "few-shot"


def stage_table(records: Sequence[dict[str, Any]]) -> str | None:
    """Accuracy against compute: one row per method, one column per budget stage.

    kNN top-1 (k = 20) and few-shot top-1 at the stages' labels per class, measured
    at the initialisation, at each stage and at the end, plus the training minutes
    (measurements excluded) to reach each stage. ``None`` without staged curves.
    """
    staged = [r for r in records if r.get("knn_curve_sets") == "bank"]
    if not staged:
        return None
    points_by_percent = [
        {_stage_percent(p, r["knn_curve"][-1]): p for p in r["knn_curve"]}
        for r in staged
    ]
    percents = sorted({percent for points in points_by_percent for percent in points})
    shots_label = _stage_shots_label(staged)
    header = (
        ["method"]
        + [f"kNN k={STAGE_K} at {p} %" for p in percents]
        + [f"{shots_label} at {p} %" for p in percents]
        + ["training min at " + " / ".join(f"{p}" for p in percents if p) + " %"]
    )
    lines = table_head(header)
    for record, by_percent in zip(staged, points_by_percent, strict=True):
        points = [by_percent.get(p, {}) for p in percents]
        minutes = [
            format_number(point["train_seconds"] / 60) if point else "–"
            for percent, point in zip(percents, points, strict=True)
            if percent
        ]
        lines.append(
            "| "
            + " | ".join(
                [record["method"]]
                + [format_number(point.get("top1")) for point in points]
                + [format_number(point.get("fewshot_top1")) for point in points]
                + [" / ".join(minutes)]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def paired_cell(reference: Sequence[float], other: Sequence[float]) -> str:
    differences = [a - b for a, b in zip(reference, other, strict=False)]
    n = len(differences)
    if n == 0:
        return "–"
    mean = sum(differences) / n
    wins = sum(d > 0 for d in differences)
    if n == 1:
        return f"{mean:+.1f} ({wins}/1)"
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return f"{mean:+.1f} ± {math.sqrt(variance / n):.1f} ({wins}/{n})"


def paired_rows(
    records: Sequence[dict[str, Any]],
    settings: Sequence[str],
    reference: str = PAIRED_REFERENCE,
) -> list[tuple[str, list[str]]]:
    """Each other method with its :func:`paired_cell` per few-shot setting.

    Empty without ``reference`` or another method among ``records``.
    """
    draws = {
        record["method"]: {
            e["setting"]: e["accuracies"] for e in record.get("fewshot", [])
        }
        for record in records
    }
    if reference not in draws:
        return []
    return [
        (
            method,
            [
                paired_cell(draws[reference].get(s, []), accuracies.get(s, []))
                for s in settings
            ],
        )
        for method, accuracies in draws.items()
        if method != reference
    ]


def paired_table(
    records: Sequence[dict[str, Any]], reference: str = PAIRED_REFERENCE
) -> str | None:
    """Few-shot top-1 of ``reference`` minus each other method, draw by draw.

    Within a run every method is scored on the same labelled draws (draw ``i`` picks
    the same images for all), so the per-draw difference cancels how easy each draw
    is, which dominates the spread of the means. A cell is the mean difference ±
    its standard error over the draws both records have (the draws are nested: the
    first 3 of 10 are the 3 of a 3-draw evaluation), then the draws ``reference``
    wins. ``None`` without ``reference`` or another method.
    """
    settings = fewshot_settings(records)
    rows = paired_rows(records, settings, reference)
    if not rows:
        return None
    lines = table_head(["method"] + [setting_label(s) for s in settings])
    for method, cells in rows:
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines) + "\n"


def method_color(method: str) -> str | None:
    """The method's colour in every plot (``None``: the next one of the cycle).

    Fixed by the method's place in the table order, so that a method keeps its
    colour across runs that benchmark different sets of methods.
    """
    if method in METHOD_ORDER:
        return f"C{METHOD_ORDER.index(method)}"
    return None


def save_figure(figure: Any, path: Path) -> Path:
    """Writes a Matplotlib figure as PNG atomically and closes it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)
    return path


def _save_plot(
    path: Path,
    series: Sequence[tuple[str, list[float], list[float], list[float] | None]],
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
) -> Path:
    """Writes a line plot of ``(label, x, y, y error or None)`` series as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, x, y, error in series:
        axes.errorbar(
            x,
            y,
            yerr=error,
            marker="o",
            capsize=3,
            label=label,
            color=method_color(label),
        )
    if log_x:
        axes.set_xscale("log")
        ticks = sorted({value for _, x, _, _ in series for value in x})
        axes.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
        axes.minorticks_off()
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def plot_fewshot(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Few-shot top-1 (mean ± std) against labelled images per class."""
    series = []
    for record in records:
        entries = sorted(record.get("fewshot", []), key=lambda e: e["labels_per_class"])
        if entries:
            series.append(
                (
                    record["method"],
                    [e["labels_per_class"] for e in entries],
                    [e["mean"] for e in entries],
                    [e["std"] for e in entries],
                )
            )
    return _save_plot(
        path, series, "labelled images per class", "few-shot top-1 (%)", log_x=True
    )


def plot_knn_curves(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """kNN top-1 on the monitoring bank against the epoch (0 = initialisation).

    ``None`` (no file) when no record has a per-epoch monitor curve: staged runs
    plot their curves in ``progress.png``.
    """
    series = [
        (
            record["method"],
            [point["epoch"] for point in record["knn_curve"]],
            [point["top1"] for point in record["knn_curve"]],
            None,
        )
        for record in records
        if record.get("knn_curve") and record.get("knn_curve_sets") != "bank"
    ]
    if not series:
        return None
    return _save_plot(path, series, "epoch", "kNN top-1 (%), monitoring bank")


def plot_progress(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy against training wall time and against images seen, per method.

    Two rows (kNN top-1 with k = 20, few-shot top-1 at the stages' labels per class)
    and two columns (minutes of training, measurements excluded; images seen), one
    line per method, from the staged curves; ``None`` without staged curves.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    staged = [r for r in records if r.get("knn_curve_sets") == "bank"]
    if not staged:
        return None
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    rows = [
        ("top1", f"kNN top-1 (%), k={STAGE_K}"),
        ("fewshot_top1", f"few-shot top-1 (%), {_stage_shots_label(staged)}"),
    ]
    columns = [
        ("train_seconds", "training wall time (min)", 1 / 60),
        ("images_seen", "images seen", 1.0),
    ]
    for (key, ylabel), row_axes in zip(rows, axes, strict=True):
        for (x_key, xlabel, scale), axis in zip(columns, row_axes, strict=True):
            for record in staged:
                points = [p for p in record["knn_curve"] if key in p]
                axis.plot(
                    [p[x_key] * scale for p in points],
                    [p[key] for p in points],
                    marker="o",
                    label=record["method"],
                    color=method_color(record["method"]),
                )
            axis.set_xlabel(xlabel)
            axis.set_ylabel(ylabel)
            axis.grid(True, alpha=0.3)
    for axis in axes[:, 1]:
        axis.xaxis.set_major_formatter(EngFormatter())  # 200k, not 200000
    axes[0][0].legend(fontsize="small")
    return save_figure(figure, path)


def summarize(run_dir: Path) -> str:
    """Writes ``results.csv``, ``results.md`` and the plots; returns the table."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    if not records:
        raise ValueError(f"no benchmark records (*.json) in {run_dir}")
    table = markdown_table(records)
    stages = stage_table(records)
    if stages is not None:
        table += "\nAccuracy against compute (`progress.png`):\n\n" + stages
    paired = paired_table(records)
    if paired is not None:
        table += (
            f"\nFew-shot top-1 of `{PAIRED_REFERENCE}` minus each method on the same "
            f"draws (mean ± standard error, draws `{PAIRED_REFERENCE}` wins):\n\n"
            + paired
        )
    atomic_write_text(run_dir / "results.md", table)
    write_csv(records, run_dir / "results.csv")
    plot_fewshot(records, run_dir / "fewshot.png")
    plot_knn_curves(records, run_dir / "knn_curve.png")
    plot_progress(records, run_dir / "progress.png")
    return table
