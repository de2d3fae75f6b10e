"""Batched multi-view augmentation on the images' own device (CPU or CUDA).

One call augments a whole batch: every image gets all the views of a
self-supervised method (MSN, DINO, iBOT, SimCLR, BYOL, MAE), each view with its
own random parameters, as plain torch tensor operations on the device the images
are on. No PIL, no per-image Python work, so it can run on the training GPU
after a loader that only decodes, or in a CPU loader worker once per batch.

The augmentations are those of lightly's transforms, which follow the papers'
recipes (SimCLR [0], BYOL [1], DINO [2], MSN [3], iBOT [4], MAE [5]), with
torchvision's parameter distributions:

- random resized crop: ``RandomResizedCrop.get_params`` (area uniform in
  ``crop_scale``, log-uniform aspect ratio, 10 attempts, then the centre crop at
  the closest allowed ratio), resampled with torch's antialiased bilinear or
  bicubic filter (what ``torchvision.transforms.v2.functional.resized_crop`` with
  ``antialias=True`` computes, and PIL's ``resize``);
- horizontal and vertical flips;
- colour jitter with probability ``jitter_prob``: brightness, contrast,
  saturation and hue factors as ``ColorJitter.get_params`` draws them, the four
  operations in a random order per view;
- random grayscale; Gaussian blur with a sigma uniform in ``blur_sigmas``;
  solarisation (PIL's threshold 128 of 255); normalisation.

Random parameters are drawn on the CPU from one ``torch.Generator``; pixels
never leave their device, and no operation waits for the device (the shapes
and selections the kernels need are known on the CPU).

Numerical differences from lightly's PIL pipeline (distributions are equal):
crops are resampled in float32 (torchvision's float ``resized_crop``; PIL
computes in fixed point), except images larger than 32 px on the CPU, resized
by torch's uint8 kernel as torchvision does for uint8 tensors; colour
operations run in float32 on the resampled view where PIL rounds to uint8
after each step; the hue shift is the exact HSV rotation (PIL quantises hue to
256 levels); the blur is an exact Gaussian truncated at ``3 * max(blur_sigmas)``
with reflected borders, where PIL approximates it by box blurs.

- [0]: SimCLR, 2020, https://arxiv.org/abs/2002.05709
- [1]: BYOL, 2020, https://arxiv.org/abs/2006.07733
- [2]: DINO, 2021, https://arxiv.org/abs/2104.14294
- [3]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
- [4]: iBOT, 2022, https://arxiv.org/abs/2111.07832
- [5]: MAE, 2022, https://arxiv.org/abs/2111.06377
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypedDict

import torch
import torch.nn.functional as F
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor

from lightly_msn.transforms import (
    CIFAR10_NORMALIZE,
    _apply_jitter,
    _apply_where,
    _draw_jitter,
    _gaussian_blur,
    _grayscale,
    _Jitter,
    _sample_crop_boxes,
)

Interpolation = Literal["bilinear", "bicubic"]
Normalize = dict[str, list[float]]

# largest image side resized by the batched resampling on the CPU (see _resizer)
_CPU_BATCHED_RESIZE_MAX_SIDE = 32
# most values per view tensor on the CPU (see _augment_group)
_CPU_CHUNK_ELEMENTS = 2**20
_BICUBIC_A = -0.5  # Keys' cubic of PIL and torch's antialiased bicubic
_SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize default, used by lightly
_IMAGENET_MEAN: tuple[float, ...] = tuple(IMAGENET_NORMALIZE["mean"])
_IMAGENET_STD: tuple[float, ...] = tuple(IMAGENET_NORMALIZE["std"])


@dataclass(frozen=True)
class ViewSpec:
    """Augmentation of one group of views of the same size.

    Every field is a torchvision / lightly parameter of the same meaning; the
    colour-jitter strengths are final (lightly's ``cj_strength * cj_bright``).

    Args:
        size: Side of the square output views in pixels.
        num_views: Number of views of each image made with this spec.
        crop_scale: Min and max area of the crop relative to the image.
        crop_ratio: Min and max aspect ratio (width / height) of the crop,
            sampled log-uniformly.
        interpolation: Antialiased ``"bilinear"`` or ``"bicubic"`` resampling.
        hflip_prob: Probability of a horizontal flip.
        vflip_prob: Probability of a vertical flip.
        jitter_prob: Probability that colour jitter is applied.
        brightness: Brightness factor range ``[max(0, 1 - x), 1 + x]``.
        contrast: Contrast factor range ``[max(0, 1 - x), 1 + x]``.
        saturation: Saturation factor range ``[max(0, 1 - x), 1 + x]``.
        hue: Hue shift range ``[-x, x]`` in turns, ``x <= 0.5``.
        grayscale_prob: Probability of conversion to grayscale.
        blur_prob: Probability of a Gaussian blur.
        blur_sigmas: Min and max standard deviation of the blur, in output pixels.
        solarize_prob: Probability of solarisation (values >= 128/255 inverted).
        mean: Per-channel mean subtracted at the end, or ``None`` (with ``std``)
            to return values in [0, 1].
        std: Per-channel standard deviation divided by at the end, or ``None``.
    """

    size: int
    num_views: int = 1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: Interpolation = "bilinear"
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    jitter_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigmas: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    mean: tuple[float, ...] | None = _IMAGENET_MEAN
    std: tuple[float, ...] | None = _IMAGENET_STD

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"ViewSpec: {message}")

        if isinstance(self.size, bool) or not isinstance(self.size, int):
            fail(f"size must be an int, got {self.size!r}.")
        if self.size < 1:
            fail(f"size must be >= 1, got {self.size}.")
        if isinstance(self.num_views, bool) or not isinstance(self.num_views, int):
            fail(f"num_views must be an int, got {self.num_views!r}.")
        if self.num_views < 1:
            fail(f"num_views must be >= 1, got {self.num_views}.")
        if len(self.crop_scale) != 2 or not (
            0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0
        ):
            fail(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}.")
        if len(self.crop_ratio) != 2 or not (
            0.0 < self.crop_ratio[0] <= self.crop_ratio[1]
        ):
            fail(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}.")
        if self.interpolation not in ("bilinear", "bicubic"):
            fail(
                "interpolation must be 'bilinear' or 'bicubic', got "
                f"{self.interpolation!r}."
            )
        for name in (
            "hflip_prob",
            "vflip_prob",
            "jitter_prob",
            "grayscale_prob",
            "blur_prob",
            "solarize_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                fail(f"{name} is a probability in [0, 1], got {value}.")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if value < 0:
                fail(f"{name} must be >= 0, got {value}.")
        if not 0.0 <= self.hue <= 0.5:
            fail(f"hue must be in [0, 0.5], got {self.hue}.")
        if len(self.blur_sigmas) != 2 or not (
            0.0 < self.blur_sigmas[0] <= self.blur_sigmas[1]
        ):
            fail(f"blur_sigmas must satisfy 0 < min <= max, got {self.blur_sigmas}.")
        if (self.mean is None) != (self.std is None):
            fail("mean and std must both be given or both be None.")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != 3 or len(self.std) != 3:
                fail(
                    f"mean and std need 3 values each, got {self.mean} and {self.std}."
                )
            if min(self.std) <= 0:
                fail(f"std values must be > 0, got {self.std}.")


class DeviceMultiViewTransform:
    """Augments a batch of images into several groups of views, on their device.

    ``transform(images, generator=None)`` takes a uint8 batch ``(B, 3, H, W)``
    (any device, any memory format) or a list of uint8 ``(3, H_i, W_i)`` images
    of different sizes on one device, and returns one float32 tensor
    ``(B, 3, size, size)`` per view, in the order of the specs (all views of the
    first spec, then of the second, ...), which is the order of lightly's
    multi-view transforms. Each view of each image has its own random
    parameters, drawn on the CPU from ``generator`` (torch's global generator if
    ``None``): the same seed gives bit-identical views on the same device.

    The presets :meth:`msn`, :meth:`dino`, :meth:`ibot`, :meth:`simclr`,
    :meth:`byol` and :meth:`mae` take the arguments of lightly's transforms;
    :meth:`for_small_images` scales any of them to 32 px images.

    Computation stays in float32 under autocast. All crops are resampled at
    once with torch's antialiased filter (a list of images is zero-padded into
    one batch; no crop reads the padding), except images larger than 32 px on
    the CPU, whose crops are resized one by one by torch's uint8 kernel (faster
    there). Everything else runs on all views of a spec at once.

    Args:
        specs: The view groups, in output order.
    """

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("DeviceMultiViewTransform: specs must not be empty.")
        for index, spec in enumerate(specs):
            if not isinstance(spec, ViewSpec):
                raise TypeError(
                    f"DeviceMultiViewTransform: specs[{index}] must be a ViewSpec, "
                    f"got {type(spec).__name__}."
                )
        self.specs: tuple[ViewSpec, ...] = tuple(specs)

    @property
    def num_views(self) -> int:
        """Number of output views per image."""
        return sum(spec.num_views for spec in self.specs)

    def __repr__(self) -> str:
        specs = ",\n    ".join(repr(spec) for spec in self.specs)
        return f"{type(self).__name__}([\n    {specs},\n])"

    def __call__(
        self,
        images: Tensor | Sequence[Tensor],
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """Returns the views ``[(B, 3, size, size), ...]`` of ``images``."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                "DeviceMultiViewTransform: random parameters are drawn on the CPU, "
                f"pass a CPU generator (got one on {generator.device})."
            )
        resize, sizes = _resizer(images)
        device = images.device if isinstance(images, Tensor) else images[0].device
        views: list[Tensor] = []
        with torch.autocast(device.type, enabled=False):
            for spec in self.specs:
                group = _augment_group(spec, resize, sizes, generator, device)
                views.extend(group.unbind(0))
        return views

    def for_small_images(
        self,
        size: int = 32,
        local_size: int = 16,
        normalize: Normalize | None = CIFAR10_NORMALIZE,
    ) -> DeviceMultiViewTransform:
        """The same views scaled to small images such as CIFAR-10's 32 x 32.

        As ``lightly_msn.MSNTransform.for_cifar10``: the largest views become
        ``size`` px, all others ``local_size`` px, Gaussian blur is off (a blur
        of up to 2 px erases most of a 32 px image) and ``normalize`` replaces
        the normalisation (CIFAR-10's statistics by default).
        """
        largest = max(spec.size for spec in self.specs)
        return type(self)(
            [
                dataclasses.replace(
                    spec,
                    size=size if spec.size == largest else local_size,
                    blur_prob=0.0,
                    **_normalization(normalize),
                )
                for spec in self.specs
            ]
        )

    @classmethod
    def msn(
        cls,
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
        sigmas: tuple[float, float] = (0.1, 2.0),
        random_gray_scale: float = 0.2,
        hf_prob: float = 0.5,
        vf_prob: float = 0.0,
        normalize: Normalize | None = IMAGENET_NORMALIZE,
    ) -> DeviceMultiViewTransform:
        """lightly's ``MSNTransform``: random views, then focal views [3].

        Same arguments and defaults. As ``lightly_msn.MSNTransform``, the focal
        views honour the ``cj_*`` arguments too (lightly's keep the defaults).
        """
        random = ViewSpec(
            size=random_size,
            crop_scale=random_crop_scale,
            hflip_prob=hf_prob,
            vflip_prob=vf_prob,
            grayscale_prob=random_gray_scale,
            blur_prob=gaussian_blur,
            blur_sigmas=sigmas,
            **_jitter(cj_prob, cj_strength, cj_bright, cj_contrast, cj_sat, cj_hue),
            **_normalization(normalize),
        )
        focal = dataclasses.replace(
            random, size=focal_size, crop_scale=focal_crop_scale
        )
        return cls(
            [
                dataclasses.replace(spec, num_views=count)
                for spec, count in [(random, random_views), (focal, focal_views)]
                if count > 0
            ]
        )

    @classmethod
    def dino(
        cls,
        global_crop_size: int = 224,
        global_crop_scale: tuple[float, float] = (0.4, 1.0),
        local_crop_size: int = 96,
        local_crop_scale: tuple[float, float] = (0.05, 0.4),
        n_local_views: int = 6,
        hf_prob: float = 0.5,
        vf_prob: float = 0.0,
        cj_prob: float = 0.8,
        cj_strength: float = 0.5,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.4,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        gaussian_blur: tuple[float, float, float] = (1.0, 0.1, 0.5),
        sigmas: tuple[float, float] = (0.1, 2.0),
        solarization_prob: float = 0.2,
        normalize: Normalize | None = IMAGENET_NORMALIZE,
    ) -> DeviceMultiViewTransform:
        """lightly's ``DINOTransform`` [2] (without its off-by-default rotation).

        Two global views (the first always blurred by default, the second
        rarely blurred and solarised with ``solarization_prob``), then
        ``n_local_views`` local views; bicubic resampling. ``cj_strength``
        applies to all views (lightly's second global view ignores it and keeps
        0.5, the default).
        """
        first_global = ViewSpec(
            size=global_crop_size,
            crop_scale=global_crop_scale,
            interpolation="bicubic",
            hflip_prob=hf_prob,
            vflip_prob=vf_prob,
            grayscale_prob=random_gray_scale,
            blur_prob=gaussian_blur[0],
            blur_sigmas=sigmas,
            **_jitter(cj_prob, cj_strength, cj_bright, cj_contrast, cj_sat, cj_hue),
            **_normalization(normalize),
        )
        return cls(
            _dino_views(
                first_global,
                gaussian_blur[1:],
                solarization_prob,
                (local_crop_size, local_crop_scale, n_local_views),
            )
        )

    @classmethod
    def ibot(
        cls,
        global_crop_size: int = 224,
        global_crop_scale: tuple[float, float] = (0.25, 1.0),
        local_crop_size: int = 96,
        local_crop_scale: tuple[float, float] = (0.05, 0.25),
        n_local_views: int = 10,
        hf_prob: float = 0.5,
        cj_prob: float = 0.8,
        cj_strength: float = 0.5,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.4,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        gaussian_blur: tuple[float, float, float] = (1.0, 0.1, 0.5),
        sigmas: tuple[float, float] = (0.1, 2.0),
        solarization_prob: float = 0.2,
        normalize: Normalize | None = IMAGENET_NORMALIZE,
    ) -> DeviceMultiViewTransform:
        """lightly's ``IBOTTransform`` [4]: DINO's views with iBOT's defaults."""
        return cls.dino(
            global_crop_size=global_crop_size,
            global_crop_scale=global_crop_scale,
            local_crop_size=local_crop_size,
            local_crop_scale=local_crop_scale,
            n_local_views=n_local_views,
            hf_prob=hf_prob,
            cj_prob=cj_prob,
            cj_strength=cj_strength,
            cj_bright=cj_bright,
            cj_contrast=cj_contrast,
            cj_sat=cj_sat,
            cj_hue=cj_hue,
            random_gray_scale=random_gray_scale,
            gaussian_blur=gaussian_blur,
            sigmas=sigmas,
            solarization_prob=solarization_prob,
            normalize=normalize,
        )

    @classmethod
    def simclr(
        cls,
        input_size: int = 224,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        min_scale: float = 0.08,
        random_gray_scale: float = 0.2,
        gaussian_blur: float = 0.5,
        sigmas: tuple[float, float] = (0.1, 2.0),
        vf_prob: float = 0.0,
        hf_prob: float = 0.5,
        normalize: Normalize | None = IMAGENET_NORMALIZE,
    ) -> DeviceMultiViewTransform:
        """lightly's ``SimCLRTransform`` [0]: two views of one distribution."""
        views = ViewSpec(
            size=input_size,
            num_views=2,
            crop_scale=(min_scale, 1.0),
            hflip_prob=hf_prob,
            vflip_prob=vf_prob,
            grayscale_prob=random_gray_scale,
            blur_prob=gaussian_blur,
            blur_sigmas=sigmas,
            **_jitter(cj_prob, cj_strength, cj_bright, cj_contrast, cj_sat, cj_hue),
            **_normalization(normalize),
        )
        return cls([views])

    @classmethod
    def byol(
        cls,
        input_size: int = 224,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.4,
        cj_contrast: float = 0.4,
        cj_sat: float = 0.2,
        cj_hue: float = 0.1,
        min_scale: float = 0.08,
        random_gray_scale: float = 0.2,
        gaussian_blur: tuple[float, float] = (1.0, 0.1),
        solarization_prob: tuple[float, float] = (0.0, 0.2),
        sigmas: tuple[float, float] = (0.1, 2.0),
        vf_prob: float = 0.0,
        hf_prob: float = 0.5,
        normalize: Normalize | None = IMAGENET_NORMALIZE,
    ) -> DeviceMultiViewTransform:
        """lightly's ``BYOLTransform`` [1] with its default view transforms.

        Two views that differ in blur and solarisation probability: one per
        entry of ``gaussian_blur`` and ``solarization_prob`` (lightly's
        ``BYOLView1Transform`` and ``BYOLView2Transform`` defaults).
        """
        first = ViewSpec(
            size=input_size,
            crop_scale=(min_scale, 1.0),
            hflip_prob=hf_prob,
            vflip_prob=vf_prob,
            grayscale_prob=random_gray_scale,
            blur_prob=gaussian_blur[0],
            blur_sigmas=sigmas,
            solarize_prob=solarization_prob[0],
            **_jitter(cj_prob, cj_strength, cj_bright, cj_contrast, cj_sat, cj_hue),
            **_normalization(normalize),
        )
        second = dataclasses.replace(
            first, blur_prob=gaussian_blur[1], solarize_prob=solarization_prob[1]
        )
        return cls([first, second])

    @classmethod
    def mae(
        cls,
        input_size: int = 224,
        min_scale: float = 0.2,
        normalize: Normalize | None = IMAGENET_NORMALIZE,
    ) -> DeviceMultiViewTransform:
        """lightly's ``MAETransform`` [5]: one bicubic crop, flipped half the time."""
        view = ViewSpec(
            size=input_size,
            crop_scale=(min_scale, 1.0),
            interpolation="bicubic",
            **_normalization(normalize),
        )
        return cls([view])


