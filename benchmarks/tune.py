"""Fair tuning of several methods: the same number of trials at the same budget.

A tuning plan (``benchmarks/configs/tuning-<name>.yaml``) names a profile, the
overrides that shorten its budget and carve a validation split out of the training
images (``data.validation_size``: the test set is never used), the selection
metric, an optional ``base`` recipe per method (the starting point of its trials;
the profile's own ``methods:`` entry, which may hold the winners, is not used), and
the trials of every method: recipe overrides, one dict per trial, the same number
for every method. A plan may ``extends:`` another plan: it takes that plan's
profile, metric and shortened budget, its own ``shorten`` merged over the budget,
but never its ``base`` or its trials, so that a check of a tuning's decisions runs
at the tuning's budget without copying it. Each trial pretrains and evaluates
through the benchmark harness (``benchmarks.run.pretrain_and_evaluate``) and is
logged in ``benchmarks/results/<run>/tuning/``:

- ``<method>-<trial>.json``: the trial's overrides, its score and its full record;
- ``trials.md`` / ``trials.csv``: every trial, method by method, best marked;
- ``winners.yaml``: the best overrides per method, the ``methods:`` section of the
  full profile.

Trials run one process each and are skipped when their log exists, so a tuning
run can be stopped and continued, and a plan can grow by new rounds of trials; a log
whose overrides are no longer the plan's trial is refused, never silently kept::

    nohup python -m benchmarks.tune --plan cpu-standard --no-progress \\
        > benchmarks/results/cpu-standard/tuning.log 2>&1 &

``--reevaluate`` scores the logged trials again from their last checkpoints when
the plan's evaluation settings change (more few-shot draws, say), so that every
trial is compared under the same ones; a trial already scored under them is left.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.methods import load_method
from benchmarks.methods.base import BenchmarkConfig
from benchmarks.run import PROFILES_DIR, RESULTS_DIR, load_profile, merge_profile
from lightly_msn.files import atomic_write_text

TUNING_DIR = "tuning"
METRICS = ("fewshot", "knn")


INHERITED = ("profile", "metric", "shorten")  # what ``extends:`` takes from a plan


def plan_path(plan: str) -> Path:
    """``benchmarks/configs/tuning-<plan>.yaml``, or ``plan`` itself if a file name."""
    path = Path(plan)
    if not path.suffix:
        path = PROFILES_DIR / f"tuning-{plan}.yaml"
    if not path.is_file():
        raise ValueError(f"no tuning plan {plan!r} ({path} does not exist)")
    return path


def read_plan(path: Path, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sections of the plan file ``path``, with what it ``extends:`` filled in."""
    path = path.resolve()
    if path in extended_by:
        chain = " -> ".join(p.name for p in (*extended_by, path))
        raise ValueError(f"tuning plans extend each other in a cycle: {chain}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"tuning plan {path} is not a mapping of sections")
    parent_name = values.pop("extends", None)
    if parent_name is None:
        return values
    parent = Path(str(parent_name))
    if parent.suffix and not parent.is_absolute():  # a file beside this plan
        parent = path.parent / parent
    parent_values = read_plan(plan_path(str(parent)), (*extended_by, path))
    inherited = {key: parent_values[key] for key in INHERITED if key in parent_values}
    shorten = merge_profile(inherited.get("shorten") or {}, values.get("shorten") or {})
    return {**inherited, **values, "shorten": shorten}


def load_plan(plan: str) -> dict[str, Any]:
    """The tuning plan ``benchmarks/configs/tuning-<plan>.yaml`` or a YAML file."""
    path = plan_path(plan)
    values = read_plan(path)
    missing = sorted({"profile", "shorten", "metric", "trials"} - set(values))
    if missing:
        raise ValueError(f"tuning plan {path} lacks {missing}")
    if values["metric"] not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {values['metric']!r}")
    counts = {method: len(trials) for method, trials in values["trials"].items()}
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"every method needs the same number of trials for a fair comparison, "
            f"got {counts}"
        )
    return values


def planned_overrides(plan: dict[str, Any], method: str, index: int) -> dict[str, Any]:
    """The recipe overrides the plan gives one trial (``{}`` for an empty entry)."""
    return dict(plan["trials"][method][index] or {})


