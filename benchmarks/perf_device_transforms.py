"""Which implementation for the batched device augmentation, and why.

Compares candidate implementations of ``lightly_msn.DeviceMultiViewTransform`` on
the same images in the same run, at MSN's settings (lightly's defaults: 2 random +
10 focal views) for 224/96 px views of 500x375 images and 32/16 px views of 32x32
images:

1. **crop + antialiased resize** of all views, against torchvision's
   ``resized_crop(antialias=True)`` (the error columns, in levels of 255):
   torch's antialiased ``interpolate`` per view (uint8 channels-last on the CPU,
   float32 on CUDA); one batched exact resampling by gathered rows (each output
   row a weighted sum of input rows, weights as torch's antialiased filter,
   then the same for columns); the transform uses the latter except for images
   larger than 32 px on the CPU; ``torchvision.ops.roi_align`` with
   adaptive sampling (one call for all views); kornia's ``crop_by_indices``
   (what its ``RandomResizedCrop`` runs: per-box ``interpolate`` without
   antialiasing).
2. **the whole augmentation**, every view with its own random parameters: ours;
   kornia's ``AugmentationSequential`` of the same augmentations on the batch
   repeated once per view; torchvision's v2 transforms on uint8 tensors, one call
   per view (v2 transforms draw one set of parameters per call, so per-view
   parameters need a call per view; CPU only).

Times interleave the candidates in every round; ratios are the median over rounds
of candidate time / our time (so > 1 means slower than ours). One thread on the
CPU (``torch.set_num_threads(1)``), as a loader worker; ``--device cuda`` times
the same on a GPU (synchronised). kornia is optional: ``pip install kornia``.

Usage::

    python -m benchmarks.perf_device_transforms [--device cpu] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor
from torchvision.ops import roi_align

from benchmarks.perf_transforms import SETTINGS, load_images
from lightly_msn import device_transforms
from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.transforms import _sample_crop_boxes

try:
    import kornia
    import kornia.augmentation as K
except ImportError:  # optional
    kornia = None

Plan = list[tuple[int, int, tuple[float, float], Tensor, Tensor]]
# per view group: size, views per image, crop scale, image of each view, boxes


def make_plan(batch: int, height: int, width: int, sizes: tuple[int, int]) -> Plan:
    """MSN's crop boxes: 2 random views per image, then 10 focal views."""
    generator = torch.Generator().manual_seed(0)
    plan: Plan = []
    for size, count, scale in [(sizes[0], 2, (0.3, 1.0)), (sizes[1], 10, (0.05, 0.3))]:
        views = batch * count
        boxes = _sample_crop_boxes(views, height, width, scale, generator=generator)
        plan.append((size, count, scale, torch.arange(views) % batch, boxes))
    return plan


# --- candidates for crop + resize: (V, 3, size, size) float in [0, 1] per group ---


def resize_per_view(images: Tensor, plan: Plan) -> list[Tensor]:
    """torch's antialiased ``interpolate`` once per view (ours on the CPU)."""
    if images.device.type == "cpu":
        sources = [
            i[None].contiguous(memory_format=torch.channels_last) for i in images
        ]
    else:  # no uint8 antialiased kernel on CUDA
        sources = [image[None].float() for image in images]
    return [
        device_transforms._resize_each(sources, image, boxes, size, "bilinear")
        for size, _, _, image, boxes in plan
    ]


def resize_batched(images: Tensor, plan: Plan) -> list[Tensor]:
    """One exact resampling of all views by gathered rows (ours off the CPU)."""
    pixels = device_transforms._padded_pixels(images)
    return [
        device_transforms._resize_batched(pixels, image, boxes, size, "bilinear")
        for size, _, _, image, boxes in plan
    ]


def resize_roi_align(images: Tensor, plan: Plan) -> list[Tensor]:
    pixels = images.float()
    out = []
    for size, _, _, image, boxes in plan:
        top, left, height, width = boxes.double().T
        rois = torch.stack([image.double(), left, top, left + width, top + height], 1)
        rois = rois.float().to(images.device)
        views = roi_align(pixels, rois, size, 1.0, sampling_ratio=-1, aligned=True)
        out.append(views.div_(255))
    return out