class _JitterFields(TypedDict):
    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float


class _Normalization(TypedDict):
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def _jitter(
    cj_prob: float,
    cj_strength: float,
    cj_bright: float,
    cj_contrast: float,
    cj_sat: float,
    cj_hue: float,
) -> _JitterFields:
    """lightly's colour-jitter arguments as :class:`ViewSpec` fields."""
    return _JitterFields(
        jitter_prob=cj_prob,
        brightness=cj_strength * cj_bright,
        contrast=cj_strength * cj_contrast,
        saturation=cj_strength * cj_sat,
        hue=cj_strength * cj_hue,
    )


def _normalization(normalize: Normalize | None) -> _Normalization:
    """lightly's ``normalize`` dictionary as :class:`ViewSpec` fields."""
    if normalize is None:
        return _Normalization(mean=None, std=None)
    return _Normalization(mean=tuple(normalize["mean"]), std=tuple(normalize["std"]))


def _dino_views(
    first_global: ViewSpec,
    blur: tuple[float, float],
    solarization_prob: float,
    local: tuple[int, tuple[float, float], int],
) -> list[ViewSpec]:
    """DINO's and iBOT's views: two global views, then the local views.

    The second global view takes ``blur[0]`` and ``solarization_prob``, the
    local views (size, crop scale, number) ``blur[1]`` and no solarisation.
    """
    local_size, local_scale, local_count = local
    second_global = dataclasses.replace(
        first_global, blur_prob=blur[0], solarize_prob=solarization_prob
    )
    specs = [first_global, second_global]
    if local_count > 0:
        specs.append(
            dataclasses.replace(
                first_global,
                size=local_size,
                num_views=local_count,
                crop_scale=local_scale,
                blur_prob=blur[1],
            )
        )
    return specs


