"""Pretrain every method under the same budget, evaluate it, and tabulate the results.

Examples::

    # all methods on a CIFAR-10 subset on CPU (about 45 minutes on 2 cores)
    python -m benchmarks.run --profile cpu-quick

    # two methods, one epoch, into benchmarks/results/smoke/
    python -m benchmarks.run --profile cpu-quick --methods msn,dino --name smoke \\
        --set trainer.max_epochs=1 data.train_subset=1000

    # ViT-S/16 on ImageNet-1k, 8 GPUs x 2 nodes, bf16 (see benchmarks/README.md)
    python -m benchmarks.run --profile imagenet-vits16 \\
        --set data.dataset=/data/imagenet

A profile (``benchmarks/configs/<name>.yaml``) has the sections of ``lightly-msn
pretrain --config`` files (``trainer``, ``data``) plus ``vit``, ``benchmark`` and
``methods`` (see :class:`benchmarks.methods.base.BenchmarkConfig`). Each method runs
in its own process (so its peak memory is its own and a crash does not stop the
others), trains into ``benchmarks/results/<run>/<method>/`` (metrics and a
checkpoint after every epoch: an interrupted method continues from it) and writes
``benchmarks/results/<run>/<method>.json``; the run's table (``results.md``,
``results.csv``) and plots are written at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.data import Dataset

from benchmarks import results
from benchmarks.evaluate import ProgressEvaluation, embed_method, evaluation_record
from benchmarks.methods import available_methods, load_method
from benchmarks.methods.base import SECTIONS, BenchmarkConfig
from benchmarks.results import STAGE_K
from lightly_msn.data import (
    TransformedSubset,
    balanced_indices,
    build_dataset,
    dataset_labels,
    eval_transform,
    training_indices,
    validation_indices,
)
from lightly_msn.eval.fewshot import parse_shots
from lightly_msn.eval.protocols import FeatureEvaluation, evaluate_features
from lightly_msn.files import atomic_write_text
from lightly_msn.train import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    prepare_output_dir,
    run_trainer_arguments,
)

BENCHMARKS_DIR = Path(__file__).resolve().parent
PROFILES_DIR = BENCHMARKS_DIR / "configs"
RESULTS_DIR = BENCHMARKS_DIR / "results"
PROFILE_SUFFIX = ".yaml"


def load_profile(profile: str) -> dict[str, Any]:
    """The sections of ``benchmarks/configs/<profile>.yaml`` or of a YAML file."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile}{PROFILE_SUFFIX}"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILES_DIR.glob(f"*{PROFILE_SUFFIX}"))
        raise ValueError(f"no profile {profile!r}; available profiles: {names}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"profile {path} is not a mapping of sections")
    return values


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["trainer.max_epochs=2", "data.dataset=/x"]`` -> nested sections.

    Values are read as YAML (``2`` is a number, ``[1, 5]`` a list, ``null`` None).
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not separator or not section:
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {pair!r}")
        parsed = yaml.safe_load(value) if value else None
        if not dot:
            overrides[section] = parsed
            continue
        target = overrides.setdefault(section, {})
        parts = name.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = parsed
    return overrides


def merge_profile(profile: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``profile`` with ``overrides`` merged in, section by section (recursively)."""
    merged = dict(profile)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_profile(merged[key], value)
        else:
            merged[key] = value
    return merged


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def hardware_description() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak GPU memory allocated, or the peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "gpu"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"


def evaluation_transform(config: BenchmarkConfig) -> Callable[[Any], Tensor]:
    """The package's evaluation transform at the run's size and statistics.

    Images above 64 px are resized to 256/224 of the crop first (ImageNet's
    convention); small images keep their size.
    """
    img_size = config.img_size
    resize = img_size if img_size <= 64 else img_size * 256 // 224
    return eval_transform(img_size, config.normalize, resize=resize)


def evaluation_sets(config: BenchmarkConfig) -> dict[str, Dataset]:
    """The labelled bank, test set and monitor sets, with the evaluation transform.

    With ``data.validation_size`` (tuning) the "test" images are the validation
    images held out of the training split, and the bank is drawn from the other
    training images: the test split is not read.
    """
    dataset, data_dir = (
        config.data.get("dataset", "digits"),
        config.data.get("data_dir"),
    )
    validation_size = config.data.get("validation_size")
    train = build_dataset(dataset, "train", data_dir=data_dir, img_size=config.img_size)
    train_labels = dataset_labels(train)
    if validation_size:
        scored, scored_labels = train, train_labels
        scored_pool = np.asarray(validation_indices(train_labels, validation_size))
    else:
        scored = build_dataset(
            dataset, "test", data_dir=data_dir, img_size=config.img_size
        )
        scored_labels = dataset_labels(scored)
        scored_pool = np.arange(len(scored_labels))
    pool_labels = scored_labels[scored_pool]
    to_tensor = evaluation_transform(config)

    def bank(size: int | None, seed_offset: int) -> Dataset:
        seed = config.seed + seed_offset
        indices = training_indices(train_labels, size, seed, validation_size)
        return TransformedSubset(train, indices, to_tensor)

    def test(size: int | None, seed_offset: int) -> Dataset:
        chosen = balanced_indices(pool_labels, size, config.seed + seed_offset)
        return TransformedSubset(scored, scored_pool[chosen].tolist(), to_tensor)

    sets = {
        "bank": bank(config.bank_subset, 1),
        "test": test(config.test_subset, 2),
    }
    if config.stages is None and config.monitor_bank > 0 and config.monitor_test > 0:
        sets["monitor_bank"] = bank(config.monitor_bank, 3)
        sets["monitor_test"] = test(config.monitor_test, 4)
    return sets


def progress_callback(
    config: BenchmarkConfig, sets: dict[str, Dataset]
) -> ProgressEvaluation | None:
    """The accuracy-during-training callback of a run, if its profile asks for one.

    ``benchmark.stages`` (fractions of the budget) measures kNN and few-shot on the
    full bank and test set at those points (and at the initialisation); otherwise
    ``monitor_bank`` / ``monitor_test`` measure kNN on small sets after every
    epoch.
    """
    if config.stages is not None:
        return ProgressEvaluation(
            sets["bank"],
            sets["test"],
            k=STAGE_K,
            fractions=config.stages,
            shots=config.stage_shots,
            seeds=config.fewshot_seeds,
            global_batch_size=config.global_batch_size,
        )
    if "monitor_bank" in sets:
        return ProgressEvaluation(
            sets["monitor_bank"],
            sets["monitor_test"],
            k=min(STAGE_K, config.monitor_bank),
            global_batch_size=config.global_batch_size,
        )
    return None


def final_stage(
    evaluation: FeatureEvaluation,
    trainer: Trainer,
    config: BenchmarkConfig,
    train_seconds: float,
    images_seen: int,
) -> dict[str, float]:
    """The 100 % point of the staged curve, read off the final evaluation."""
    point = {
        "epoch": trainer.current_epoch,
        "step": trainer.global_step,
        "images_seen": images_seen,
        "train_seconds": train_seconds,
        "top1": evaluation.knn[STAGE_K]["top1"],
    }
    setting = str(config.stage_shots)
    for result in evaluation.fewshot:
        if result.name == setting:
            point["fewshot_top1"] = result.mean
    return point


def evaluate_method(
    method: Any,
    sets: dict[str, Dataset],
    config: BenchmarkConfig,
    progress: bool = True,
) -> FeatureEvaluation:
    """kNN, few-shot and retrieval scores of a method's frozen features."""
    return evaluate_features(
        embed_method(method, sets["bank"], progress=progress),
        embed_method(method, sets["test"], progress=progress),
        knn_ks=config.knn_ks,
        shots=parse_shots(",".join(config.fewshot)),
        seeds=config.fewshot_seeds,
        progress=progress,
    )


def pretrain_and_evaluate(
    config: BenchmarkConfig, method_name: str, run_dir: Path, progress: bool = True
) -> dict[str, Any] | None:
    """Pretrains one method, evaluates it and writes ``run_dir/<method>.json``.

    The method trains with the package's training path (its data module and the
    run directory ``run_dir/<method>/``: metrics, atomic checkpoints after every
    epoch, the device choices shared by all methods). A method whose run was
    interrupted continues from its last checkpoint.

    Returns the record on the global-zero rank, ``None`` on the other ranks.
    """
    seed_everything(config.seed, workers=True)
    method_class = load_method(method_name)
    datamodule = config.datamodule(method_class)
    method = method_class.from_config(config)
    sets = evaluation_sets(config)

    method_dir = run_dir / method_name
    last = method_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    config_file = method_dir / CONFIG_FILE
    if last.is_file() and config_file.is_file():
        trained = json.loads(config_file.read_text())
        check_same_profile(trained, config, method_name, config_file)
    # a method without a checkpoint starts afresh (whatever an earlier attempt left)
    resume = prepare_output_dir(
        method_dir,
        resume=last if last.is_file() else None,
        overwrite=not last.is_file(),
    )
    if resume is None:
        atomic_write_text(config_file, json.dumps(config.to_dict(), indent=2) + "\n")
    progress_evaluation = progress_callback(config, sets)
    arguments = run_trainer_arguments(method_dir, progress=progress)
    if progress_evaluation is not None:
        arguments["callbacks"].append(progress_evaluation)
    datamodule.setup("fit")
    steps_per_epoch = len(datamodule.train_dataset) // config.global_batch_size  # type: ignore[arg-type]
    trainer = Trainer(
        **config.trainer,
        log_every_n_steps=max(1, min(50, steps_per_epoch // 4)),
        enable_model_summary=False,
        **arguments,
    )
    start = time.perf_counter()
    trainer.fit(method, datamodule=datamodule, ckpt_path=resume)
    pretrain_seconds = (
        progress_evaluation.elapsed_training()
        if progress_evaluation is not None
        else time.perf_counter() - start
    )
    if not trainer.is_global_zero:
        return None
    # Lightning moves the module back to the CPU after fit; evaluate where it trained
    device = trainer.strategy.root_device
    memory_mb, memory_kind = peak_memory_mb(device)
    method.to(device)
    images_seen = trainer.global_step * config.global_batch_size

    start = time.perf_counter()
    evaluation = evaluate_method(method, sets, config, progress=progress)
    curve = list(progress_evaluation.curve) if progress_evaluation else []
    if config.stages is not None:  # the last stage is the final evaluation
        curve.append(
            final_stage(evaluation, trainer, config, pretrain_seconds, images_seen)
        )
    loss = trainer.callback_metrics.get("loss")
    record: dict[str, Any] = {
        "method": method_name,
        "run": run_dir.name,
        "config": config.to_dict(),
        "recipe": dict(method.recipe),
        "hardware": hardware_description(),
        "pretrain": {
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "train_images": len(datamodule.train_dataset),  # type: ignore[arg-type]
            "wall_time_s": pretrain_seconds,
            "images_per_s": images_seen / max(pretrain_seconds, 1e-9),
            "resumed": resume is not None,
            "peak_memory_mb": memory_mb,
            "memory_kind": memory_kind,
            "final_loss": None if loss is None else float(loss),
        },
        "eval": {
            "bank_images": len(sets["bank"]),  # type: ignore[arg-type]
            "test_images": len(sets["test"]),  # type: ignore[arg-type]
            "wall_time_s": time.perf_counter() - start,
        },
        **evaluation_record(evaluation),
        "knn_curve": curve,
        "knn_curve_sets": "bank" if config.stages is not None else "monitor",
    }
    results.write_record(run_dir, record)
    return record


REEVALUATION_KEYS = ("benchmark.knn_ks", "benchmark.fewshot", "benchmark.fewshot_seeds")
"""The profile values a re-evaluation may change: they do not touch training."""

MACHINE_KEYS = ("data.data_dir", "data.num_workers")
"""Profile values that say where a run is made, not what it measures."""

CONFIG_FILE = "config.json"
"""The profile a method's run started under, beside its checkpoints."""


def profile_differences(
    trained: dict[str, Any],
    current: dict[str, Any],
    method_name: str,
    may_change: Sequence[str] = (),
) -> list[str]:
    """The profile values that differ for ``method_name``, as ``key: before -> now``.

    ``may_change`` (``section.key``) aside, and the machine-specific values and the
    other methods' recipes, which do not touch this method's weights. A record of
    the older, flat profile format differs as a whole.
    """
    if trained != current and not set(SECTIONS) <= set(trained):
        return ["a profile in the older format without sections, not comparable"]
    trained, current = json.loads(json.dumps(trained)), json.loads(json.dumps(current))
    ignored = {*MACHINE_KEYS, *may_change}
    differences = []
    for section in sorted(set(trained) | set(current)):
        before, after = trained.get(section), current.get(section)
        if not isinstance(before, dict) or not isinstance(after, dict):
            if before != after:
                differences.append(f"{section}: {before} -> {after}")
            continue
        for key in sorted(set(before) | set(after)):
            if f"{section}.{key}" in ignored:
                continue
            if section == "methods" and key != method_name:
                continue
            was, now = before.get(key), after.get(key)
            if was != now:
                differences.append(f"{section}.{key}: {was} -> {now}")
    return differences


def check_same_profile(
    trained: dict[str, Any],
    config: BenchmarkConfig,
    method_name: str,
    source: Path,
    may_change: Sequence[str] = (),
) -> None:
    """Raises ``ValueError`` if ``config`` is not the profile ``source`` ran under.

    A run folder holds one budget: resuming a method, or keeping its record, under
    other values (another ``trainer.max_epochs``, say) would mix two runs silently.
    """
    differences = profile_differences(
        trained, config.to_dict(), method_name, may_change
    )
    if differences:
        raise ValueError(
            f"{source}: {method_name} ran under other profile values than this run's "
            f"({'; '.join(differences)}): give this run its own --name, or the same "
            "--profile and --set values as the first"
        )


def reevaluate(
    config: BenchmarkConfig, method_name: str, run_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Evaluates a finished method's last checkpoint again and rewrites its record.

    For more few-shot draws (``benchmark.fewshot_seeds``), other shot settings or
    kNN ``k`` on weights already trained: the record keeps its pretraining entries
    and its accuracy-against-compute curve, whose points stay on the draws they
    were measured with (``eval.curve_fewshot_seeds``; the weights of the earlier
    stages are not kept). Every other profile value must be the one the method
    trained under (the other methods' recipes aside).
    """
    path = results.record_path(run_dir, method_name)
    last = run_dir / method_name / CHECKPOINT_DIR / LAST_CHECKPOINT
    for required in (path, last):
        if not required.is_file():
            raise FileNotFoundError(
                f"reevaluate {method_name}: {required} does not exist; a method is "
                "re-evaluated after its run has finished."
            )
    record = json.loads(path.read_text())
    differences = profile_differences(
        record["config"], config.to_dict(), method_name, REEVALUATION_KEYS
    )
    if differences:
        raise ValueError(
            f"reevaluate {method_name}: {path} was trained under other values "
            f"({'; '.join(differences)}); only {', '.join(REEVALUATION_KEYS)} may "
            "change."
        )
    method = load_method(method_name).from_config(config)
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    method.load_state_dict(checkpoint["state_dict"])
    method.eval()

    start = time.perf_counter()
    evaluation = evaluate_method(
        method, evaluation_sets(config), config, progress=progress
    )
    curve_seeds = record["eval"].get(
        "curve_fewshot_seeds", record["config"]["benchmark"]["fewshot_seeds"]
    )
    record.update(evaluation_record(evaluation))
    record["config"] = config.to_dict()
    record["eval"].update(
        wall_time_s=time.perf_counter() - start,
        reevaluated_from=f"{method_name}/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}",
        curve_fewshot_seeds=curve_seeds,
    )
    results.write_record(run_dir, record)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Pretrain and evaluate SSL methods under one budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        default="cpu-quick",
        help="a name in benchmarks/configs/ (cpu-quick, imagenet-vits16) or a YAML "
        "file",
    )
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma separated, or 'all' ({', '.join(available_methods())})",
    )
    parser.add_argument(
        "--name", default=None, help="run name (results folder); default: profile"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override profile values, e.g. trainer.max_epochs=2 "
        "data.dataset=/path/to/imagenet benchmark.bank_subset=1000",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep the methods that already have a result in the run folder",
    )
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="evaluate the finished methods' last checkpoints again (e.g. with "
        "--set benchmark.fewshot_seeds=10) instead of training",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the methods in this process instead of one subprocess each",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (for log files)"
    )
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    return parser


def pretrain_methods(
    args: argparse.Namespace,
    config: BenchmarkConfig,
    methods: Sequence[str],
    run_dir: Path,
) -> list[str]:
    """Pretrains and evaluates each method (one process each); the failed ones."""
    progress = not args.no_progress
    failed: list[str] = []
    for name in methods:
        record_path = results.record_path(run_dir, name)
        if args.skip_existing and record_path.is_file():
            record = json.loads(record_path.read_text())
            check_same_profile(
                record["config"], config, name, record_path, REEVALUATION_KEYS
            )
            print(f"[benchmarks] {name}: result exists, skipped", flush=True)
            continue
        if args.in_process or len(methods) == 1:
            epochs = f"{config.epochs} epoch{'' if config.epochs == 1 else 's'}"
            print(f"[benchmarks] {name}: pretraining ({epochs})", flush=True)
            start = time.perf_counter()
            pretrain_and_evaluate(config, name, run_dir, progress=progress)
            elapsed = time.perf_counter() - start
            print(f"[benchmarks] {name}: done in {elapsed:.0f} s", flush=True)
            continue
        # the child process reports its own start and end
        command = [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--profile",
            args.profile,
            "--methods",
            name,
            "--name",
            run_dir.name,
            "--results-dir",
            str(run_dir.parent),
            "--set",
            *args.set,
        ]
        if not progress:
            command.append("--no-progress")
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
            print(f"[benchmarks] {name}: FAILED", flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = BenchmarkConfig.from_profile(
        merge_profile(load_profile(args.profile), parse_overrides(args.set))
    )
    methods = (
        available_methods()
        if args.methods == "all"
        else [m.strip() for m in args.methods.split(",") if m.strip()]
    )
    for name in methods:
        load_method(name)  # fail early on a typo
    run_dir = Path(args.results_dir) / (args.name or Path(args.profile).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if not progress:  # also the data checks' bars, in the processes started below
        os.environ["TQDM_DISABLE"] = "1"

    if args.reevaluate:
        for name in methods:
            print(f"[benchmarks] {name}: re-evaluating its last checkpoint", flush=True)
            reevaluate(config, name, run_dir, progress=progress)
        failed: list[str] = []
    else:
        failed = pretrain_methods(args, config, methods, run_dir)
    if not _is_global_zero():
        return 0
    records = results.load_records(run_dir)
    if records:
        print(results.summarize(run_dir), flush=True)
    if failed:
        print(f"[benchmarks] failed methods: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _is_global_zero() -> bool:
    """Whether this process is rank 0 (Lightning reads RANK, SLURM_PROCID, ...)."""
    return int(getattr(rank_zero_only, "rank", 0)) == 0


if __name__ == "__main__":
    sys.exit(main())
