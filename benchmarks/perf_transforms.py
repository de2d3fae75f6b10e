"""Throughput of lightly_msn's MSNTransform versus lightly's, on one CPU thread.

Prints a Markdown table: images/s and views/s per core of both transforms at the
same augmentation settings (lightly's defaults: 2 random + 10 focal views, colour
jitter, grayscale, blur), for 224/96 px views of ImageNet-sized images (500x375)
and 32/16 px views of 32x32 images, and the speed-up ours / lightly.

Timings interleave the two transforms in every round (each round transforms the
same images with both) and report the median per-round ratio, so load from other
processes affects both sides alike. ``torch.set_num_threads(1)``: a data loader
worker uses one core.

Images: real CIFAR-10 photos from ``../shared/data/cifar10-jpg.tar.gz`` (upscaled
bicubically to 500x375 for the large setting); random smooth images if the
tarball is absent.

Usage::

    python benchmarks/perf_transforms.py [--repeats 15] [--images 16]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightly.transforms import MSNTransform as LightlyMSNTransform
from PIL import Image

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
    return [image.resize(size, Image.BICUBIC) for image in images]


def seconds_per_image(
    transform: Callable[[Image.Image], list[torch.Tensor]], images: list[Image.Image]
) -> float:
    start = time.perf_counter()
    for image in images:
        transform(image)
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    views = 2 + 10
    print(f"views per image: {views} (2 random + 10 focal), 1 thread\n")
    print(
        "| setting | lightly img/s | ours img/s | lightly views/s | ours views/s "
        "| speed-up |"
    )
    print("|---|---|---|---|---|---|")
    for name, input_size, random_size, focal_size in SETTINGS:
        images = load_images(args.images, input_size)
        ours = MSNTransform(random_size=random_size, focal_size=focal_size)
        lightly = LightlyMSNTransform(random_size=random_size, focal_size=focal_size)
        seconds_per_image(ours, images[:2])  # warm-up
        seconds_per_image(lightly, images[:2])
        ours_times, lightly_times, ratios = [], [], []
        for _ in range(args.repeats):
            lightly_time = seconds_per_image(lightly, images)
            ours_time = seconds_per_image(ours, images)
            lightly_times.append(lightly_time)
            ours_times.append(ours_time)
            ratios.append(lightly_time / ours_time)
        lightly_rate = 1 / statistics.median(lightly_times)
        ours_rate = 1 / statistics.median(ours_times)
        print(
            f"| {name} | {lightly_rate:.1f} | {ours_rate:.1f} | "
            f"{lightly_rate * views:.0f} | {ours_rate * views:.0f} | "
            f"{statistics.median(ratios):.2f}x |"
        )


if __name__ == "__main__":
    main()