Resize = Callable[[Tensor, Tensor, int, str], Tensor]


def _resizer(images: Tensor | Sequence[Tensor]) -> tuple[Resize, Tensor]:
    """Checks the input; returns its crop-and-resize function and image sizes.

    ``resize(image, boxes, size, interpolation)`` returns view ``v`` as crop
    ``boxes[v]`` of image ``image[v]`` resized to ``size``: ``(V, 3, size, size)``
    float32 in [0, 1]: one batched resampling of all views
    (:func:`_resize_batched`), so that the number of kernel launches does not
    grow with the number of views, except for images larger than 32 px on the
    CPU, where one call of torch's uint8 antialiased kernel per view is faster.
    Sizes
    ``(B, 2)`` (height, width) are on the CPU.
    """
    batch = _checked_images(images)
    sizes = torch.tensor([image.shape[-2:] for image in batch])
    on_cpu = batch[0].device.type == "cpu"
    if on_cpu and int(sizes.max()) > _CPU_BATCHED_RESIZE_MAX_SIDE:
        sources = [
            image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
            for image in batch
        ]
        return functools.partial(_resize_each, sources), sizes
    return functools.partial(_resize_batched, _padded_pixels(batch)), sizes


def _padded_pixels(batch: Tensor | list[Tensor]) -> Tensor:
    """``(B, H, W, 3)`` float32 in [0, 255], the input of :func:`_resize_batched`.

    A list of images is zero-padded to the largest height and width; crops lie
    inside their image and resampling never leaves the crop, so no view reads
    the padding.
    """
    if isinstance(batch, Tensor):
        return batch.permute(0, 2, 3, 1).float().contiguous()
    height = max(image.shape[1] for image in batch)
    width = max(image.shape[2] for image in batch)
    pixels = batch[0].new_zeros(len(batch), height, width, 3, dtype=torch.float32)
    for target, image in zip(pixels, batch, strict=True):
        target[: image.shape[1], : image.shape[2]] = image.permute(1, 2, 0)
    return pixels


