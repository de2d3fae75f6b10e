"""MSN multi-view augmentations, batched per view size.

Drop-in for ``lightly.transforms.MSNTransform`` / ``MSNViewTransform``: same
arguments, same output (a list ``[random views..., focal views...]`` of
normalised float tensors), same augmentations as the official code [1]
(``src/data_manager.py``): random resized crop, horizontal flip, colour jitter,
random grayscale, Gaussian blur, normalisation.

Differences from lightly:

- The focal views use ``cj_bright``, ``cj_contrast``, ``cj_sat`` and ``cj_hue``
  (lightly's focal views silently keep the defaults 0.8/0.8/0.8/0.2).
- Speed: the image is converted to a tensor once; each view is cropped and
  resized on its own (uint8, antialiased bilinear, as PIL does), then all views of
  one size are augmented together as one batch with per-view random parameters
  (no Python work per view and per operation).

The random parameters follow torchvision's distributions (crop box sampling with
10 attempts and the centre-crop fallback, colour-jitter factors and the random
order of the four jitter operations per view). Deviations, all numerical rather
than distributional: colour operations run in float32 on the resized crop
instead of PIL's uint8 with rounding after every step; the hue shift uses the
exact HSV formula (PIL quantises hue to 256 levels); the Gaussian blur is an
exact Gaussian truncated at ``3 * max(sigmas)`` with reflected borders, where
PIL approximates it by three box blurs; random numbers come from torch's
generator (lightly's blur uses numpy's).

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
- [1]: https://github.com/facebookresearch/msn
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params
_MATMUL_BLUR_MAX_SIZE = 64  # blur by matrix products up to this size, see below

CIFAR10_NORMALIZE = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


class MSNViewTransform:
    """Transforms an image into MSN views of one size [0].

    Same arguments as ``lightly.transforms.msn_transform.MSNViewTransform``.
    ``transform(image)`` returns one view ``(3, crop_size, crop_size)``;
    ``transform.views(image, num_views)`` returns ``num_views`` independent views
    as one ``(num_views, 3, crop_size, crop_size)`` tensor, much faster than
    calling it ``num_views`` times.

    Augmentations, in this order: random resized crop, horizontal flip, vertical
    flip, colour jitter (brightness, contrast, saturation, hue in a random order
    per view), grayscale, Gaussian blur, normalisation.

    Args:
        crop_size: Size of the square output views in pixels.
        crop_scale: Min and max area of the crop relative to the image.
        cj_prob: Probability that colour jitter is applied.
        cj_strength: Multiplies ``cj_bright``, ``cj_contrast``, ``cj_sat``,
            ``cj_hue``.
        cj_bright: How much to jitter brightness.
        cj_contrast: How much to jitter contrast.
        cj_sat: How much to jitter saturation.
        cj_hue: How much to jitter hue; ``cj_strength * cj_hue`` at most 0.5.
        gaussian_blur: Probability of Gaussian blur.
        sigmas: Min and max standard deviation of the blur, in output pixels.
        random_gray_scale: Probability of conversion to grayscale.
        hf_prob: Probability of a horizontal flip.
        vf_prob: Probability of a vertical flip.
        normalize: ``{"mean": [...], "std": [...]}`` per channel, or ``None`` to
            return values in [0, 1].

    Input: a PIL image (converted to RGB), or a ``(C, H, W)`` tensor with 1 or 3
    channels, uint8 or float in [0, 1]. Output: float32 tensors.
    """

    def __init__(
        self,
        crop_size: int = 224,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        gaussian_blur: float = 0.5,
        sigmas: tuple[float, float] = (0.1, 2),
        random_gray_scale: float = 0.2,
        hf_prob: float = 0.5,
        vf_prob: float = 0.0,
        normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE,
    ) -> None:
        if crop_size < 1:
            raise ValueError(
                f"MSNViewTransform: crop_size must be >= 1, got {crop_size}."
            )
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(
                "MSNViewTransform: crop_scale must satisfy 0 < min <= max <= 1, "
                f"got {crop_scale}."
            )
        for name, probability in [
            ("cj_prob", cj_prob),
            ("gaussian_blur", gaussian_blur),
            ("random_gray_scale", random_gray_scale),
            ("hf_prob", hf_prob),
            ("vf_prob", vf_prob),
        ]:
            if not 0.0 <= probability <= 1.0:
                raise ValueError(
                    f"MSNViewTransform: {name} is a probability in [0, 1], "
                    f"got {probability}."
                )
        jitter = {
            "cj_bright": cj_strength * cj_bright,
            "cj_contrast": cj_strength * cj_contrast,
            "cj_sat": cj_strength * cj_sat,
        }
        for name, value in jitter.items():
            if value < 0:
                raise ValueError(
                    f"MSNViewTransform: cj_strength * {name} must be >= 0, got {value}."
                )
        hue = cj_strength * cj_hue
        if not 0.0 <= hue <= 0.5:
            raise ValueError(
                "MSNViewTransform: cj_strength * cj_hue must be in [0, 0.5], "
                f"got {hue}."
            )
        if not 0.0 < sigmas[0] <= sigmas[1]:
            raise ValueError(
                f"MSNViewTransform: sigmas must satisfy 0 < min <= max, got {sigmas}."
            )
        self.crop_size = crop_size
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.cj_prob = cj_prob
        self.brightness = jitter["cj_bright"]
        self.contrast = jitter["cj_contrast"]
        self.saturation = jitter["cj_sat"]
        self.hue = hue
        self.gaussian_blur = gaussian_blur
        self.sigmas = (float(sigmas[0]), float(sigmas[1]))
        self.random_gray_scale = random_gray_scale
        self.hf_prob = hf_prob
        self.vf_prob = vf_prob
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        if normalize is not None:
            self.mean = torch.tensor(normalize["mean"], dtype=torch.float32).view(
                -1, 1, 1
            )
            self.std = torch.tensor(normalize["std"], dtype=torch.float32).view(
                -1, 1, 1
            )
            if self.mean.shape[0] not in (1, 3) or self.std.shape[0] not in (1, 3):
                raise ValueError(
                    "MSNViewTransform: normalize needs 1 or 3 values for 'mean' and "
                    f"'std', got {normalize}."
                )

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        """Returns one augmented view ``(3, crop_size, crop_size)`` of ``image``."""
        return self.views(image, num_views=1)[0]

    def views(self, image: Image.Image | Tensor, num_views: int) -> Tensor:
        """Returns ``num_views`` independent views, ``(num_views, 3, size, size)``."""
        if num_views < 1:
            raise ValueError(
                f"MSNViewTransform.views: num_views must be >= 1, got {num_views}."
            )
        return self._augment(_crops(image_to_tensor(image), num_views, self))

    def _augment(self, views: Tensor) -> Tensor:
        num_views = views.shape[0]
        if self.hf_prob > 0:
            _apply_where(views, torch.rand(num_views) < self.hf_prob, _flip_width)
        if self.vf_prob > 0:
            _apply_where(views, torch.rand(num_views) < self.vf_prob, _flip_height)
        if self.cj_prob > 0:
            _color_jitter(
                views,
                torch.rand(num_views) < self.cj_prob,
                self.brightness,
                self.contrast,
                self.saturation,
                self.hue,
            )
        if self.random_gray_scale > 0:
            gray = torch.rand(num_views) < self.random_gray_scale
            _apply_where(views, gray, lambda x: _grayscale(x).expand_as(x))
        if self.gaussian_blur > 0:
            blur = torch.rand(num_views) < self.gaussian_blur
            sigmas = torch.empty(num_views).uniform_(*self.sigmas)
            radius = math.ceil(3 * self.sigmas[1])
            _apply_where(views, blur, lambda x, s: _gaussian_blur(x, s, radius), sigmas)
        if self.mean is not None and self.std is not None:
            views.sub_(self.mean).div_(self.std)
        return views


class MSNTransform:
    """Implements the transformations for MSN [0].

    Same arguments and output as ``lightly.transforms.MSNTransform``: calling it
    on an image returns the list ``[random_view_0, ..., focal_view_0, ...]`` of
    ``random_views + focal_views`` float tensors of sizes ``random_size`` and
    ``focal_size``. Unlike lightly, the focal views use the colour-jitter
    arguments ``cj_bright``, ``cj_contrast``, ``cj_sat``, ``cj_hue`` too.

    See :class:`MSNViewTransform` for the augmentations and
    :meth:`for_cifar10` for a preset for 32x32 images.

    Args:
        random_size: Size of the random views in pixels.
        focal_size: Size of the focal views in pixels.
        random_views: Number of random views.
        focal_views: Number of focal views.
        random_crop_scale: Min and max crop area of the random views, relative
            to the image.
        focal_crop_scale: Min and max crop area of the focal views.
        cj_prob: As in :class:`MSNViewTransform`, for both kinds of views.
        cj_strength: As in :class:`MSNViewTransform`, for both kinds of views.
        cj_bright: As in :class:`MSNViewTransform`, for both kinds of views.
        cj_contrast: As in :class:`MSNViewTransform`, for both kinds of views.
        cj_sat: As in :class:`MSNViewTransform`, for both kinds of views.
        cj_hue: As in :class:`MSNViewTransform`, for both kinds of views.
        gaussian_blur: As in :class:`MSNViewTransform`, for both kinds of views.
        sigmas: As in :class:`MSNViewTransform`, for both kinds of views.
        random_gray_scale: As in :class:`MSNViewTransform`, for both kinds of views.
        hf_prob: As in :class:`MSNViewTransform`, for both kinds of views.
        vf_prob: As in :class:`MSNViewTransform`, for both kinds of views.
        normalize: As in :class:`MSNViewTransform`, for both kinds of views.
    """

    def __init__(
        self,
        random_size: int = 224,
        focal_size: int = 96,
        random_views: int = 2,
        focal_views: int = 10,
        random_crop_scale: tuple[float, float] = (0.3, 1.0),
        focal_crop_scale: tuple[float, float] = (0.05, 0.3),
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        gaussian_blur: float = 0.5,
        sigmas: tuple[float, float] = (0.1, 2),
        random_gray_scale: float = 0.2,
        hf_prob: float = 0.5,
        vf_prob: float = 0.0,
        normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE,
    ) -> None:
        if random_views < 0 or focal_views < 0:
            raise ValueError(
                "MSNTransform: random_views and focal_views must be >= 0, got "
                f"{random_views} and {focal_views}."
            )
        view_transform = functools.partial(
            MSNViewTransform,
            cj_prob=cj_prob,
            cj_strength=cj_strength,
            cj_bright=cj_bright,
            cj_contrast=cj_contrast,
            cj_sat=cj_sat,
            cj_hue=cj_hue,
            gaussian_blur=gaussian_blur,
            sigmas=sigmas,
            random_gray_scale=random_gray_scale,
            hf_prob=hf_prob,
            vf_prob=vf_prob,
            normalize=normalize,
        )
        self.random_views = random_views
        self.focal_views = focal_views
        self.random_view_transform = view_transform(
            crop_size=random_size, crop_scale=random_crop_scale
        )
        self.focal_view_transform = view_transform(
            crop_size=focal_size, crop_scale=focal_crop_scale
        )

    @classmethod
    def for_cifar10(
        cls, random_views: int = 2, focal_views: int = 10, **kwargs: object
    ) -> MSNTransform:
        """Preset for 32x32 images such as CIFAR-10.

        Random views of 32 px, focal views of 16 px, no Gaussian blur (a blur of
        up to 2 px erases most of a 32 px image; lightly's and solo-learn's CIFAR
        recipes drop it too) and CIFAR-10 normalisation statistics. Other
        arguments as for :class:`MSNTransform` and override the preset.
        """
        preset: dict[str, object] = {
            "random_size": 32,
            "focal_size": 16,
            "gaussian_blur": 0.0,
            "normalize": CIFAR10_NORMALIZE,
        }
        preset.update(kwargs)
        return cls(random_views=random_views, focal_views=focal_views, **preset)  # type: ignore[arg-type]

    @property
    def transforms(self) -> list[MSNViewTransform]:
        """The transform of each output view, as lightly's ``MultiViewTransform``."""
        return [self.random_view_transform] * self.random_views + [
            self.focal_view_transform
        ] * self.focal_views

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor]:
        """Returns ``[random views..., focal views...]`` of ``image``."""
        pixels = image_to_tensor(image)
        views: list[Tensor] = []
        for transform, count in [
            (self.random_view_transform, self.random_views),
            (self.focal_view_transform, self.focal_views),
        ]:
            if count > 0:
                views.extend(transform.views(pixels, count).unbind(0))
        return views


