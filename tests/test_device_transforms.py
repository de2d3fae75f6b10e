"""Tests for lightly_msn.device_transforms, against torchvision and lightly."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from lightly.transforms import (
    BYOLTransform,
    DINOTransform,
    IBOTTransform,
    MAETransform,
    MSNTransform,
    SimCLRTransform,
)
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.solarize import RandomSolarization
from scipy.stats import ks_2samp

from lightly_msn import device_transforms as D
from lightly_msn import transforms as ops
from lightly_msn.device_transforms import DeviceMultiViewTransform, ViewSpec
from lightly_msn.transforms import CIFAR10_NORMALIZE
from lightly_msn.transforms import MSNTransform as OurMSNTransform

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# a spec that only crops the whole image and resizes it: every other step is off
PLAIN = dict(
    crop_scale=(1.0, 1.0), hflip_prob=0.0, mean=None, std=None, interpolation="bilinear"
)
NUM_DRAWS = 10_000


def _smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A uint8 ``(3, height, width)`` image with structure at several scales."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 7, generator=generator)
    image = torch.nn.functional.interpolate(
        coarse, size=(height, width), mode="bicubic", align_corners=False
    )[0]
    noise = 0.15 * torch.rand(3, height, width, generator=generator)
    return ((image + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def _full_image(height: int, width: int, **fields: object) -> ViewSpec:
    """A spec whose crop is the whole ``height x width`` image (aspect fixed)."""
    ratio = width / height
    return ViewSpec(**{**PLAIN, "crop_ratio": (ratio, ratio), **fields})  # type: ignore[arg-type]


def _binomial_bounds(probability: float, draws: int) -> tuple[float, float]:
    """Four binomial standard deviations around ``probability``."""
    spread = 4 * math.sqrt(probability * (1 - probability) / draws)
    return probability - spread, probability + spread


# --- each operation against torchvision, fixed parameters ----------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resized_crop_matches_torchvision(device: str, interpolation: str) -> None:
    image = _smooth_image(45, 60)
    boxes = torch.tensor(  # top, left, height, width: down-, up-sampling, whole image
        [[3, 5, 40, 31], [10, 20, 9, 12], [0, 0, 45, 60], [44, 0, 1, 60]]
    )
    index = torch.zeros(4, dtype=torch.long)
    mode = T.InterpolationMode(interpolation)
    # torchvision's float kernel, clamped as PIL's and torch's uint8 output are
    reference = torch.stack(
        [
            TF.resized_crop(
                image.float() / 255, *box, [24, 24], interpolation=mode, antialias=True
            ).clamp(0, 1)
            for box in boxes.tolist()
        ]
    )
    # the batched resampling (used off the CPU) on this device: float exact
    pixels = D._padded_pixels([image.to(device)])
    batched = D._resize_batched(pixels, index, boxes, 24, interpolation).cpu()
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)

    resize, sizes = D._resizer([image.to(device)])  # what the transform uses here
    assert sizes.tolist() == [[45, 60]]
    ours = resize(index, boxes, 24, interpolation)
    assert ours.dtype == torch.float32 and ours.shape == (4, 3, 24, 24)
    assert ours.device.type == device
    if device != "cpu":
        torch.testing.assert_close(ours.cpu(), batched, atol=0, rtol=0)
        return
    # on the CPU: the uint8 kernel itself (what torchvision runs on uint8) ...
    uint8 = torch.stack(
        [
            TF.resized_crop(image, *box, [24, 24], interpolation=mode, antialias=True)
            for box in boxes.tolist()
        ]
    )
    torch.testing.assert_close(ours, uint8.float() / 255, atol=0, rtol=0)
    # ... which rounds to uint8 after each pass: within 1.5 levels of float;
    # bicubic clamps its overshoot between the passes, as PIL, at sharp edges
    tolerance = 1.5 / 255 if interpolation == "bilinear" else 4 / 255
    torch.testing.assert_close(ours, reference, atol=tolerance, rtol=0)


def test_batched_resampling_of_differently_sized_images() -> None:
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=generator),
        torch.full((3, 20, 12), 77, dtype=torch.uint8),
    ]
    pixels = D._padded_pixels(images)
    assert pixels.shape == (2, 50, 70, 3)
    index = torch.tensor([0, 1, 1, 0])
    boxes = torch.tensor(
        [[0, 0, 50, 70], [0, 0, 20, 12], [15, 9, 5, 3], [49, 69, 1, 1]]
    )
    views = D._resize_batched(pixels, index, boxes, 16, "bicubic")
    for view, image, box in zip(views, index.tolist(), boxes.tolist(), strict=True):
        expected = TF.resized_crop(
            images[image].float() / 255,
            *box,
            [16, 16],
            interpolation=T.InterpolationMode.BICUBIC,
            antialias=True,
        ).clamp(0, 1)
        torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)
    # on the CPU, images of up to 32 px take this path too
    small = [image[:, :32, :32] for image in images]
    boxes = torch.tensor([[0, 0, 32, 32], [0, 0, 20, 12], [5, 3, 5, 3], [31, 31, 1, 1]])
    resize, _ = D._resizer(small)
    batched = D._resize_batched(D._padded_pixels(small), index, boxes, 8, "bilinear")
    torch.testing.assert_close(resize(index, boxes, 8, "bilinear"), batched)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_image_crop_flips_and_normalisation_match_torchvision(
    device: str,
) -> None:
    image = _smooth_image(30, 40)
    resized = TF.resize(image, [16, 16], antialias=True).float() / 255
    batch = image.unsqueeze(0).to(device)
    generator = torch.Generator().manual_seed(0)

    def view(**fields: object) -> torch.Tensor:
        transform = DeviceMultiViewTransform([_full_image(30, 40, size=16, **fields)])
        return transform(batch, generator=generator)[0][0].cpu()

    torch.testing.assert_close(view(), resized, atol=0, rtol=0)
    torch.testing.assert_close(view(hflip_prob=1.0), TF.horizontal_flip(resized))
    torch.testing.assert_close(view(vflip_prob=1.0), TF.vertical_flip(resized))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    torch.testing.assert_close(
        view(mean=mean, std=std),
        TF.normalize(resized, list(mean), list(std)),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_colour_operations_match_torchvision(device: str) -> None:
    views = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([0.2, 0.9, 1.4, 1.8])
    on_device = views.to(device)
    for ours, reference, tolerance in [
        (ops._adjust_brightness, TF.adjust_brightness, 1e-6),
        (ops._adjust_contrast, TF.adjust_contrast, 2e-4),  # luma 0.299 vs 0.2989
        (ops._adjust_saturation, TF.adjust_saturation, 2e-4),
    ]:
        expected = torch.stack(
            [reference(v, float(f)) for v, f in zip(views, factors, strict=True)]
        )
        result = ours(on_device, factors.to(device)).cpu()
        torch.testing.assert_close(result, expected, atol=tolerance, rtol=0)
    shifts = torch.tensor([-0.5, -0.13, 0.2, 0.45])
    expected = torch.stack(
        [TF.adjust_hue(v, float(s)) for v, s in zip(views, shifts, strict=True)]
    )
    result = ops._adjust_hue(on_device, shifts.to(device)).cpu()
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    gray = ops._grayscale(on_device).cpu()
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(views), atol=2e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [20, 80])  # blur by matrices, by convolution
def test_blur_and_solarize_match_torchvision(device: str, size: int) -> None:
    views = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.1, 0.9, 2.0])
    blurred = ops._gaussian_blur(views.to(device), sigmas.to(device), radius=6).cpu()
    expected = torch.stack(
        [
            TF.gaussian_blur(v, kernel_size=[13, 13], sigma=[float(s), float(s)])
            for v, s in zip(views, sigmas, strict=True)
        ]
    )
    torch.testing.assert_close(blurred, expected, atol=1e-5, rtol=0)
    # lightly solarises PIL images at 128 of 255: the same threshold on [0, 1]
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16) / 255
    solarized = D._solarize(levels.expand(1, 3, 16, 16).to(device)).cpu()
    torch.testing.assert_close(
        solarized, TF.solarize(levels.expand(1, 3, 16, 16), 128 / 255)
    )
    assert solarized.flatten()[127] == levels.flatten()[127]
    assert solarized.flatten()[128] == 1 - levels.flatten()[128]
    between = torch.full((1, 3, 1, 1), 0.501)  # resampled values fall between levels
    assert torch.equal(D._solarize(between.to(device)).cpu(), between)  # < 128/255


# --- random parameters against torchvision's samplers --------------------------


@pytest.mark.parametrize(
    "height, width, scale, ratio",
    [(60, 80, (0.05, 0.3), (3 / 4, 4 / 3)), (375, 500, (0.08, 1.0), (0.5, 2.0))],
)
def test_crop_area_and_aspect_follow_torchvision(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> None:
    generator = torch.Generator().manual_seed(0)
    boxes = D._sample_crop_boxes(NUM_DRAWS, height, width, scale, ratio, generator)
    torch.manual_seed(0)
    reference = torch.tensor(
        [
            T.RandomResizedCrop.get_params(torch.empty(1, height, width), scale, ratio)
            for _ in range(NUM_DRAWS)
        ]
    )
    for rows in (boxes, reference):
        top, left, crop_h, crop_w = rows.T
        assert (top >= 0).all() and (top + crop_h <= height).all()
        assert (left >= 0).all() and (left + crop_w <= width).all()

    def statistics(rows: torch.Tensor) -> dict[str, np.ndarray]:
        top, left, crop_h, crop_w = rows.double().T
        return {
            "area": (crop_h * crop_w / (height * width)).numpy(),
            "log aspect": torch.log(crop_w / crop_h).numpy(),
            "centre x": ((left + crop_w / 2) / width).numpy(),
            "centre y": ((top + crop_h / 2) / height).numpy(),
        }

    ours, theirs = statistics(boxes), statistics(reference)
    for name in ours:
        assert ks_2samp(ours[name], theirs[name]).pvalue > 0.01, name
    # a sampler with uniform (not log-uniform) aspect ratios fails this test
    uniform = torch.empty(NUM_DRAWS).uniform_(*ratio, generator=generator).log()
    assert ks_2samp(uniform.numpy(), theirs["log aspect"]).pvalue < 1e-6


def test_crop_boxes_per_image_size_and_fallback() -> None:
    generator = torch.Generator().manual_seed(0)
    heights = torch.tensor([10, 60] * 2000)
    widths = torch.tensor([100, 80] * 2000)
    boxes = D._sample_crop_boxes(
        4000, heights, widths, (0.9, 1.0), (3 / 4, 4 / 3), generator
    )
    # no box of a 10 x 100 image has area >= 0.9 and ratio <= 4/3: centre crop
    fallback = T.RandomResizedCrop.get_params(
        torch.empty(1, 10, 100), (0.9, 1.0), (3 / 4, 4 / 3)
    )
    assert boxes[0::2].tolist() == [list(fallback)] * 2000
    top, left, crop_h, crop_w = boxes[1::2].T
    assert (top + crop_h <= 60).all() and (left + crop_w <= 80).all()
    assert ((crop_h * crop_w) / (60 * 80) > 0.88).all()


def test_flip_grayscale_blur_solarize_probabilities() -> None:
    batch, per_image = 1000, NUM_DRAWS // 1000
    image = _smooth_image(8, 8)
    images = image.expand(batch, -1, -1, -1)
    settings = {
        "hflip_prob": 0.5,
        "vflip_prob": 0.3,
        "grayscale_prob": 0.2,
        "blur_prob": 0.4,
        "solarize_prob": 0.25,
    }
    for name, probability in settings.items():
        fields: dict[str, object] = {name: probability, "num_views": per_image}
        if name == "blur_prob":
            fields["blur_sigmas"] = (1.0, 2.0)  # visibly blurred
        if name == "solarize_prob":
            images_for = torch.full((batch, 3, 8, 8), 200, dtype=torch.uint8)
        else:
            images_for = images
        transform = DeviceMultiViewTransform([_full_image(8, 8, size=8, **fields)])
        views = torch.stack(
            transform(images_for, generator=torch.Generator().manual_seed(3))
        ).flatten(0, 1)
        plain = images_for[0].float() / 255
        if name == "hflip_prob":
            hit = (views == plain.flip(-1)).flatten(1).all(1)
        elif name == "vflip_prob":
            hit = (views == plain.flip(-2)).flatten(1).all(1)
        elif name == "grayscale_prob":
            hit = (views.amax(1) - views.amin(1)).flatten(1).amax(1) == 0
        elif name == "blur_prob":
            hit = (views - plain).abs().flatten(1).amax(1) > 1e-3
        else:
            hit = (views - (1 - plain)).abs().flatten(1).amax(1) < 1e-6
        low, high = _binomial_bounds(probability, NUM_DRAWS)
        assert low <= hit.double().mean().item() <= high, name


def test_jitter_probability_and_factors_follow_torchvision() -> None:
    batch, per_image = 1000, NUM_DRAWS // 1000
    gray = torch.full((batch, 3, 4, 4), 100, dtype=torch.uint8)
    transform = DeviceMultiViewTransform(
        [
            _full_image(
                4, 4, size=4, num_views=per_image, jitter_prob=0.8, brightness=0.4
            )
        ]
    )
    views = torch.stack(transform(gray, generator=torch.Generator().manual_seed(5)))
    factors = (views.flatten(0, 1)[:, 0, 0, 0] * 255 / 100).double()
    jittered = (factors - 1).abs() > 1e-6
    low, high = _binomial_bounds(0.8, NUM_DRAWS)
    assert low <= jittered.double().mean().item() <= high
    torch.manual_seed(0)
    reference = [
        T.ColorJitter.get_params([0.6, 1.4], None, None, None)[1]
        for _ in range(NUM_DRAWS)
    ]
    assert ks_2samp(factors[jittered].numpy(), np.array(reference)).pvalue > 0.01


def test_hue_shifts_follow_torchvision() -> None:
    batch, per_image = 1000, NUM_DRAWS // 1000
    colour = torch.tensor([200, 60, 30], dtype=torch.uint8).view(1, 3, 1, 1)
    images = colour.expand(batch, 3, 2, 2)
    transform = DeviceMultiViewTransform(
        [_full_image(2, 2, size=2, num_views=per_image, jitter_prob=1.0, hue=0.3)]
    )
    views = torch.stack(transform(images, generator=torch.Generator().manual_seed(6)))
    pixels = views.flatten(0, 1)[:, :, 0, 0].double().tolist()
    start = colorsys.rgb_to_hsv(200 / 255, 60 / 255, 30 / 255)[0]
    shifts = [(colorsys.rgb_to_hsv(*rgb)[0] - start + 0.5) % 1 - 0.5 for rgb in pixels]
    torch.manual_seed(0)
    reference = [
        T.ColorJitter.get_params(None, None, None, [-0.3, 0.3])[4]
        for _ in range(NUM_DRAWS)
    ]
    assert ks_2samp(shifts, reference).pvalue > 0.01
    assert max(abs(shift) for shift in shifts) <= 0.3 + 1e-6


# --- presets: lightly's parameters, shapes, dtypes, ranges ---------------------


def _lightly_spec(view_transform: object, num_views: int) -> dict[str, object]:
    """The ViewSpec fields of one of lightly's view transforms, read from it."""
    fields: dict[str, object] = {"num_views": num_views, "mean": None, "std": None}
    for step in view_transform.transform.transforms:  # type: ignore[attr-defined]
        if isinstance(step, T.RandomResizedCrop):
            fields["size"] = step.size[0]
            fields["crop_scale"] = tuple(step.scale)
            fields["crop_ratio"] = tuple(step.ratio)
            fields["interpolation"] = T.InterpolationMode(step.interpolation).value
        elif isinstance(step, T.RandomHorizontalFlip):
            fields["hflip_prob"] = step.p
        elif isinstance(step, T.RandomVerticalFlip):
            fields["vflip_prob"] = step.p
        elif isinstance(step, T.RandomApply):
            (jitter,) = step.transforms
            fields["jitter_prob"] = step.p
            for name in ("brightness", "contrast", "saturation"):
                fields[name] = getattr(jitter, name)[1] - 1
            fields["hue"] = jitter.hue[1]
        elif isinstance(step, T.RandomGrayscale):
            fields["grayscale_prob"] = step.p
        elif isinstance(step, GaussianBlur):
            fields["blur_prob"] = step.prob
            fields["blur_sigmas"] = tuple(step.sigmas)
        elif isinstance(step, RandomSolarization):
            fields["solarize_prob"] = step.prob
        elif isinstance(step, T.Normalize):
            fields["mean"], fields["std"] = tuple(step.mean), tuple(step.std)
    return fields