def _checked_images(images: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
    """Validates a uint8 batch ``(B, 3, H, W)`` or a list of ``(3, H, W)`` images."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                "DeviceMultiViewTransform: expected a uint8 batch (B, 3, H, W), got "
                f"{images.dtype} of shape {tuple(images.shape)}."
            )
        if images.numel() == 0:
            raise ValueError(
                "DeviceMultiViewTransform: the batch is empty, shape "
                f"{tuple(images.shape)}."
            )
        return images
    images = list(images)
    if not images:
        raise ValueError("DeviceMultiViewTransform: the list of images is empty.")
    for index, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise TypeError(
                f"DeviceMultiViewTransform: images[{index}] must be a tensor, got "
                f"{type(image).__name__}."
            )
        if (
            image.ndim != 3
            or image.shape[0] != 3
            or image.dtype != torch.uint8
            or image.numel() == 0
        ):
            raise ValueError(
                f"DeviceMultiViewTransform: images[{index}] must be a non-empty uint8 "
                f"(3, H, W) tensor, got {image.dtype} of shape {tuple(image.shape)}."
            )
        if image.device != images[0].device:
            raise ValueError(
                f"DeviceMultiViewTransform: images[{index}] is on {image.device}, "
                f"images[0] on {images[0].device}; all must be on one device."
            )
    return images


class _Draws(NamedTuple):
    """The random parameters of ``V`` views of one spec, on the CPU."""

    image: Tensor  # (V,) index of the image each view shows
    boxes: Tensor  # (V, 4) crop top, left, height, width
    hflip: Tensor  # (V,) booleans, as the other selections
    vflip: Tensor
    jitter: Tensor
    jitter_params: _Jitter
    gray: Tensor
    blur: Tensor
    sigmas: Tensor  # (V,) blur standard deviations
    solarize: Tensor

    def rows(self, part: slice) -> _Draws:
        """The parameters of views ``part``."""
        return _Draws(
            self.image[part],
            self.boxes[part],
            self.hflip[part],
            self.vflip[part],
            self.jitter[part],
            self.jitter_params.rows(part),
            self.gray[part],
            self.blur[part],
            self.sigmas[part],
            self.solarize[part],
        )


def _augment_group(
    spec: ViewSpec,
    resize: Resize,
    sizes: Tensor,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """All views of one spec, ``(num_views, B, 3, size, size)`` float32.

    All parameters are drawn first, so they do not depend on the device; on the
    CPU the views are then made in chunks of at most ``_CPU_CHUNK_ELEMENTS``
    values per tensor, which keeps the operations' temporaries small.
    """
    batch = sizes.shape[0]
    num_views = spec.num_views * batch
    draws = _draw(spec, sizes, num_views, generator)
    chunk = num_views
    if device.type == "cpu":
        chunk = max(1, _CPU_CHUNK_ELEMENTS // (3 * spec.size**2))
    parts = [slice(start, start + chunk) for start in range(0, num_views, chunk)]
    views = [_make_views(spec, resize, draws.rows(part)) for part in parts]
    group = views[0] if len(views) == 1 else torch.cat(views)
    return group.view(spec.num_views, batch, 3, spec.size, spec.size)


def _draw(
    spec: ViewSpec, sizes: Tensor, num_views: int, generator: torch.Generator | None
) -> _Draws:
    """Draws every random parameter of ``num_views`` views; view v shows image
    ``v % B``, so the views of one output position are contiguous."""

    def chance(probability: float) -> Tensor:
        if probability == 0:
            return torch.zeros(num_views, dtype=torch.bool)
        return torch.rand(num_views, generator=generator) < probability

    image = torch.arange(num_views) % sizes.shape[0]
    boxes = _sample_crop_boxes(
        num_views,
        sizes[image, 0],
        sizes[image, 1],
        spec.crop_scale,
        spec.crop_ratio,
        generator,
    )
    hflip, vflip, jitter = (
        chance(spec.hflip_prob),
        chance(spec.vflip_prob),
        chance(spec.jitter_prob),
    )
    jitter_params = _draw_jitter(
        num_views,
        *(spec.brightness, spec.contrast, spec.saturation, spec.hue),
        generator=generator,
    )
    gray, blur = chance(spec.grayscale_prob), chance(spec.blur_prob)
    sigmas = torch.empty(num_views).uniform_(*spec.blur_sigmas, generator=generator)
    solarize = chance(spec.solarize_prob)
    return _Draws(
        image, boxes, hflip, vflip, jitter, jitter_params, gray, blur, sigmas, solarize
    )


def _make_views(spec: ViewSpec, resize: Resize, draws: _Draws) -> Tensor:
    """The views ``(V, 3, size, size)`` that ``draws`` describe."""
    views = resize(draws.image, draws.boxes, spec.size, spec.interpolation)
    _apply_where(views, draws.hflip, lambda x: x.flip(-1))
    _apply_where(views, draws.vflip, lambda x: x.flip(-2))
    _apply_jitter(views, draws.jitter, draws.jitter_params)
    _apply_where(views, draws.gray, lambda x: _grayscale(x).expand_as(x))
    radius = math.ceil(3 * spec.blur_sigmas[1])
    blur = functools.partial(_gaussian_blur, radius=radius)
    _apply_where(views, draws.blur, blur, draws.sigmas)
    _apply_where(views, draws.solarize, _solarize)
    if spec.mean is not None and spec.std is not None:
        mean = torch.tensor(spec.mean).view(-1, 1, 1).to(views.device)
        std = torch.tensor(spec.std).view(-1, 1, 1).to(views.device)
        views.sub_(mean).div_(std)
    return views


def _solarize(views: Tensor) -> Tensor:
    return torch.where(views >= _SOLARIZE_THRESHOLD, 1 - views, views)


def _resize_each(
    sources: list[Tensor], image: Tensor, boxes: Tensor, size: int, interpolation: str
) -> Tensor:
    """torchvision's ``resized_crop(antialias=True)`` of each view, one call each.

    ``sources`` are uint8 ``(1, 3, H, W)`` channels-last images on the CPU;
    torch's uint8 kernel rounds to uint8, as torchvision on uint8 tensors does.
    """
    crops = [
        F.interpolate(
            sources[index][:, :, top : top + height, left : left + width],
            size=(size, size),
            mode=interpolation,
            antialias=True,
            align_corners=False,
        )
        for index, (top, left, height, width) in zip(
            image.tolist(), boxes.tolist(), strict=True
        )
    ]
    views = torch.cat(crops).to(torch.float32, memory_format=torch.contiguous_format)
    return views.div_(255)


def _resize_batched(
    pixels: Tensor, image: Tensor, boxes: Tensor, size: int, interpolation: str
) -> Tensor:
    """All views' ``resized_crop(antialias=True)`` at once, by gathered rows.

    ``pixels`` ``(B, H, W, 3)`` float32 in [0, 255]. Separable resampling with
    the weights of torch's antialiased kernel (:func:`_resampling_taps`): each
    output row is a weighted sum of a few gathered input rows, then the same
    for columns, a handful of kernels whatever the number of views. Equal to
    torchvision's float32 ``resized_crop`` up to rounding, clamped to [0, 1]
    (bicubic overshoots; PIL and uint8 kernels clamp).
    """
    batch, height, width, _ = pixels.shape
    num_views = image.numel()
    row_index, row_weights = _resampling_taps(
        boxes[:, 0], boxes[:, 2], size, interpolation
    )
    row_index += (image * height).view(-1, 1, 1)
    rows = _weighted_rows(  # (V, size, W * 3)
        pixels.view(batch * height, width * 3), row_index, row_weights
    )
    columns = rows.view(num_views, size, width, 3).transpose(1, 2)
    column_index, column_weights = _resampling_taps(
        boxes[:, 1], boxes[:, 3], size, interpolation
    )
    column_index += (torch.arange(num_views) * width).view(-1, 1, 1)
    views = _weighted_rows(  # (V, size x, size y * 3)
        columns.reshape(num_views * width, size * 3), column_index, column_weights
    )
    views = views.view(num_views, size, size, 3).permute(0, 3, 2, 1).contiguous()
    return views.div_(255).clamp_(0, 1)


def _resampling_taps(
    start: Tensor, length: Tensor, size: int, interpolation: str
) -> tuple[Tensor, Tensor]:
    """Input indices and weights resampling ``[start, start + length)`` to ``size``.

    torch's (and PIL's) antialiased filter, per view: output pixel ``i``,
    centred at ``c = scale * (i + 0.5)`` with ``scale = length / size``, averages
    the input pixels within ``support * max(scale, 1)`` of ``c`` (support 1 for
    bilinear, 2 for bicubic), weighted by the triangle or Keys' cubic
    (``a = -0.5``) stretched by ``max(scale, 1)`` and normalised to sum 1. Taps
    never leave the crop.

    Returns ``(V, size, K)`` int64 indices and float32 weights on the CPU, ``K``
    the most taps of any output pixel (unused taps weigh 0); computed in float64.
    """
    length = length.double().view(-1, 1)
    scale = length / size
    stretch = scale.clamp(min=1.0)
    support = (1.0 if interpolation == "bilinear" else 2.0) * stretch
    centre = scale * (torch.arange(size, dtype=torch.float64) + 0.5)  # (V, size)
    first = (centre - support + 0.5).trunc_().clamp_(min=0)
    count = torch.minimum((centre + support + 0.5).trunc_(), length) - first
    taps = torch.arange(int(count.max()), dtype=torch.float64)
    offsets = first.unsqueeze(-1) + taps  # (V, size, K)
    distance = (offsets - centre.unsqueeze(-1) + 0.5).abs_() / stretch.unsqueeze(-1)
    weights = _filter(distance, interpolation)
    weights = torch.where(taps < count.unsqueeze(-1), weights, 0.0)
    weights /= weights.sum(dim=-1, keepdim=True)
    index = torch.minimum(offsets, length.unsqueeze(-1) - 1).long()
    return index + start.view(-1, 1, 1), weights.float()


def _filter(distance: Tensor, interpolation: str) -> Tensor:
    """The resampling filter at ``distance >= 0``: triangle or Keys' cubic."""
    if interpolation == "bilinear":
        return (1 - distance).clamp_(min=0)
    a, x = _BICUBIC_A, distance
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def _weighted_rows(source: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """``out[v, i] = sum_k weights[v, i, k] * source[index[v, i, k]]``.

    ``source`` is a 2-D table of rows on the device; ``index`` and ``weights``
    ``(V, n, K)`` on the CPU. Returns ``(V, n, row length)``.
    """
    num_views, length, num_taps = index.shape
    index = index.permute(2, 0, 1).reshape(num_taps, -1)
    index = index.to(source.device, non_blocking=True)
    weights = weights.permute(2, 0, 1).unsqueeze(-1)
    weights = weights.to(source.device, non_blocking=True)
    out = source.index_select(0, index[0]).view(num_views, length, -1) * weights[0]
    for tap in range(1, num_taps):
        rows = source.index_select(0, index[tap]).view(num_views, length, -1)
        out.addcmul_(rows, weights[tap])
    return out
