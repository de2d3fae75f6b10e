"""Throughput of lightly_msn's transforms versus lightly's, on one CPU thread.

Prints a Markdown table: images/s and views/s per core of lightly's
``MSNTransform``, ours (the PIL-path ``lightly_msn.MSNTransform``, per image, as a
loader worker runs it) and the batched ``lightly_msn.DeviceMultiViewTransform.msn``
(a whole uint8 batch per call), at the same augmentation settings (lightly's
defaults: 2 random + 10 focal views, colour jitter, grayscale, blur), for 224/96 px
views of ImageNet-sized images (500x375) and 32/16 px views of 32x32 images, with
the speed-ups ours / lightly and batched / ours.

Timings interleave the transforms in every round (each round transforms the same
images with each) and report the median per-round ratio, so load from other
processes affects all sides alike. ``torch.set_num_threads(1)``: a data loader
worker uses one core. The batched transform's time includes turning the PIL images
into one uint8 batch; it transforms ``--batch`` images per call (the round's
images repeated). With ``--device cuda`` the batched transform runs on the GPU
(batch already there, synchronised), the per-image ones stay on one CPU core.

Images: real CIFAR-10 photos from ``../shared/data/cifar10-jpg.tar.gz`` (upscaled
bicubically to 500x375 for the large setting); random smooth images if the
tarball is absent.

Usage::

    python benchmarks/perf_transforms.py [--repeats 15] [--images 16] [--batch 128]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightly.transforms import MSNTransform as LightlyMSNTransform
from PIL import Image

from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.transforms import MSNTransform

TARBALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpg.tar.gz"
SETTINGS = (  # name, input (width, height), random_size, focal_size
    ("224/96 px views of 500x375 images", (500, 375), 224, 96),
    ("32/16 px views of 32x32 images", (32, 32), 32, 16),
)


def load_images(count: int, size: tuple[int, int]) -> list[Image.Image]:
    """``count`` RGB images of ``size``: CIFAR-10 photos if available."""
    images: list[Image.Image] = []
    if TARBALL.exists():
        with tarfile.open(TARBALL, "r:gz") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".jpg"):
                    data = archive.extractfile(member)
                    assert data is not None
                    images.append(Image.open(io.BytesIO(data.read())).convert("RGB"))
                    if len(images) == count:
                        break
    else:
        rng = np.random.default_rng(0)
        for _ in range(count):
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            images.append(Image.fromarray(coarse))
    return [image.resize(size, Image.Resampling.BICUBIC) for image in images]


def seconds_per_image(
    transform: Callable[[Image.Image], Sequence[Any]], images: list[Image.Image]
) -> float:
    start = time.perf_counter()
    for image in images:
        transform(image)
    return (time.perf_counter() - start) / len(images)


def seconds_per_batched_image(
    transform: DeviceMultiViewTransform,
    images: list[Image.Image],
    device: torch.device,
) -> float:
    """Per image: the PIL images into one uint8 batch (on the CPU), then one call."""
    if device.type == "cpu":
        start = time.perf_counter()
        batch = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
        transform(batch.permute(0, 3, 1, 2))
        return (time.perf_counter() - start) / len(images)
    batch = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    batch = batch.permute(0, 3, 1, 2).to(device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    transform(batch)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument(
        "--batch", type=int, default=128, help="images per batched call"
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the batched transform"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    views = 2 + 10
    print(
        f"views per image: {views} (2 random + 10 focal), 1 thread; batched: "
        f"{args.batch} images per call on {device}\n"
    )
    print(
        "| setting | lightly img/s | ours img/s | batched img/s | lightly views/s "
        "| ours views/s | batched views/s | ours / lightly | batched / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, input_size, random_size, focal_size in SETTINGS:
        images = load_images(args.images, input_size)
        batch_images = (images * (args.batch // len(images) + 1))[: args.batch]
        ours = MSNTransform(random_size=random_size, focal_size=focal_size)
        lightly = LightlyMSNTransform(random_size=random_size, focal_size=focal_size)
        batched = DeviceMultiViewTransform.msn(
            random_size=random_size, focal_size=focal_size
        )
        seconds_per_image(ours, images[:2])  # warm-up
        seconds_per_image(lightly, images[:2])
        seconds_per_batched_image(batched, batch_images, device)
        times: dict[str, list[float]] = {"lightly": [], "ours": [], "batched": []}
        for _ in range(args.repeats):
            times["lightly"].append(seconds_per_image(lightly, images))
            times["ours"].append(seconds_per_image(ours, images))
            times["batched"].append(
                seconds_per_batched_image(batched, batch_images, device)
            )
        rates = {key: 1 / statistics.median(value) for key, value in times.items()}
        ours_vs_lightly = statistics.median(
            theirs / mine
            for theirs, mine in zip(times["lightly"], times["ours"], strict=True)
        )
        batched_vs_ours = statistics.median(
            mine / fast
            for mine, fast in zip(times["ours"], times["batched"], strict=True)
        )
        print(
            f"| {name} | {rates['lightly']:.1f} | {rates['ours']:.1f} | "
            f"{rates['batched']:.1f} | {rates['lightly'] * views:.0f} | "
            f"{rates['ours'] * views:.0f} | {rates['batched'] * views:.0f} | "
            f"{ours_vs_lightly:.2f}x | {batched_vs_ours:.2f}x |"
        )


if __name__ == "__main__":
    main()