def _assert_same_views(ours: DeviceMultiViewTransform, lightly: object) -> None:
    transforms = getattr(lightly, "transforms", [lightly])
    groups: list[tuple[object, int]] = []  # consecutive repeats of one transform
    for transform in transforms:
        if groups and groups[-1][0] is transform:
            groups[-1] = (transform, groups[-1][1] + 1)
        else:
            groups.append((transform, 1))
    assert len(ours.specs) == len(groups)
    for spec, (transform, count) in zip(ours.specs, groups, strict=True):
        expected = _lightly_spec(transform, count)
        for name, value in dataclasses.asdict(spec).items():
            default = ViewSpec.__dataclass_fields__[name].default
            reference = expected.get(name, 0.0 if name.endswith("_prob") else default)
            if isinstance(value, str) or value is None or reference is None:
                assert value == reference, name
            else:
                np.testing.assert_allclose(value, reference, rtol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    "preset, lightly",
    [
        (DeviceMultiViewTransform.msn, MSNTransform),
        (DeviceMultiViewTransform.dino, DINOTransform),
        (DeviceMultiViewTransform.ibot, IBOTTransform),
        (DeviceMultiViewTransform.simclr, SimCLRTransform),
        (DeviceMultiViewTransform.byol, BYOLTransform),
        (DeviceMultiViewTransform.mae, MAETransform),
    ],
)
def test_presets_reproduce_lightly_defaults(preset: object, lightly: type) -> None:
    _assert_same_views(preset(), lightly())  # type: ignore[operator]


