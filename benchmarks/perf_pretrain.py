"""End-to-end pretraining throughput: views made on the device against the loader's.

Trains MSN through the package's own training path (``MSNDataModule``,
``MSNLightningModule``, ``lightly_msn.train.run_trainer_arguments`` and a
``pytorch_lightning.Trainer``) with ``augment="device"`` (the loader delivers uint8
images, ``DeviceMultiViewTransform`` makes the views of a whole batch) and with
``augment="loader"`` (each image's views made by ``MSNTransform`` in the loader
workers), and, as the ceiling, the training step alone on fixed random views
(``benchmarks.perf_train_step``). Every round fits each configuration on a fresh
trainer, in turn; the data modules are set up once (the image check and, for
``device``, the decoded-image cache are not timed).

- end-to-end img/s: images of the steps after ``--warmup``, over the wall time from
  the end of the last warm-up step to the end of the last step (loading, transfer,
  augmentation and training), synchronised;
- step-only img/s: batch size over the median time of one step (start to end of
  ``training_step``, backward, optimizer and EMA), data already made;
- ratios are medians over rounds of the per-round ratios, so load from other
  processes affects both sides of a ratio alike.

Settings (``--setting``; on ``--device cuda`` the default runs both GPU settings):

- ``cpu-quick`` (CPU default): the pretraining of ``benchmarks/configs/cpu-quick.yaml``:
  CIFAR-10 (JPEG ImageFolder) 32 px, 2,560 images, ViT dim 192 / depth 4 / 3 heads /
  patch 4, batch 64, 2 random + 4 focal views of 16 px, bf16-mixed, 1 loader worker;
- ``cpu-224``: 224/96 px views (2 + 10, blur, ImageNet statistics) of a 224 px JPEG
  folder, a small ViT (dim 192, depth 2, patch 16), batch 16, 1 worker, bf16-mixed:
  the data path at ImageNet view sizes on a CPU;
- ``gpu-32``: CIFAR-10 32 px, the ViT of ``perf_train_step`` (dim 192, depth 6),
  batch 1024, bf16-mixed, 8 workers, the whole train split;
- ``gpu-224``: ViT-S/16, 224/96 px (2 + 10 views), batch 128, bf16-mixed, 8 workers,
  the 224 px JPEG folder: decoded into memory (``device``), read by the workers and
  decoded on the GPU (``device, in_memory=False``), and ``loader``.

Data: CIFAR-10 from ``--data-dir`` (extracted from the shared tarball when absent);
the 224 px folder from ``--jpeg-folder`` (by default generated once from CIFAR-10
images upsampled bicubically, ``--jpeg-images`` of them).

Usage::

    python -m benchmarks.perf_pretrain [--rounds 5]
    python -m benchmarks.perf_pretrain --setting cpu-224
    python -m benchmarks.perf_pretrain --device cuda [--jpeg-folder PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pytorch_lightning import Callback, Trainer

from benchmarks.perf_train_step import StepTimer, fit_steps, synchronize
from benchmarks.perf_transforms import TARBALL
from lightly_msn.data import MSNDataModule
from lightly_msn.model import create_vit
from lightly_msn.train import MSNLightningModule

REPO = Path(__file__).resolve().parents[1]
TARBALLS = (TARBALL, REPO / "shared" / "data" / TARBALL.name)
LOADER = "loader"
STEP_ONLY = "step only"
PATHS: dict[str, dict[str, Any]] = {
    "device": {"augment": "device"},
    LOADER: {"augment": "loader"},
}


@dataclass(frozen=True)
class Setting:
    """One benchmarked configuration: data, views, model and the compared paths."""

    data: str  # "cifar10" or "jpeg224"
    img_size: int
    focal_size: int
    focal_views: int
    batch_size: int
    num_workers: int
    vit: str
    vit_kwargs: dict[str, Any]
    train_subset: int | None = None
    # label -> extra MSNDataModule arguments; LOADER is the baseline of the ratios
    paths: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(PATHS))


SETTINGS = {
    "cpu-quick": Setting(
        "cifar10", 32, 16, 4, 64, 1, "vit_tiny_patch16_224",
        dict(patch_size=4, embed_dim=192, depth=4, num_heads=3), train_subset=2560,
    ),
    "cpu-224": Setting(
        "jpeg224", 224, 96, 10, 16, 1, "vit_tiny_patch16_224",
        dict(patch_size=16, embed_dim=192, depth=2, num_heads=3),
    ),
    "gpu-32": Setting(
        "cifar10", 32, 16, 4, 1024, 8, "vit_tiny_patch16_224",
        dict(patch_size=4, embed_dim=192, depth=6, num_heads=3),
    ),
    "gpu-224": Setting(
        "jpeg224", 224, 96, 10, 128, 8, "vit_small_patch16_224",
        dict(patch_size=16),
        paths={
            "device": {"augment": "device"},
            "device, in_memory=False": {"augment": "device", "in_memory": False},
            LOADER: {"augment": "loader"},
        },
    ),
}  # fmt: skip


class Throughput(Callback):
    """End time of every training step, synchronised (loading included between)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        synchronize(trainer.strategy.root_device)
        self.ends.append(time.perf_counter())

    def images_per_second(self, batch_size: int, warmup: int) -> float:
        timed = self.ends[warmup - 1 :]
        return batch_size * (len(timed) - 1) / (timed[-1] - timed[0])


