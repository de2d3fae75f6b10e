"""Pretrain every method under the same budget, evaluate it, and tabulate the results.

Examples::

    # all methods on a CIFAR-10 subset on CPU (about 45 minutes on 2 cores)
    python -m benchmarks.run --profile cpu-quick

    # two methods, one epoch, into benchmarks/results/smoke/
    python -m benchmarks.run --profile cpu-quick --methods msn,dino --name smoke \\
        --set epochs=1 train_subset=1000

    # ViT-S/16 on ImageNet-1k, 8 GPUs x 4 nodes, bf16 (see benchmarks/README.md)
    python -m benchmarks.run --profile imagenet-vits16 --set data=/data/imagenet

Each method runs in its own process (so its peak memory is its own and a crash
does not stop the others) and writes ``benchmarks/results/<run>/<method>.json``;
the run's table (``results.md``, ``results.csv``) and plots are written at the end.
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
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from benchmarks import results
from benchmarks.evaluate import KNNMonitor, embed_method, evaluation_record
from benchmarks.methods import available_methods, load_method
from benchmarks.methods.base import BenchmarkConfig, eval_transform
from lightly_msn.data import build_dataset
from lightly_msn.eval.fewshot import parse_shots
from lightly_msn.eval.protocols import evaluate_features

BENCHMARKS_DIR = Path(__file__).resolve().parent
PROFILES_DIR = BENCHMARKS_DIR / "configs"
RESULTS_DIR = BENCHMARKS_DIR / "results"


class TransformedSubset(Dataset):
    """``(transform(image), label)`` for the images ``indices`` of ``dataset``."""

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        transform: Callable[[Any], Any],
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), int(label)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The labels of an ImageFolder, torchvision CIFAR10 or ``DigitsDataset``."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(
            f"{type(dataset).__name__} has no 'targets' attribute; the benchmark "
            "needs the labels to draw class-balanced subsets"
        )
    return np.asarray(targets, dtype=np.int64)


def balanced_indices(labels: np.ndarray, size: int | None, seed: int) -> list[int]:
    """A random subset of ``size`` indices with (nearly) equal counts per class.

    Classes get ``size // num_classes`` images each, the first ``size %
    num_classes`` classes one more; ``None`` returns every index.
    """
    if size is None:
        return list(range(len(labels)))
    classes = np.unique(labels)
    per_class, remainder = divmod(size, len(classes))
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for position, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        count = per_class + int(position < remainder)
        if count > len(members):
            raise ValueError(
                f"a balanced subset of {size} images needs {count} images of class "
                f"{label}, which has only {len(members)}; lower the subset size"
            )
        chosen.extend(rng.choice(members, size=count, replace=False).tolist())
    return sorted(chosen)


def load_profile(profile: str) -> dict[str, Any]:
    """The settings of ``benchmarks/configs/<profile>.json`` or of a JSON file."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile}.json"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
        raise ValueError(f"no profile {profile!r}; available profiles: {names}")
    values: dict[str, Any] = json.loads(path.read_text())
    values.pop("_comment", None)
    return values


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["epochs=2", "data=/x"]`` -> ``{"epochs": 2, "data": "/x"}`` (JSON values)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


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