def image_to_tensor(image: Image.Image | Tensor) -> Tensor:
    """Returns a PIL image or ``(C, H, W)`` tensor as a ``(3, H, W)`` tensor.

    uint8 stays uint8, floating point stays floating point; a float tensor with
    values outside [0, 1] (e.g. 0..255 pixels) raises a ``ValueError``.
    """
    if isinstance(image, Image.Image):
        array = np.array(image if image.mode == "RGB" else image.convert("RGB"))
        # (C, H, W) view of the (H, W, C) array: channels-last memory, in which
        # torch's antialiased uint8 resize is faster than in NCHW
        return torch.from_numpy(array).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(
            f"MSN transforms take a PIL image or a tensor, got {type(image).__name__}."
        )
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            "MSN transforms take a (C, H, W) tensor with C = 1 or 3, got shape "
            f"{tuple(image.shape)}."
        )
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(
            f"MSN transforms take uint8 or floating-point tensors, got {image.dtype}."
        )
    if image.is_floating_point():
        low, high = (float(value) for value in torch.aminmax(image))
        if not 0.0 <= low <= high <= 1.0:  # NaN fails too
            raise ValueError(
                "MSN transforms take float tensors with values in [0, 1], found values "
                f"in [{low:g}, {high:g}]; divide 0..255 pixels by 255 or pass uint8."
            )
    return image.expand(3, -1, -1)