def msn_module(setting: Setting) -> MSNLightningModule:
    torch.manual_seed(0)
    vit = create_vit(setting.vit, img_size=setting.img_size, **setting.vit_kwargs)
    return MSNLightningModule(
        vit=vit, img_size=setting.img_size, mask_ratio=0.15, max_steps=1000
    )


def datamodule(setting: Setting, folder: Path, **extra: Any) -> MSNDataModule:
    source: dict[str, Any] = (
        dict(dataset="cifar10", data_dir=str(folder))
        if setting.data == "cifar10"
        else dict(dataset=str(folder))
    )
    return MSNDataModule(
        **source,
        img_size=setting.img_size,
        focal_size=setting.focal_size,
        focal_views=setting.focal_views,
        batch_size=setting.batch_size,
        num_workers=setting.num_workers,
        train_subset=setting.train_subset,
        **extra,
    )


def cifar10_folder(path: Path) -> Path:
    """The CIFAR-10 ImageFolder at ``path``, extracted from the tarball if absent."""
    if (path / "train").is_dir():
        return path
    tarball = next((t for t in TARBALLS if t.is_file()), None)
    if tarball is None:
        raise SystemExit(
            f"no CIFAR-10 ImageFolder at {path} and no {TARBALL.name} to extract "
            "it from; pass --data-dir"
        )
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(path)], check=True)
    return path


def _upsample(job: tuple[str, str]) -> None:
    source, target = job
    with Image.open(source) as image:
        image.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC).save(
            target, quality=90
        )


def jpeg224_folder(path: Path, cifar: Path, count: int) -> Path:
    """A folder of ``count`` 224 px JPEGs (CIFAR-10 upsampled), made once."""
    if path.is_dir():
        return path
    sources = sorted((cifar / "train").glob("*/*.jpg"))[:: max(1, 50000 // count)]
    staging = path.with_name(path.name + ".partial")
    jobs = []
    for source in sources[:count]:
        (staging / source.parent.name).mkdir(parents=True, exist_ok=True)
        jobs.append((str(source), str(staging / source.parent.name / source.name)))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_upsample, jobs, chunksize=64))
    staging.rename(path)
    return path