def resize_kornia(images: Tensor, plan: Plan) -> list[Tensor]:
    pixels = images.float().div_(255)
    out = []
    for size, _, _, image, boxes in plan:
        top, left, height, width = boxes.float().T
        right, bottom = left + width - 1, top + height - 1
        corners = torch.stack(
            [left, top, right, top, right, bottom, left, bottom], dim=1
        ).view(-1, 4, 2)
        views = kornia.geometry.transform.crop_by_indices(
            pixels[image.to(images.device)],
            corners.to(images.device),
            (size, size),
            interpolation="bilinear",
            align_corners=False,
        )
        out.append(views)
    return out


def resize_reference(images: Tensor, plan: Plan) -> list[Tensor]:
    """torchvision's ``resized_crop(antialias=True)`` on float32, per view."""
    pixels = images.float().cpu() / 255
    return [
        torch.stack(
            [
                TF.resized_crop(pixels[index], *box, [size, size], antialias=True)
                for index, box in zip(image.tolist(), boxes.tolist(), strict=True)
            ]
        )
        for size, _, _, image, boxes in plan
    ]


# --- candidates for the whole augmentation ----------------------------------------


def pipeline_ours(sizes: tuple[int, int]) -> Callable[[Tensor], list[Tensor]]:
    transform = DeviceMultiViewTransform.msn(random_size=sizes[0], focal_size=sizes[1])
    return lambda images: transform(images)


def pipeline_kornia(sizes: tuple[int, int]) -> Callable[[Tensor], list[Tensor]]:
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"])
    std = torch.tensor(IMAGENET_NORMALIZE["std"])
    groups = [
        (
            count,
            K.AugmentationSequential(
                K.RandomResizedCrop(
                    (size, size),
                    scale=scale,
                    align_corners=False,
                    cropping_mode="slice",
                ),
                K.RandomHorizontalFlip(),
                K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
                K.RandomGrayscale(p=0.2),
                K.RandomGaussianBlur((13, 13), (0.1, 2.0), p=0.5),
                K.Normalize(mean, std),
            ),
        )
        for size, count, scale in [
            (sizes[0], 2, (0.3, 1.0)),
            (sizes[1], 10, (0.05, 0.3)),
        ]
    ]

    def run(images: Tensor) -> list[Tensor]:
        pixels = images.float().div_(255)
        views: list[Tensor] = []
        for count, augment in groups:
            views.extend(augment(pixels.repeat(count, 1, 1, 1)).chunk(count))
        return views

    return run


def pipeline_torchvision(sizes: tuple[int, int]) -> Callable[[Tensor], list[Tensor]]:
    groups = [
        (
            count,
            T.Compose(
                [
                    T.RandomResizedCrop(size, scale=scale, antialias=True),
                    T.RandomHorizontalFlip(),
                    T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
                    T.RandomGrayscale(p=0.2),
                    T.RandomApply([T.GaussianBlur(13, sigma=(0.1, 2.0))], p=0.5),
                    T.ToDtype(torch.float32, scale=True),
                    T.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"]),
                ]
            ),
        )
        for size, count, scale in [
            (sizes[0], 2, (0.3, 1.0)),
            (sizes[1], 10, (0.05, 0.3)),
        ]
    ]

    def run(images: Tensor) -> list[Tensor]:
        return [
            torch.stack([augment(image) for image in images])
            for count, augment in groups
            for _ in range(count)
        ]

    return run


# --- timing -----------------------------------------------------------------------


