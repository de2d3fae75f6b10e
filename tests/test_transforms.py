"""Tests for lightly_msn.transforms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from lightly.transforms import MSNTransform as LightlyMSNTransform
from PIL import Image

from lightly_msn import transforms
from lightly_msn.transforms import CIFAR10_NORMALIZE, MSNTransform, MSNViewTransform

NO_AUGMENTATION = {
    "cj_prob": 0.0,
    "gaussian_blur": 0.0,
    "random_gray_scale": 0.0,
    "hf_prob": 0.0,
    "normalize": None,
}


def _colourful_image(width: int = 40, height: int = 36) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack(
        [255 * x / width, 255 * y / height, 255 * (1 - x / width) * (y % 7) / 6],
        axis=-1,
    )
    return Image.fromarray(array.astype(np.uint8))


def _gray_image(size: int = 32, level: int = 128) -> Image.Image:
    return Image.new("RGB", (size, size), (level, level, level))


def test_views_number_order_sizes_dtype_and_range() -> None:
    torch.manual_seed(0)
    transform = MSNTransform(
        random_size=32, focal_size=16, random_views=2, focal_views=3, normalize=None
    )
    views = transform(_colourful_image())
    assert len(views) == 5
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    for view in views:
        assert view.dtype == torch.float32
        assert view.min() >= 0 and view.max() <= 1

    normalized = MSNTransform(random_size=32, focal_size=16)(_colourful_image())
    assert len(normalized) == 12
    stacked = torch.stack(normalized[:2])
    assert torch.isfinite(stacked).all() and stacked.min() < 0  # ImageNet mean removed


def test_identity_settings_return_the_image_and_flip_flips() -> None:
    image = _colourful_image(24, 24)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    full_crop = {"crop_size": 24, "crop_scale": (1.0, 1.0)}
    view = MSNViewTransform(**full_crop, **NO_AUGMENTATION)(image)
    torch.testing.assert_close(view, pixels)

    flipped = MSNViewTransform(**full_crop, **{**NO_AUGMENTATION, "hf_prob": 1.0})
    torch.testing.assert_close(flipped(image), pixels.flip(-1))
    vflipped = MSNViewTransform(**full_crop, **NO_AUGMENTATION, vf_prob=1.0)
    torch.testing.assert_close(vflipped(image), pixels.flip(-2))

    normalized = MSNViewTransform(
        **full_crop, **{**NO_AUGMENTATION, "normalize": CIFAR10_NORMALIZE}
    )(image)
    mean = torch.tensor(CIFAR10_NORMALIZE["mean"]).view(3, 1, 1)
    std = torch.tensor(CIFAR10_NORMALIZE["std"]).view(3, 1, 1)
    torch.testing.assert_close(normalized, (pixels - mean) / std)


def test_focal_views_use_colour_jitter_arguments_unlike_lightly() -> None:
    torch.manual_seed(0)
    image = _gray_image()
    no_jitter = {
        "cj_prob": 1.0,
        "cj_bright": 0.0,
        "cj_contrast": 0.0,
        "cj_sat": 0.0,
        "cj_hue": 0.0,
        "gaussian_blur": 0.0,
        "random_gray_scale": 0.0,
        "random_size": 32,
        "focal_size": 16,
        "focal_views": 20,
        "normalize": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
    }
    ours = torch.stack(MSNTransform(**no_jitter)(image)[2:])
    torch.testing.assert_close(ours, torch.full_like(ours, 128 / 255))
    # lightly's focal views keep their default jitter whatever cj_* say
    lightly = torch.stack(LightlyMSNTransform(**no_jitter)(image)[2:])
    assert lightly.mean(dim=(1, 2, 3)).std() > 0.05

    bright = MSNTransform(**{**no_jitter, "cj_bright": 0.8})(image)[2:]
    focal_means = torch.stack(bright).mean(dim=(1, 2, 3))
    assert focal_means.std() > 0.05
    assert focal_means.min() < 0.4 and focal_means.max() > 0.6
    disabled = MSNTransform(**{**no_jitter, "cj_bright": 0.8, "cj_prob": 0.0})(image)
    torch.testing.assert_close(torch.stack(disabled[2:]), ours)


def test_augmentation_probabilities_are_respected() -> None:
    torch.manual_seed(0)
    image = _gray_image(level=128)
    jitter = MSNViewTransform(
        crop_size=8, **{**NO_AUGMENTATION, "cj_prob": 0.8}, cj_hue=0.0
    )
    changed = (jitter.views(image, 2000) - 128 / 255).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert changed.float().mean().item() == pytest.approx(0.8, abs=0.03)

    gray = MSNViewTransform(
        crop_size=8, **{**NO_AUGMENTATION, "random_gray_scale": 0.2}
    )
    views = gray.views(_colourful_image(), 2000)
    is_gray = (views.amax(dim=1) - views.amin(dim=1)).amax(dim=(1, 2)) < 1e-6
    assert is_gray.float().mean().item() == pytest.approx(0.2, abs=0.03)


def test_crop_boxes_follow_torchvision_distribution_and_fallback() -> None:
    torch.manual_seed(0)
    height, width, scale = 60, 80, (0.05, 0.3)
    boxes = transforms._sample_crop_boxes(4000, height, width, scale)
    top, left, crop_h, crop_w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    area = (crop_h * crop_w).float() / (height * width)
    assert area.min() > 0.04 and area.max() < 0.32  # scale range, up to rounding
    ratio = crop_w.float() / crop_h.float()
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    # reference sample from torchvision's own sampler
    reference = torch.tensor(
        [
            T.RandomResizedCrop.get_params(
                torch.empty(1, height, width), scale, (3 / 4, 4 / 3)
            )
            for _ in range(4000)
        ]
    )
    ref_area = (reference[:, 2] * reference[:, 3]).float() / (height * width)
    assert area.mean().item() == pytest.approx(ref_area.mean().item(), abs=0.005)
    assert top.float().mean().item() == pytest.approx(
        reference[:, 0].float().mean().item(), abs=1.0
    )

    # no box of a 10:1 image fits scale (0.9, 1) and ratio <= 4/3: centre crop
    fallback = transforms._sample_crop_boxes(3, 10, 100, (0.9, 1.0))
    expected = T.RandomResizedCrop.get_params(
        torch.empty(1, 10, 100), (0.9, 1.0), (3 / 4, 4 / 3)
    )
    assert fallback.tolist() == [list(expected)] * 3


def test_colour_operations_match_torchvision_per_view() -> None:
    torch.manual_seed(0)
    views = torch.rand(4, 3, 12, 12)
    factors = torch.tensor([0.2, 0.9, 1.4, 1.8])
    for ours, reference in [
        (transforms._adjust_brightness, TF.adjust_brightness),
        (transforms._adjust_contrast, TF.adjust_contrast),
        (transforms._adjust_saturation, TF.adjust_saturation),
    ]:
        expected = torch.stack(
            [reference(v, float(f)) for v, f in zip(views, factors, strict=True)]
        )
        torch.testing.assert_close(ours(views, factors), expected, atol=2e-4, rtol=0)
    shifts = torch.tensor([-0.5, -0.13, 0.2, 0.45])
    expected = torch.stack(
        [TF.adjust_hue(v, float(s)) for v, s in zip(views, shifts, strict=True)]
    )
    torch.testing.assert_close(
        transforms._adjust_hue(views, shifts), expected, atol=1e-5, rtol=0
    )
    gray = transforms._grayscale(views)
    # PIL's luma weights (0.299, ...); torchvision's tensor path uses 0.2989
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(views), atol=2e-4, rtol=0)


@pytest.mark.parametrize("size", [20, 80])  # matrix path and convolution path
def test_gaussian_blur_matches_torchvision(size: int) -> None:
    torch.manual_seed(0)
    views = torch.rand(3, 3, size, size)
    sigmas = torch.tensor([0.1, 0.9, 2.0])
    blurred = transforms._gaussian_blur(views, sigmas, radius=6)
    expected = torch.stack(
        [
            TF.gaussian_blur(v, kernel_size=[13, 13], sigma=[float(s), float(s)])
            for v, s in zip(views, sigmas, strict=True)
        ]
    )
    torch.testing.assert_close(blurred, expected, atol=1e-5, rtol=0)


def test_view_statistics_match_lightly() -> None:
    """Same augmentation distribution: per-channel mean and spread over many views."""
    torch.manual_seed(0)
    image = _colourful_image(32, 32)
    settings = {
        "random_size": 32,
        "focal_size": 16,
        "random_views": 4,
        "focal_views": 6,
        "normalize": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
    }
    ours = [MSNTransform(**settings)(image) for _ in range(150)]
    lightly = [LightlyMSNTransform(**settings)(image) for _ in range(150)]
    # differences seen over seeds: <= 0.023; without colour jitter: 0.04-0.06
    for kind in (slice(0, 4), slice(4, 10)):  # random views, focal views
        our_views = torch.stack([torch.stack(views[kind]) for views in ours])
        lightly_views = torch.stack([torch.stack(views[kind]) for views in lightly])
        for statistic in (torch.mean, torch.std):
            torch.testing.assert_close(
                statistic(our_views, dim=(0, 1, 3, 4)),
                statistic(lightly_views, dim=(0, 1, 3, 4)),
                atol=0.03,
                rtol=0,
            )


def test_input_types() -> None:
    torch.manual_seed(0)
    transform = MSNViewTransform(crop_size=8)
    array = np.array(_colourful_image())
    for image in [
        Image.fromarray(array).convert("L"),
        Image.fromarray(array).convert("RGBA"),
        torch.from_numpy(array).permute(2, 0, 1),  # uint8
        torch.from_numpy(array).permute(2, 0, 1).float() / 255,
        torch.rand(1, 20, 20),
    ]:
        assert transform(image).shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"C = 1 or 3, got shape \(4, 5, 5\)"):
        transform(torch.rand(4, 5, 5))
    with pytest.raises(ValueError, match="uint8 or floating-point"):
        transform(torch.zeros(3, 5, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="got ndarray"):
        transform(array)  # type: ignore[arg-type]


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"cj_hue must be in \[0, 0.5\], got 0.6"):
        MSNViewTransform(cj_hue=0.3, cj_strength=2.0)
    with pytest.raises(ValueError, match="gaussian_blur is a probability"):
        MSNTransform(gaussian_blur=1.5)
    with pytest.raises(ValueError, match="crop_scale must satisfy"):
        MSNViewTransform(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="focal_views must be >= 0"):
        MSNTransform(focal_views=-1)
    with pytest.raises(ValueError, match="normalize needs 1 or 3 values"):
        MSNViewTransform(normalize={"mean": [0.5, 0.5], "std": [0.2, 0.2]})
    with pytest.raises(ValueError, match="num_views must be >= 1, got 0"):
        MSNViewTransform(crop_size=8).views(_gray_image(), 0)


def test_cifar10_preset() -> None:
    torch.manual_seed(0)
    transform = MSNTransform.for_cifar10()
    assert transform.random_view_transform.crop_size == 32
    assert transform.focal_view_transform.crop_size == 16
    assert transform.focal_view_transform.gaussian_blur == 0.0
    assert transform.focal_view_transform.brightness == pytest.approx(0.8)
    views = transform(_colourful_image(32, 32))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 10
    assert (
        transform.transforms
        == [transform.random_view_transform] * 2 + [transform.focal_view_transform] * 10
    )
    fewer = MSNTransform.for_cifar10(focal_views=4, cj_strength=0.5)
    assert len(fewer(_colourful_image(32, 32))) == 6
    assert fewer.random_view_transform.brightness == pytest.approx(0.4)


def test_transform_pickles_for_data_loader_workers() -> None:
    transform = MSNTransform.for_cifar10(focal_views=2)
    restored = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(3)
    expected = transform(_colourful_image(32, 32))
    torch.manual_seed(3)
    for ours, reference in zip(
        restored(_colourful_image(32, 32)), expected, strict=True
    ):
        torch.testing.assert_close(ours, reference)