def test_presets_pass_arguments_like_lightly() -> None:
    _assert_same_views(
        DeviceMultiViewTransform.dino(
            global_crop_size=64,
            local_crop_size=32,
            n_local_views=3,
            gaussian_blur=(0.7, 0.2, 0.3),
            solarization_prob=0.4,
            normalize=None,
        ),
        DINOTransform(
            global_crop_size=64,
            local_crop_size=32,
            n_local_views=3,
            gaussian_blur=(0.7, 0.2, 0.3),
            solarization_prob=0.4,
            normalize=None,
        ),
    )
    _assert_same_views(
        DeviceMultiViewTransform.msn(random_size=64, focal_size=32, focal_views=4),
        MSNTransform(random_size=64, focal_size=32, focal_views=4),
    )
    _assert_same_views(
        DeviceMultiViewTransform.simclr(input_size=32, min_scale=0.2, cj_strength=0.5),
        SimCLRTransform(input_size=32, min_scale=0.2, cj_strength=0.5),
    )
    # lightly's focal views ignore cj_*; ours (as lightly_msn.MSNTransform) do not
    focal = DeviceMultiViewTransform.msn(cj_strength=0.5).specs[1]
    assert focal.brightness == pytest.approx(0.4) and focal.hue == pytest.approx(0.1)
    assert len(DeviceMultiViewTransform.msn(focal_views=0).specs) == 1