def timed(function: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    for function in candidates.values():  # warm-up
        function()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():
            times[name].append(timed(function, device))
    return times


def ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ``name``'s time / ``baseline``'s in the same round."""
    return statistics.median(
        t / base for t, base in zip(times[name], times[baseline], strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--batch", type=int, default=0, help="images per call (default: per setting)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    on_cpu = device.type == "cpu"
    print(
        f"device {device}, {args.repeats} interleaved rounds, ratios = median over "
        "rounds of candidate time / our time (> 1: slower than ours)"
        + (
            ", kornia not installed"
            if kornia is None
            else f", kornia {kornia.__version__}"
        )
    )

    for name, (width, height), random_size, focal_size in SETTINGS:
        batch = args.batch or (256 if not on_cpu else 8 if random_size > 64 else 128)
        pil = load_images(batch, (width, height))
        images = torch.stack(
            [torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in pil]
        ).to(device)
        sizes = (random_size, focal_size)
        plan = make_plan(batch, height, width, sizes)

        # the transform's choice (device_transforms._resizer)
        batched_is_ours = not on_cpu or max(width, height) <= (
            device_transforms._CPU_BATCHED_RESIZE_MAX_SIDE
        )
        per_view = "per view" + ("" if batched_is_ours else " (ours)")
        batched = "batched, gathered rows" + (" (ours)" if batched_is_ours else "")
        ours = batched if batched_is_ours else per_view
        resizers = {
            per_view: resize_per_view,
            batched: resize_batched,
            "roi_align": resize_roi_align,
        }
        if kornia is not None:
            resizers["kornia crop_by_indices"] = resize_kornia
        reference = resize_reference(images, plan)
        print(f"\n### {name}, {batch} images per call\n")
        print("Crop + resize of the 12 views (MSN's boxes, the same for all):\n")
        print(
            "| candidate | ms per image | time / ours | max error | mean error |\n"
            "|---|---|---|---|---|"
        )
        times = interleaved(
            {key: functools.partial(f, images, plan) for key, f in resizers.items()},
            args.repeats,
            device,
        )
        for key, resize in resizers.items():
            views = [view.cpu() for view in resize(images, plan)]
            errors = torch.cat(
                [(v - r).abs().flatten() for v, r in zip(views, reference, strict=True)]
            )
            print(
                f"| {key} | {statistics.median(times[key]) / batch * 1e3:.3f} | "
                f"{ratio(times, key, ours):.2f}x | {errors.max().item() * 255:.2f} | "
                f"{errors.mean().item() * 255:.3f} |"
            )

        pipelines = {"ours": pipeline_ours(sizes)}
        if kornia is not None:
            pipelines["kornia AugmentationSequential"] = pipeline_kornia(sizes)
        if on_cpu:  # thousands of small kernel launches per call on a GPU
            pipelines["torchvision v2, one call per view"] = pipeline_torchvision(sizes)
        print(
            "\nWhole augmentation (crop, flip, jitter, grayscale, blur, normalise):\n"
        )
        print("| candidate | img/s | views/s | time / ours |\n|---|---|---|---|")
        times = interleaved(
            {key: functools.partial(f, images) for key, f in pipelines.items()},
            args.repeats,
            device,
        )
        for key in pipelines:
            rate = batch / statistics.median(times[key])
            slower = ratio(times, key, "ours")
            print(f"| {key} | {rate:.0f} | {rate * 12:.0f} | {slower:.2f}x |")

    if kornia is not None:
        print_kornia_checks()


def print_kornia_checks() -> None:
    """What kornia does differently from torchvision, measured."""
    from kornia.enhance import (
        adjust_brightness_accumulative,
        adjust_contrast_with_mean_subtraction,
        adjust_hue,
        adjust_saturation_with_gray_subtraction,
    )

    views = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([0.2, 0.9, 1.4, 1.8])
    shifts = torch.tensor([-0.5, -0.13, 0.2, 0.45])
    print("\nkornia's colour operations against torchvision (max |difference|):\n")
    for key, theirs, ours, values in [
        ("brightness", TF.adjust_brightness, adjust_brightness_accumulative, factors),
        (
            "contrast",
            TF.adjust_contrast,
            adjust_contrast_with_mean_subtraction,
            factors,
        ),
        (
            "saturation",
            TF.adjust_saturation,
            adjust_saturation_with_gray_subtraction,
            factors,
        ),
        ("hue", TF.adjust_hue, lambda x, s: adjust_hue(x, 2 * math.pi * s), shifts),
    ]:
        reference = torch.stack(
            [theirs(v, float(f)) for v, f in zip(views, values, strict=True)]
        )
        print(f"- {key}: {(ours(views, values) - reference).abs().max().item():.1e}")
    jitter = K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0)
    jitter(torch.rand(6, 3, 8, 8))
    order = tuple(jitter._params["order"].shape)
    print(
        f"- ColorJitter draws one operation order of shape {order} for a batch of 6 "
        "(torchvision: one per image)"
    )


if __name__ == "__main__":
    main()