def trial_config(plan: dict[str, Any], method: str, index: int) -> BenchmarkConfig:
    """The benchmark config of one trial: profile, shortened, with its overrides."""
    profile = merge_profile(load_profile(plan["profile"]), plan["shorten"])
    if not profile.get("data", {}).get("validation_size"):
        raise ValueError(
            "a tuning plan must hold out a validation split (shorten.data."
            "validation_size): the test set is never used for tuning"
        )
    overrides = planned_overrides(plan, method, index)
    methods = dict(profile.get("methods") or {})
    # the profile's own entry for the method may hold a tuning's winners: a trial
    # starts from the plan's base recipe instead, so that a plan always reruns alike
    base = dict((plan.get("base") or {}).get(method) or {})
    methods[method] = {**base, **overrides}
    config = BenchmarkConfig.from_profile({**profile, "methods": methods})
    config.recipe(method, load_method(method).defaults)  # fail early on a typo
    return config


def score(record: dict[str, Any], metric: str) -> float:
    """The selection score of a record: mean few-shot top-1, or kNN top-1 (k = 20)."""
    if metric == "knn":
        return float(record["knn"]["20"]["top1"])
    means = [
        entry["mean"] for entry in record["fewshot"] if "%" not in entry["setting"]
    ]
    if not means:
        raise ValueError("the few-shot metric needs per-class few-shot settings")
    return float(sum(means) / len(means))


def trial_log(tuning_dir: Path, method: str, index: int) -> Path:
    return tuning_dir / f"{method}-{index}.json"


def is_logged(tuning_dir: Path, plan: dict[str, Any], method: str, index: int) -> bool:
    """Whether the trial has a log; raises if it ran other overrides than the plan's.

    A log is kept only while the plan still asks for what it ran, so that editing a
    plan's trial never leaves the old trial's score in the table under the new name.
    """
    path = trial_log(tuning_dir, method, index)
    if not path.is_file():
        return False
    logged = json.loads(path.read_text())["overrides"]
    planned = json.loads(json.dumps(planned_overrides(plan, method, index)))
    if logged != planned:
        raise ValueError(
            f"{path} ran {logged}, but the plan's {method} trial {index} is {planned}: "
            "append new trials to the plan instead of editing logged ones, or delete "
            "the log to run the trial again"
        )
    return True


def trial_run_dir(tuning_dir: Path, method: str, index: int) -> Path:
    """Where a trial trains: its checkpoints and its benchmark record."""
    return tuning_dir / "runs" / f"{method}-{index}"


def write_trial_log(
    tuning_dir: Path,
    method: str,
    index: int,
    overrides: dict[str, Any],
    record: dict[str, Any],
    metric: str,
) -> Path:
    """Writes one trial's overrides, score and record."""
    log = {
        "method": method,
        "trial": index,
        "overrides": overrides,
        "metric": metric,
        "score": score(record, metric),
        "record": record,
    }
    path = trial_log(tuning_dir, method, index)
    return atomic_write_text(path, json.dumps(log, indent=2, sort_keys=True) + "\n")


def load_trial_logs(tuning_dir: Path) -> list[dict[str, Any]]:
    logs = [json.loads(path.read_text()) for path in sorted(tuning_dir.glob("*.json"))]
    return sorted(logs, key=lambda log: (log["method"], log["trial"]))