def pretrain_and_evaluate(
    config: BenchmarkConfig, method_name: str, run_dir: Path, progress: bool = True
) -> dict[str, Any] | None:
    """Pretrains one method, evaluates it and writes ``run_dir/<method>.json``.

    Returns the record on the global-zero rank, ``None`` on the other ranks.
    """
    seed_everything(config.seed, workers=True)
    method_class = load_method(method_name)
    train_images = build_dataset(
        config.data, "train", data_dir=config.data_dir, img_size=config.img_size
    )
    test_images = build_dataset(
        config.data, "test", data_dir=config.data_dir, img_size=config.img_size
    )
    train_labels = dataset_labels(train_images)
    test_labels = dataset_labels(test_images)

    train_set = TransformedSubset(
        train_images,
        balanced_indices(train_labels, config.train_subset, config.seed),
        method_class.make_transform(config),
    )
    steps_per_epoch = len(train_set) // config.global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(train_set)} training images are fewer than one global batch of "
            f"{config.global_batch_size}; lower batch_size or raise train_subset"
        )
    method = method_class.from_config(config, steps_per_epoch=steps_per_epoch)

    to_tensor = eval_transform(config)
    bank = TransformedSubset(
        train_images,
        balanced_indices(train_labels, config.bank_subset, config.seed + 1),
        to_tensor,
    )
    test = TransformedSubset(
        test_images,
        balanced_indices(test_labels, config.test_subset, config.seed + 2),
        to_tensor,
    )
    callbacks: list[Callback] = []
    monitor = None
    if config.monitor_bank > 0 and config.monitor_test > 0:
        monitor = KNNMonitor(
            TransformedSubset(
                train_images,
                balanced_indices(train_labels, config.monitor_bank, config.seed + 3),
                to_tensor,
            ),
            TransformedSubset(
                test_images,
                balanced_indices(test_labels, config.monitor_test, config.seed + 4),
                to_tensor,
            ),
            k=min(20, config.monitor_bank),
        )
        callbacks.append(monitor)

    world_size = config.num_nodes * (
        config.devices if isinstance(config.devices, int) else 1
    )
    trainer = Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,  # type: ignore[arg-type]
        sync_batchnorm=world_size > 1,
        use_distributed_sampler=True,
        callbacks=callbacks,
        logger=CSVLogger(run_dir / "logs", name=method_name, version=0),
        log_every_n_steps=max(1, min(50, steps_per_epoch // 4)),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    start = time.perf_counter()
    trainer.fit(method, loader)
    monitor_seconds = monitor.seconds if monitor is not None else 0.0
    pretrain_seconds = time.perf_counter() - start - monitor_seconds
    if not trainer.is_global_zero:
        return None
    # Lightning moves the module back to the CPU after fit; evaluate where it trained
    device = trainer.strategy.root_device
    memory_mb, memory_kind = peak_memory_mb(device)
    method.to(device)
    images_seen = trainer.global_step * config.global_batch_size

    start = time.perf_counter()
    features = evaluation_record(
        evaluate_features(
            embed_method(method, bank, progress=progress),
            embed_method(method, test, progress=progress),
            knn_ks=config.knn_ks,
            shots=parse_shots(",".join(config.fewshot)),
            seeds=config.fewshot_seeds,
            progress=progress,
        )
    )
    loss = trainer.callback_metrics.get("loss")
    record: dict[str, Any] = {
        "method": method_name,
        "run": run_dir.name,
        "config": config.to_dict(),
        "recipe": {k: v for k, v in method.recipe.items()},
        "hardware": hardware_description(),
        "pretrain": {
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "train_images": len(train_set),
            "wall_time_s": pretrain_seconds,
            "images_per_s": images_seen / max(pretrain_seconds, 1e-9),
            "peak_memory_mb": memory_mb,
            "memory_kind": memory_kind,
            "final_loss": None if loss is None else float(loss),
        },
        "eval": {
            "bank_images": len(bank),
            "test_images": len(test),
            "wall_time_s": time.perf_counter() - start,
        },
        **features,
        "knn_curve": monitor.curve if monitor is not None else [],
    }
    results.write_record(run_dir, record)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Pretrain and evaluate SSL methods under one budget.",
    )
    parser.add_argument(
        "--profile",
        default="cpu-quick",
        help="a name in benchmarks/configs/ (cpu-quick, imagenet-vits16) or a JSON "
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
        metavar="KEY=VALUE",
        help="override config values, e.g. epochs=2 data=/path/to/imagenet",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep the methods that already have a result in the run folder",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the methods in this process instead of one subprocess each",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = BenchmarkConfig.from_dict(
        {**load_profile(args.profile), **parse_overrides(args.set)}
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

    failed: list[str] = []
    for name in methods:
        if args.skip_existing and results.record_path(run_dir, name).is_file():
            print(f"[benchmarks] {name}: result exists, skipped", flush=True)
            continue
        print(f"[benchmarks] {name}: pretraining ({config.epochs} epochs)", flush=True)
        start = time.perf_counter()
        if args.in_process or len(methods) == 1:
            pretrain_and_evaluate(config, name, run_dir, progress=progress)
        else:
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
                continue
        print(
            f"[benchmarks] {name}: done in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
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
    return rank_zero_only.rank == 0


if __name__ == "__main__":
    sys.exit(main())