def _crops(pixels: Tensor, num_views: int, transform: MSNViewTransform) -> Tensor:
    """Random resized crops of ``pixels`` as float32 in [0, 1], ``(n, 3, s, s)``."""
    height, width = pixels.shape[-2:]
    boxes = _sample_crop_boxes(num_views, height, width, transform.crop_scale)
    size = (transform.crop_size, transform.crop_size)
    batch = pixels.unsqueeze(0)
    crops = torch.cat(
        [
            F.interpolate(
                batch[:, :, top : top + h, left : left + w],
                size=size,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            for top, left, h, w in boxes.tolist()
        ]
    )
    crops = crops.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    return crops.div_(255) if pixels.dtype == torch.uint8 else crops.clamp_(0, 1)


def _sample_crop_boxes(
    num_views: int,
    height: int | Tensor,
    width: int | Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = _CROP_RATIO,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for ``num_views`` crops at once.

    ``height`` and ``width`` are the image size, one for all views or a CPU tensor
    ``(num_views,)`` with each view's image size. Random numbers come from
    ``generator`` (torch's global one if ``None``); computed on the CPU.

    Returns ``(num_views, 4)`` integer rows ``(top, left, height, width)``.
    """
    height = torch.as_tensor(height, dtype=torch.float64)
    width = torch.as_tensor(width, dtype=torch.float64)
    shape = (num_views, _CROP_ATTEMPTS)
    area = height * width
    fraction = torch.empty(shape).uniform_(*scale, generator=generator)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.empty(shape).uniform_(*log_ratio, generator=generator).exp_()
    target_area = area.view(-1, 1) * fraction.double()
    widths = torch.sqrt(target_area * aspect.double()).round_()
    heights = torch.sqrt(target_area / aspect.double()).round_()
    valid = (
        (widths > 0)
        & (widths <= width.view(-1, 1))
        & (heights > 0)
        & (heights <= height.view(-1, 1))
    )
    first_valid = valid.int().argmax(dim=1, keepdim=True)
    crop_w = widths.gather(1, first_valid).squeeze(1)
    crop_h = heights.gather(1, first_valid).squeeze(1)

    # no attempt fits: centre crop of the whole image at the closest allowed ratio
    in_ratio = width / height
    fallback_w = torch.where(
        in_ratio > ratio[1], torch.round(height * ratio[1]), width
    ).expand(num_views)
    fallback_h = torch.where(
        in_ratio < ratio[0], torch.round(width / ratio[0]), height
    ).expand(num_views)
    fits = valid.any(dim=1)
    crop_w = torch.where(fits, crop_w, fallback_w)
    crop_h = torch.where(fits, crop_h, fallback_h)
    top = (torch.rand(num_views, generator=generator) * (height - crop_h + 1)).floor_()
    left = (torch.rand(num_views, generator=generator) * (width - crop_w + 1)).floor_()
    top = torch.where(fits, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(fits, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


def _apply_where(
    views: Tensor,
    selected: Tensor,
    operation: Callable[..., Tensor],
    factors: Tensor | None = None,
) -> None:
    """Replaces ``views[i]`` by ``operation(views[i], factors[i])`` where selected.

    ``selected`` and ``factors`` are on the CPU, ``views`` on any device: the
    selection is made on the CPU, so it never waits for the device.
    """
    index = selected.nonzero().squeeze(1)
    if index.numel() == 0:
        return
    if factors is not None:
        factors = factors.to(views.device, non_blocking=True)
    if index.numel() == views.shape[0]:
        arguments = () if factors is None else (factors,)
        views.copy_(operation(views, *arguments))
        return
    index = index.to(views.device, non_blocking=True)
    chosen = views.index_select(0, index)
    arguments = () if factors is None else (factors.index_select(0, index),)
    views.index_copy_(0, index, operation(chosen, *arguments))


def _color_jitter(
    views: Tensor,
    selected: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None = None,
) -> None:
    """torchvision's ``ColorJitter`` on the selected views, in place.

    Each view draws its own factors and its own order of the four operations
    (:func:`_draw_jitter`). ``selected`` and the random numbers are on the CPU
    (``generator``, or torch's global one if ``None``).
    """
    jitter = _draw_jitter(
        views.shape[0], brightness, contrast, saturation, hue, generator
    )
    _apply_jitter(views, selected, jitter)


class _Jitter(NamedTuple):
    """Colour-jitter parameters of ``V`` views, as torchvision's ``ColorJitter``."""

    operations: tuple[Callable[[Tensor, Tensor], Tensor], ...]
    factors: Tensor  # (V, operations): each view's factor for each operation
    order: Tensor  # (V, operations): the operation each view applies at each stage

    def rows(self, part: slice) -> _Jitter:
        """The parameters of views ``part``."""
        return _Jitter(self.operations, self.factors[part], self.order[part])


def _draw_jitter(
    num_views: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None = None,
) -> _Jitter:
    """Draws torchvision's ``ColorJitter.get_params`` for ``num_views`` views.

    Brightness, contrast, saturation factors uniform in ``[max(0, 1 - x), 1 + x]``,
    hue shift uniform in ``[-hue, hue]``, operations with strength 0 left out, and
    a uniformly random order of the others per view. On the CPU, from
    ``generator`` (torch's global one if ``None``).
    """
    operations: list[Callable[[Tensor, Tensor], Tensor]] = []
    factors: list[Tensor] = []
    for amount, operation in [
        (brightness, _adjust_brightness),
        (contrast, _adjust_contrast),
        (saturation, _adjust_saturation),
    ]:
        if amount > 0:
            operations.append(operation)
            factors.append(
                torch.empty(num_views).uniform_(
                    max(0.0, 1 - amount), 1 + amount, generator=generator
                )
            )
    if hue > 0:
        operations.append(_adjust_hue)
        factors.append(torch.empty(num_views).uniform_(-hue, hue, generator=generator))
    order = torch.rand(num_views, len(operations), generator=generator).argsort(dim=1)
    stacked = torch.stack(factors, dim=1) if factors else torch.empty(num_views, 0)
    return _Jitter(tuple(operations), stacked, order)


def _apply_jitter(views: Tensor, selected: Tensor, jitter: _Jitter) -> None:
    """Applies ``jitter`` to the selected views, in place, stage by stage."""
    for stage in range(len(jitter.operations)):
        for index, operation in enumerate(jitter.operations):
            at_stage = selected & (jitter.order[:, stage] == index)
            _apply_where(views, at_stage, operation, jitter.factors[:, index])


def _per_view(factors: Tensor) -> Tensor:
    return factors.view(-1, 1, 1, 1)


def _grayscale(views: Tensor) -> Tensor:
    red, green, blue = views.unbind(dim=1)
    gray = _GRAY_WEIGHTS[0] * red + _GRAY_WEIGHTS[1] * green + _GRAY_WEIGHTS[2] * blue
    return gray.unsqueeze(1)


def _flip_width(views: Tensor) -> Tensor:
    return views.flip(-1)


def _flip_height(views: Tensor) -> Tensor:
    return views.flip(-2)


def _adjust_brightness(views: Tensor, factors: Tensor) -> Tensor:
    return (views * _per_view(factors)).clamp_(0, 1)


def _adjust_contrast(views: Tensor, factors: Tensor) -> Tensor:
    # mean of the grayscale image = luma-weighted mean of the channel means
    channel_means = views.mean(dim=(2, 3))
    mean = (channel_means @ channel_means.new_tensor(_GRAY_WEIGHTS)).view(-1, 1, 1, 1)
    return torch.lerp(mean.expand_as(views), views, _per_view(factors)).clamp_(0, 1)


def _adjust_saturation(views: Tensor, factors: Tensor) -> Tensor:
    gray = _grayscale(views).expand_as(views)
    return torch.lerp(gray, views, _per_view(factors)).clamp_(0, 1)


def _adjust_hue(views: Tensor, shifts: Tensor) -> Tensor:
    """Rotates the hue by ``shifts`` (fractions of a turn), keeping V and S (HSV)."""
    red, green, blue = views.unbind(dim=1)
    value = views.amax(dim=1)
    minimum = views.amin(dim=1)
    chroma = value - minimum
    inverse_chroma = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    # hue in sextants [0, 6); ties resolved red, then green, as torchvision does
    hue = torch.where(
        value == red,
        green - blue,
        torch.where(
            value == green,
            torch.add(blue - red, chroma, alpha=2),
            torch.add(red - green, chroma, alpha=4),
        ),
    )
    hue.mul_(inverse_chroma).add_(6 * shifts.view(-1, 1, 1)).remainder_(6)
    # HSV -> RGB: each channel is min + chroma * a trapezoid of the hue
    rotated = torch.empty_like(views)
    for channel, centre, rising in ((0, 3.0, True), (1, 2.0, False), (2, 4.0, False)):
        distance = (hue - centre).abs_()
        trapezoid = distance.sub_(1) if rising else distance.neg_().add_(2)
        torch.addcmul(minimum, chroma, trapezoid.clamp_(0, 1), out=rotated[:, channel])
    return rotated


def _gaussian_blur(views: Tensor, sigmas: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur, one sigma per view, reflected borders (``F.pad``).

    Up to 64 px the blur is two products with a ``(size, size)`` blur matrix per
    view; above, a grouped convolution (measured faster on one CPU core there).
    """
    num_views, channels, height, width = views.shape
    use_matrix = height == width and height <= _MATMUL_BLUR_MAX_SIZE
    if not use_matrix:  # F.pad reflects at most size - 1 pixels
        radius = min(radius, height - 1, width - 1)
    device = views.device
    taps = torch.arange(-radius, radius + 1, dtype=views.dtype, device=device)
    weights = torch.exp(-(taps**2) / (2 * sigmas.view(-1, 1) ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)
    if use_matrix:
        pixels = torch.arange(height, device=device)
        rows = _reflect(pixels.view(-1, 1) + taps.long(), height)  # (height, taps)
        # tap k of output row i reads input row rows[i, k]; a sum, not scatter_add_,
        # so that CUDA adds reflected taps in a fixed order (bit-reproducible)
        reads = (rows.unsqueeze(-1) == pixels).to(views.dtype)  # (height, taps, height)
        matrix = (weights.view(num_views, 1, -1, 1) * reads).sum(dim=2).unsqueeze(1)
        return matrix @ views @ matrix.transpose(-1, -2)

    groups = num_views * channels
    kernels = weights.repeat_interleave(channels, dim=0)
    padded = F.pad(
        views.reshape(1, groups, height, width), (radius,) * 4, mode="reflect"
    )
    blurred = F.conv2d(padded, kernels.view(groups, 1, 1, -1), groups=groups)
    blurred = F.conv2d(blurred, kernels.view(groups, 1, -1, 1), groups=groups)
    return blurred.view(num_views, channels, height, width)


def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflects indices into ``[0, size)`` without repeating the edge, as ``F.pad``."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    folded = index.remainder(period)
    return torch.minimum(folded, period - folded)