def test_small_image_scaling_matches_msn_cifar10_preset() -> None:
    small = DeviceMultiViewTransform.msn(cj_strength=0.5).for_small_images()
    reference = OurMSNTransform.for_cifar10(cj_strength=0.5)
    for spec, view in zip(
        small.specs,
        [reference.random_view_transform, reference.focal_view_transform],
        strict=True,
    ):
        assert spec.size == view.crop_size and spec.crop_scale == view.crop_scale
        assert spec.blur_prob == view.gaussian_blur == 0.0
        assert spec.brightness == pytest.approx(view.brightness)
        assert spec.mean == tuple(CIFAR10_NORMALIZE["mean"])
    dino = DeviceMultiViewTransform.dino().for_small_images(normalize=None)
    assert [spec.size for spec in dino.specs] == [32, 32, 16]
    assert [spec.solarize_prob for spec in dino.specs] == [0.0, 0.2, 0.0]
    assert all(spec.blur_prob == 0 and spec.mean is None for spec in dino.specs)


@pytest.mark.parametrize(
    "preset, sizes",
    [
        ("msn", [32] * 2 + [16] * 10),
        ("dino", [32] * 2 + [16] * 6),
        ("ibot", [32] * 2 + [16] * 10),
        ("simclr", [32] * 2),
        ("byol", [32] * 2),
        ("mae", [32]),
    ],
)
def test_every_preset_gives_views_of_the_right_shape_and_range(
    preset: str, sizes: list[int]
) -> None:
    images = torch.stack([_smooth_image(40, 48, seed) for seed in range(3)])
    full = getattr(DeviceMultiViewTransform, preset)()
    for normalize in (None, CIFAR10_NORMALIZE):
        transform = full.for_small_images(normalize=normalize)
        assert transform.num_views == len(sizes)
        views = transform(images, generator=torch.Generator().manual_seed(0))
        assert [tuple(v.shape) for v in views] == [(3, 3, s, s) for s in sizes]
        for view in views:
            assert view.dtype == torch.float32 and view.is_contiguous()
            assert torch.isfinite(view).all()
            if normalize is None:
                assert view.min() >= 0 and view.max() <= 1
            channels_last = view.to(memory_format=torch.channels_last)
            torch.testing.assert_close(channels_last, view, atol=0, rtol=0)
    # full-size views with ImageNet normalisation (blur on, bicubic for DINO)
    views = full(images[:1], generator=torch.Generator().manual_seed(0))
    assert {tuple(v.shape[-2:]) for v in views} <= {(224, 224), (96, 96)}
    stacked = torch.cat([v.flatten() for v in views])
    assert torch.isfinite(stacked).all() and stacked.min() < 0  # mean removed