def run_setting(
    name: str, setting: Setting, folder: Path, device: torch.device, args: Any
) -> list[str]:
    """Interleaved rounds of every path and the step-only fit; a Markdown table."""
    modules = {label: msn_module(setting) for label in [*setting.paths, STEP_ONLY]}
    datamodules = {
        label: datamodule(setting, folder, **extra)
        for label, extra in setting.paths.items()
    }
    for data in datamodules.values():
        data.setup("fit")  # checks (and decodes) the images once, untimed
    rates: dict[str, list[float]] = {label: [] for label in modules}
    memory: dict[str, float] = {}
    for round_index in range(args.rounds):
        for label, module in modules.items():
            start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rate = fit_rate(module, datamodules.get(label), setting, device, args)
            rates[label].append(rate)
            if device.type == "cuda":
                memory[label] = torch.cuda.max_memory_allocated(device) / 2**20
            seconds = time.perf_counter() - start
            print(
                f"[{name}] round {round_index + 1}/{args.rounds}, {label}: "
                f"{rate:,.1f} img/s (fit {seconds:.0f} s)",
                flush=True,
            )
    return table(name, setting, rates, memory, args.precision)


def fit_rate(
    module: MSNLightningModule,
    data: MSNDataModule | None,
    setting: Setting,
    device: torch.device,
    args: Any,
) -> float:
    """img/s of one fit: end to end on ``data``, or step-only on fixed views."""
    steps = args.warmup + args.steps
    batch = setting.batch_size
    if data is not None:
        throughput = Throughput()
        fit_steps(
            module, args.precision, device, batch, steps, [throughput], datamodule=data
        )
        return throughput.images_per_second(batch, args.warmup)
    timer = StepTimer(float32_loss=True)
    sizes = [setting.img_size] * 2 + [setting.focal_size] * setting.focal_views
    fit_steps(module, args.precision, device, batch, steps, [timer], sizes=sizes)
    return batch / statistics.median(timer.seconds[args.warmup :])


def per_round(rates: dict[str, list[float]], label: str, baseline: str) -> float:
    pairs = zip(rates[label], rates[baseline], strict=True)
    return statistics.median(rate / base for rate, base in pairs)


def table(
    name: str,
    setting: Setting,
    rates: dict[str, list[float]],
    memory: dict[str, float],
    precision: str,
) -> list[str]:
    rounds = len(rates[STEP_ONLY])
    rows = [
        f"### {name}: {setting.img_size}/{setting.focal_size} px, 2 + "
        f"{setting.focal_views} views, batch {setting.batch_size}, "
        f"{setting.num_workers} loader worker(s), {setting.vit} "
        f"{setting.vit_kwargs}, {precision}; medians of {rounds} rounds",
        "",
        "| path | img/s | x loader | of step-only | peak GPU MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in rates:
        rate = statistics.median(rates[label])
        versus_loader = per_round(rates, label, LOADER)
        of_step = per_round(rates, label, STEP_ONLY)
        peak = f"{memory[label]:,.0f}" if label in memory else "-"
        rows.append(
            f"| {label} | {rate:,.1f} | {versus_loader:.2f}x | {of_step:.0%} | {peak} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--setting",
        action="append",
        choices=sorted(SETTINGS),
        help="repeatable; default: cpu-quick on cpu, gpu-32 and gpu-224 on cuda",
    )
    parser.add_argument(
        "--precision",
        default="bf16-mixed",
        help="Trainer precision (the profiles': bf16-mixed; 32-true for CPUs "
        "without bf16 instructions, where bf16 matmuls are emulated)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per fit")
    parser.add_argument("--data-dir", default=str(REPO / ".data" / "cifar10"))
    parser.add_argument("--jpeg-folder", default=str(REPO / ".data" / "cifar10-224"))
    parser.add_argument("--jpeg-images", type=int, default=2048)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    device = torch.device(args.device)
    names = args.setting or (
        ["gpu-32", "gpu-224"] if device.type == "cuda" else ["cpu-quick"]
    )
    cifar = cifar10_folder(Path(args.data_dir))
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(f"torch {torch.__version__}, {where}, {os.cpu_count()} CPU cores")
    for name in names:
        setting = SETTINGS[name]
        folder = cifar
        if setting.data == "jpeg224":
            folder = jpeg224_folder(Path(args.jpeg_folder), cifar, args.jpeg_images)
        print("\n".join(["", *run_setting(name, setting, folder, device, args)]))


if __name__ == "__main__":
    main()