def summarize_tuning(tuning_dir: Path) -> str:
    """Writes ``trials.md``, ``trials.csv`` and ``winners.yaml``; returns the table."""
    logs = load_trial_logs(tuning_dir)
    if not logs:
        raise ValueError(f"no trial logs in {tuning_dir}")
    best: dict[str, dict[str, Any]] = {}
    for log in logs:
        current = best.get(log["method"])
        if current is None or log["score"] > current["score"]:
            best[log["method"]] = log
    lines = [
        "| method | trial | overrides | score | kNN k=20 | few-shot 1 / 2 / 5 "
        "per class | img/s |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    rows = []
    for log in logs:
        record = log["record"]
        fewshot = {e["setting"]: e["mean"] for e in record["fewshot"]}
        shots = " / ".join(f"{fewshot[s]:.1f}" for s in ("1", "2", "5") if s in fewshot)
        winner = best[log["method"]] is log
        overrides = json.dumps(log["overrides"], sort_keys=True) or "{}"
        score_text = f"{log['score']:.2f}"
        lines.append(
            f"| {log['method']} | {log['trial']} | `{overrides}` | "
            f"{'**' + score_text + '**' if winner else score_text} | "
            f"{record['knn']['20']['top1']:.1f} | {shots} | "
            f"{record['pretrain']['images_per_s']:.0f} |"
        )
        rows.append(
            {
                "method": log["method"],
                "trial": log["trial"],
                "overrides": overrides,
                "metric": log["metric"],
                "score": log["score"],
                "winner": winner,
            }
        )
    table = "\n".join(lines) + "\n"
    atomic_write_text(tuning_dir / "trials.md", table)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(tuning_dir / "trials.csv", buffer.getvalue())
    winners = {method: log["overrides"] for method, log in sorted(best.items())}
    atomic_write_text(tuning_dir / "winners.yaml", yaml.safe_dump(winners))
    return table


def run_trial(
    plan: dict[str, Any], method: str, index: int, run_dir: Path, progress: bool
) -> Path:
    """Pretrains and evaluates one trial in this process; writes its log."""
    from benchmarks.run import pretrain_and_evaluate

    config = trial_config(plan, method, index)
    tuning_dir = run_dir / TUNING_DIR
    trial_dir = trial_run_dir(tuning_dir, method, index)
    record = pretrain_and_evaluate(config, method, trial_dir, progress=progress)
    if record is None:  # not the global-zero rank
        return trial_log(tuning_dir, method, index)
    return write_trial_log(
        tuning_dir,
        method,
        index,
        planned_overrides(plan, method, index),
        record,
        plan["metric"],
    )


def reevaluate_trials(
    plan: dict[str, Any], run_dir: Path, methods: Sequence[str], progress: bool
) -> list[Path]:
    """Scores the logged trials of ``methods`` again under the plan's evaluation.

    Each trial's last checkpoint is evaluated with the plan's current
    ``benchmark.{fewshot_seeds, fewshot, knn_ks}`` (``benchmarks.run.reevaluate``,
    which refuses any other change), and its log is rewritten. Trials already
    scored under these settings, and trials not yet run, are left as they are.
    Returns the rewritten logs.
    """
    from benchmarks.run import reevaluate

    tuning_dir = run_dir / TUNING_DIR
    rewritten = []
    for method in methods:
        for index, overrides in enumerate(plan["trials"][method]):
            path = trial_log(tuning_dir, method, index)
            if not path.is_file():
                continue
            config = trial_config(plan, method, index)
            scored_under = json.loads(path.read_text())["record"]["config"]
            if scored_under == json.loads(json.dumps(config.to_dict())):
                continue
            trial_dir = trial_run_dir(tuning_dir, method, index)
            record = reevaluate(config, method, trial_dir, progress)
            log = write_trial_log(
                tuning_dir, method, index, dict(overrides or {}), record, plan["metric"]
            )
            rewritten.append(log)
    return rewritten


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tune",
        description="Tune several methods with the same number of trials.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--plan", required=True, help="a tuning plan name or file")
    parser.add_argument(
        "--methods", default=None, help="comma separated; default: all in the plan"
    )
    parser.add_argument("--name", default=None, help="run name; default: the plan's")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--trial", default=None, help="run one trial METHOD:INDEX in this process"
    )
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="score the logged trials again from their checkpoints under the plan's "
        "evaluation settings, instead of running trials",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (for log files)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = load_plan(args.plan)
    run_dir = Path(args.results_dir) / (args.name or plan["profile"])
    progress = not args.no_progress
    if not progress:  # also the data checks' bars, in the processes started below
        os.environ["TQDM_DISABLE"] = "1"
    if args.trial is not None:
        method, _, index = args.trial.partition(":")
        run_trial(plan, method, int(index), run_dir, progress)
        return 0
    methods = (
        list(plan["trials"])
        if args.methods is None
        else [m.strip() for m in args.methods.split(",") if m.strip()]
    )
    logged = set()
    for method in methods:  # fail early on a bad trial or a stale log
        for index in range(len(plan["trials"][method])):
            trial_config(plan, method, index)
            if is_logged(run_dir / TUNING_DIR, plan, method, index):
                logged.add((method, index))
    if args.reevaluate:
        for path in reevaluate_trials(plan, run_dir, methods, progress):
            print(f"[tune] {path.stem}: scored again", flush=True)
        print(summarize_tuning(run_dir / TUNING_DIR), flush=True)
        return 0
    failed = []
    count = len(plan["trials"][methods[0]])
    for index in range(count):  # round-robin: every method gets trial i, then i + 1
        for method in methods:
            if (method, index) in logged:
                print(f"[tune] {method}-{index}: logged, skipped", flush=True)
                continue
            print(
                f"[tune] {method}-{index}: {plan['trials'][method][index]}", flush=True
            )
            command = [
                sys.executable, "-m", "benchmarks.tune", "--plan", args.plan,
                "--name", run_dir.name, "--results-dir", str(run_dir.parent),
                "--trial", f"{method}:{index}",
            ]  # fmt: skip
            if not progress:
                command.append("--no-progress")
            if subprocess.run(command, check=False).returncode != 0:
                failed.append(f"{method}-{index}")
    print(summarize_tuning(run_dir / TUNING_DIR), flush=True)
    if failed:
        print(f"[tune] failed trials: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