# --- determinism, input forms, autocast ------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_views_other_seed_other_views(device: str) -> None:
    images = torch.stack([_smooth_image(40, 48, seed) for seed in range(4)]).to(device)
    transform = DeviceMultiViewTransform.dino(n_local_views=3).for_small_images()
    first = transform(images, generator=torch.Generator().manual_seed(7))
    again = transform(images, generator=torch.Generator().manual_seed(7))
    other = transform(images, generator=torch.Generator().manual_seed(8))
    for a, b in zip(first, again, strict=True):
        assert a.device.type == device
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(not torch.equal(a, c) for a, c in zip(first, other, strict=True))
    # without a generator: torch's global one, so torch.manual_seed decides
    torch.manual_seed(1)
    seeded = transform(images)
    torch.manual_seed(1)
    for a, b in zip(seeded, transform(images), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_list_of_differently_sized_images() -> None:
    noisy = torch.randint(
        0,
        256,
        (3, 50, 70),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    flat = torch.full((3, 20, 12), 77, dtype=torch.uint8)
    transform = DeviceMultiViewTransform(
        [ViewSpec(size=16, num_views=3, **{**PLAIN, "crop_scale": (0.2, 1.0)})]
    )
    views = transform([noisy, flat, noisy], generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 3, 16, 16)] * 3
    for view in views:  # the constant image's views see nothing of the others
        torch.testing.assert_close(view[1], torch.full((3, 16, 16), 77 / 255))
        assert view[0].std() > 0.02  # resampled noise
    # a list of equally sized images is the stacked batch
    images = [_smooth_image(30, 30, seed) for seed in range(3)]
    transform = DeviceMultiViewTransform.msn(focal_views=2).for_small_images()
    from_list = transform(images, generator=torch.Generator().manual_seed(4))
    from_batch = transform(
        torch.stack(images), generator=torch.Generator().manual_seed(4)
    )
    channels_last = torch.stack(images).contiguous(memory_format=torch.channels_last)
    from_cl = transform(channels_last, generator=torch.Generator().manual_seed(4))
    for a, b, c in zip(from_list, from_batch, from_cl, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_changes_nothing(device: str) -> None:
    images = torch.stack([_smooth_image(120, 100, seed) for seed in range(2)]).to(
        device
    )
    transform = DeviceMultiViewTransform.msn(
        random_size=80, focal_size=24, focal_views=2, gaussian_blur=1.0
    )
    plain = transform(images, generator=torch.Generator().manual_seed(2))
    with torch.autocast(device, dtype=torch.bfloat16):
        autocast = transform(images, generator=torch.Generator().manual_seed(2))
    for a, b in zip(plain, autocast, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@CUDA
def test_cuda_views_match_cpu_views() -> None:
    # images up to 32 px: both devices resample in float32, same parameters
    small = torch.stack([_smooth_image(32, 32, seed) for seed in range(4)])
    transform = DeviceMultiViewTransform.dino(n_local_views=2).for_small_images()
    on_cpu = transform(small, generator=torch.Generator().manual_seed(0))
    on_cuda = transform(small.cuda(), generator=torch.Generator().manual_seed(0))
    for a, b in zip(on_cpu, on_cuda, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=0)
    # larger images: the CPU resizes in uint8, at most 1 level from float32; DINO's
    # jitter amplifies a difference at most 1.4 (brightness) x 1.8 (contrast:
    # f + |1 - f|) x 1.2 (saturation) times, the normalisation 1 / 0.224 times
    large = torch.stack([_smooth_image(60, 80, seed) for seed in range(4)])
    transform = DeviceMultiViewTransform.dino(
        global_crop_size=48, local_crop_size=24, n_local_views=2
    )
    on_cpu = transform(large, generator=torch.Generator().manual_seed(0))
    on_cuda = transform(large.cuda(), generator=torch.Generator().manual_seed(0))
    bound = 1 / 255 * 1.4 * 1.8 * 1.2 / 0.224
    for a, b in zip(on_cpu, on_cuda, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=bound, rtol=0)


# --- bad arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"size": 0}, "size must be >= 1, got 0"),
        ({"size": 2.5}, "size must be an int"),
        ({"num_views": 0}, "num_views must be >= 1, got 0"),
        ({"crop_scale": (0.5, 0.2)}, r"crop_scale must satisfy 0 < min <= max <= 1"),
        ({"crop_ratio": (0.0, 1.0)}, r"crop_ratio must satisfy 0 < min <= max"),
        ({"interpolation": "nearest"}, "interpolation must be 'bilinear' or 'bicubic'"),
        ({"jitter_prob": 1.5}, r"jitter_prob is a probability in \[0, 1\], got 1.5"),
        ({"solarize_prob": -0.1}, "solarize_prob is a probability"),
        ({"saturation": -1.0}, "saturation must be >= 0"),
        ({"hue": 0.6}, r"hue must be in \[0, 0.5\], got 0.6"),
        ({"blur_sigmas": (2.0, 1.0)}, "blur_sigmas must satisfy"),
        ({"mean": None}, "mean and std must both be given or both be None"),
        ({"mean": (0.5, 0.5), "std": (1.0, 1.0)}, "mean and std need 3 values each"),
        ({"std": (1.0, 0.0, 1.0)}, "std values must be > 0"),
    ],
)
def test_view_spec_rejects_bad_arguments(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=f"ViewSpec: {message}"):
        ViewSpec(**{"size": 8, **fields})  # type: ignore[arg-type]


def test_transform_rejects_bad_specs_and_inputs() -> None:
    with pytest.raises(ValueError, match="specs must not be empty"):
        DeviceMultiViewTransform([])
    with pytest.raises(TypeError, match=r"specs\[1\] must be a ViewSpec, got dict"):
        DeviceMultiViewTransform([ViewSpec(size=8), {"size": 8}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="hf_prob|hflip_prob"):
        DeviceMultiViewTransform.msn(hf_prob=2.0)
    transform = DeviceMultiViewTransform([ViewSpec(size=8)])
    for images, error, message in [
        (
            torch.zeros(2, 3, 8, 8),
            ValueError,
            r"uint8 batch \(B, 3, H, W\), got torch.float32",
        ),
        (
            torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
            ValueError,
            r"shape \(2, 1, 8, 8\)",
        ),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), ValueError, "the batch is empty"),
        ([], ValueError, "the list of images is empty"),
        ([np.zeros((3, 8, 8), np.uint8)], TypeError, r"images\[0\] must be a tensor"),
        (
            [
                torch.zeros(3, 8, 8, dtype=torch.uint8),
                torch.zeros(3, 0, 8, dtype=torch.uint8),
            ],
            ValueError,
            r"images\[1\] must be a non-empty uint8 \(3, H, W\) tensor",
        ),
        (
            [
                torch.zeros(3, 8, 8, dtype=torch.uint8),
                torch.zeros(3, 8, 8, dtype=torch.uint8, device="meta"),
            ],
            ValueError,
            r"images\[1\] is on meta, images\[0\] on cpu",
        ),
    ]:
        with pytest.raises(error, match=message):
            transform(images)  # type: ignore[arg-type]


@CUDA
def test_transform_rejects_a_cuda_generator() -> None:
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="pass a CPU generator"):
        DeviceMultiViewTransform([ViewSpec(size=8)])(
            images, generator=torch.Generator(device="cuda")
        )


def test_benchmark_candidates_resize_what_they_claim() -> None:
    from benchmarks import perf_device_transforms as bench

    images = torch.stack([_smooth_image(20, 24, seed) for seed in range(2)])
    plan = bench.make_plan(2, 20, 24, (8, 4))
    reference = bench.resize_reference(images, plan)
    for resize, tolerance in [
        (bench.resize_per_view, 1 / 255),  # uint8 rounding
        (bench.resize_batched, 1e-5),
        (bench.resize_roi_align, 0.5),  # box-filtered bilinear samples
    ]:
        for views, expected in zip(resize(images, plan), reference, strict=True):
            torch.testing.assert_close(views, expected, atol=tolerance, rtol=0)
