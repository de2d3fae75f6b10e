"""Batches of uint8 images for augmentation on the device (``augment="device"``).

The loader of :class:`~lightly_msn.data.MSNDataModule` with ``augment="device"``
delivers images, not views; a
:class:`~lightly_msn.device_transforms.DeviceMultiViewTransform` makes the views of a
whole batch at once:

- on a GPU, after the batch reached it (the data module's ``on_after_batch_transfer``);
  the loader's :func:`collate_images` makes an :class:`ImageBatch`, and JPEG files
  that the workers only read are decoded on the GPU first
  (:func:`decode_encoded`, in ``on_before_batch_transfer``);
- on the CPU, in the loader's worker processes, once per batch
  (:class:`AugmentingCollate`), so that augmentation overlaps the training step.

Random parameters come from one CPU ``torch.Generator`` per process
(:func:`augmentation_seed`): the main process's is seeded from the run's seed and
the global rank, a worker's also from its id and the loader's base seed, so every
worker of every rank draws its own stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg, read_file

from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.image_cache import read_image

_JPEG_MAGIC = bytes([0xFF, 0xD8, 0xFF])


class EncodedImage(NamedTuple):
    """The bytes of a JPEG file, decoded later on the training device."""

    data: Tensor  # 1-D uint8, on the CPU
    file: str


class ImageBatch(NamedTuple):
    """What the loader delivers with ``augment="device"`` on a GPU.

    Attributes:
        images: uint8 ``(B, 3, H, W)`` when all images have one size, else a list
            of uint8 ``(3, H_i, W_i)`` images (before decoding, JPEG files may be
            :class:`EncodedImage` entries of that list).
        labels: ``(B,)`` int64 labels.
    """

    images: Tensor | list[Any]
    labels: Tensor


def stack_if_same_size(images: Sequence[Tensor]) -> Tensor | list[Tensor]:
    """One ``(B, 3, H, W)`` tensor when all images have one shape, else the list."""
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(list(images))
    return list(images)


def collate_images(items: Sequence[Sequence[Any]]) -> ImageBatch:
    """The loader's ``collate_fn``: ``(image, label, ...)`` items into an ImageBatch."""
    images = [item[0] for item in items]
    labels = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
    if any(isinstance(image, EncodedImage) for image in images):
        return ImageBatch(images, labels)
    return ImageBatch(stack_if_same_size(images), labels)


def augmentation_seed(seed: int, rank: int, worker: Any | None = None) -> int:
    """The seed of a process's augmentation generator.

    Args:
        seed: The run's seed.
        rank: The process's global rank.
        worker: ``torch.utils.data.get_worker_info()`` in a loader worker (its
            ``id`` and ``seed``, which the loader draws anew for every iterator),
            ``None`` in the main process.
    """
    entropy = [seed, rank]
    if worker is not None:
        entropy += [1 + int(worker.id), int(worker.seed)]
    state = np.random.SeedSequence([abs(int(value)) for value in entropy])
    return int(state.generate_state(1, np.uint64)[0])


class AugmentingCollate:
    """A ``collate_fn`` that returns the views of the batch: ``(views, labels)``.

    In a loader worker it draws from a generator of its own
    (:func:`augmentation_seed`); in the main process (``num_workers=0``) from
    ``generator``, the data module's, whose state is saved in checkpoints.
    """

    def __init__(
        self,
        transform: DeviceMultiViewTransform,
        generator: torch.Generator,
        seed: int,
        rank: int,
    ) -> None:
        self.transform = transform
        self.generator = generator
        self.seed = seed
        self.rank = rank
        self._worker_generator: torch.Generator | None = None

    def __call__(self, items: Sequence[Sequence[Any]]) -> tuple[list[Tensor], Tensor]:
        batch = collate_images(items)
        return self.transform(batch.images, generator=self._generator()), batch.labels

    def _generator(self) -> torch.Generator:
        worker = get_worker_info()
        if worker is None:
            return self.generator
        if self._worker_generator is None:  # once per worker process
            seed = augmentation_seed(self.seed, self.rank, worker)
            self._worker_generator = torch.Generator().manual_seed(seed)
        return self._worker_generator


def read_encoded(path: str | Path) -> Tensor | EncodedImage:
    """A JPEG file's bytes (decoded later, on the GPU); other files decoded here."""
    data = read_file(str(path))
    if bytes(data[:3].tolist()) == _JPEG_MAGIC:
        return EncodedImage(data, str(path))
    return read_image(path)


@functools.cache
def jpeg_decoding_available(device: torch.device) -> bool:
    """Whether torchvision decodes JPEG files on ``device`` (nvJPEG on CUDA)."""
    try:
        sample = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        decode_jpeg([sample], device=device)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def decode_encoded(
    batch: ImageBatch,
    device: torch.device,
    on_failure: Callable[[str, Exception], None] | None = None,
) -> ImageBatch:
    """Decodes a batch's :class:`EncodedImage` entries on ``device``, all at once.

    Args:
        batch: A batch of :func:`collate_images`.
        device: Where to decode (and where the other images are moved).
        on_failure: Called with the file and the error of a JPEG that cannot be
            decoded, which is then replaced by another image of the batch (with
            its label). ``None``: such a file raises an ``OSError`` naming it.
    """
    images = list(batch.images)
    positions = [i for i, image in enumerate(images) if isinstance(image, EncodedImage)]
    if not positions:
        return batch
    encoded = [images[i] for i in positions]
    try:
        decoded = decode_jpeg(
            [image.data for image in encoded], mode=ImageReadMode.RGB, device=device
        )
    except RuntimeError:  # find the file(s) that fail, one by one
        decoded = [_decode_one(image, device, on_failure) for image in encoded]
    for position, image in zip(positions, decoded, strict=True):
        images[position] = image
    labels = batch.labels.clone()
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise OSError("no image of the batch could be decoded")
    for position in (i for i, image in enumerate(images) if image is None):
        replacement = next((i for i in good if i > position), good[0])
        images[position], labels[position] = images[replacement], labels[replacement]
    moved = [image.to(device, non_blocking=True) for image in images]
    return ImageBatch(stack_if_same_size(moved), labels)


def _decode_one(
    image: EncodedImage,
    device: torch.device,
    on_failure: Callable[[str, Exception], None] | None,
) -> Tensor | None:
    try:
        return decode_jpeg(image.data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        if on_failure is None:
            raise OSError(f"could not load image file {image.file}: {error}") from error
        on_failure(image.file, error)
        return None


__all__ = [
    "AugmentingCollate",
    "EncodedImage",
    "ImageBatch",
    "augmentation_seed",
    "collate_images",
    "decode_encoded",
    "jpeg_decoding_available",
    "read_encoded",
    "stack_if_same_size",
]
