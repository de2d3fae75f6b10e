"""Training images decoded once into one uint8 buffer, and cached on disk.

With ``MSNDataModule(augment="device")`` the data loader only delivers uint8 images;
the views are made from whole batches (:mod:`lightly_msn.device_transforms`). Data
that fit in memory (CIFAR-10, the bundled digits, a small ImageFolder) are then
decoded once into :class:`DecodedImages`: one flat uint8 buffer holding every image
as ``(3, H, W)``, with per-image offsets and shapes, so images of several sizes
pack as tightly as images of one size.

An image folder's decoded buffer is cached in one file, read back memory-mapped
(the loader worker processes share its pages):

- where: ``<folder>/.lightly_msn_decoded.pt`` when the folder is writable (an
  ImageFolder ignores files beside its class folders), else
  ``<cache dir>/<hash of the folder's path>.pt``; the cache dir is the ``cache_dir``
  argument, else ``$LIGHTLY_MSN_CACHE``, else ``~/.cache/lightly_msn``;
- key: a BLAKE2b hash of every image file's path (relative to the folder), label,
  size and bytes, and of torchvision's version (its decoders make the pixels), so
  a changed, added, removed or renamed file rebuilds the cache;
- written beside its final path and renamed into place
  (:func:`lightly_msn.files.atomic_path`), so a crash never leaves a torn cache.

Files that cannot be decoded are recorded in the cache with their error (the data
module applies its ``on_bad_image`` policy to them, at every run).

Images are decoded by torchvision (``torchvision.io.decode_image``: JPEG, PNG, WebP,
GIF, the same pixels as PIL for JPEG), and by PIL for the formats torchvision does
not read (BMP, TIFF, PPM, ...).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from tqdm.auto import tqdm

from lightly_msn.files import atomic_path
from lightly_msn.transforms import image_to_tensor

logger = logging.getLogger(__name__)

CACHE_FILE_NAME = ".lightly_msn_decoded.pt"
CACHE_DIR_ENV = "LIGHTLY_MSN_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/lightly_msn"
CACHE_FORMAT = 1
_DECODE_BATCH = 256  # files per loader item when decoding a folder


def read_image(path: str | Path) -> Tensor:
    """An image file as a uint8 RGB ``(3, H, W)`` tensor.

    torchvision's decoder first; PIL for the formats it does not read (and for
    16-bit images, which torchvision does not return as uint8).

    Raises:
        OSError, RuntimeError, ...: The error of PIL if neither can decode it.
    """
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8:
            return image
    except RuntimeError:
        pass
    with Image.open(path) as opened:
        pixels = np.asarray(opened.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def as_uint8_image(image: Image.Image | Tensor) -> Tensor:
    """A PIL image or a ``(C, H, W)`` tensor (uint8 or float in [0, 1]) as uint8."""
    pixels = image_to_tensor(image)
    if pixels.dtype != torch.uint8:
        pixels = pixels.mul(255).round_().to(torch.uint8)
    return pixels


def decoded_bytes(sizes: Sequence[tuple[int, int]]) -> int:
    """Bytes of the uint8 RGB images of ``sizes`` (``(width, height)`` each)."""
    return sum(3 * width * height for width, height in sizes)


class DecodedImages(Dataset):
    """Images decoded into one flat uint8 buffer: ``(image, label)`` items.

    Image ``i`` is ``pixels[offsets[i] : offsets[i] + 3 * h * w]`` viewed as
    ``(3, h, w)`` with ``(h, w) = shapes[i]``; items are such views (no copy).

    Attributes:
        pixels: The flat uint8 buffer.
        offsets: ``(N,)`` int64 start of each image in ``pixels``.
        shapes: ``(N, 2)`` int64 height and width of each image.
        targets: The label of each image.
        classes: The class names, as an ImageFolder's.
        files: The file of each image (empty for data that are not files).
        failures: ``(file, error)`` of the files that could not be decoded (they
            are not among the images).
    """

    def __init__(
        self,
        pixels: Tensor,
        offsets: Tensor,
        shapes: Tensor,
        targets: Sequence[int],
        classes: Sequence[str],
        files: Sequence[str] = (),
        failures: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.pixels = pixels
        self.offsets = offsets
        self.shapes = shapes
        self.targets = [int(target) for target in targets]
        self.classes = list(classes)
        self.files = list(files)
        self.failures = [(str(file), str(error)) for file, error in failures]

    @classmethod
    def from_images(
        cls, images: Sequence[Tensor], targets: Sequence[int], classes: Sequence[str]
    ) -> DecodedImages:
        """Packs uint8 ``(3, H, W)`` images (any sizes) into one buffer."""
        shapes = torch.tensor([image.shape[1:] for image in images], dtype=torch.int64)
        sizes = 3 * shapes.prod(dim=1)
        offsets = torch.cumsum(sizes, 0) - sizes
        pixels = torch.cat([image.reshape(-1) for image in images])
        return cls(pixels, offsets, shapes, targets, classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        height, width = self.shapes[index].tolist()
        start = int(self.offsets[index])
        image = self.pixels[start : start + 3 * height * width]
        return image.view(3, height, width), self.targets[index]

    @property
    def nbytes(self) -> int:
        """Size of the pixel buffer in bytes."""
        return self.pixels.numel()


def cache_directory(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$LIGHTLY_MSN_CACHE``, else ``~/.cache/lightly_msn``."""
    chosen = cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def cache_locations(
    root: str | Path, cache_dir: str | Path | None = None
) -> list[Path]:
    """Where the decoded images of the folder ``root`` are cached, in order.

    The folder itself first, then the cache directory (a file named after a hash
    of the folder's absolute path, so that folders do not share a file).
    """
    root = Path(root).expanduser().resolve()
    name = hashlib.blake2b(str(root).encode(), digest_size=10).hexdigest()
    return [root / CACHE_FILE_NAME, cache_directory(cache_dir) / f"{name}.pt"]


def folder_key(root: str | Path, samples: Sequence[tuple[str, int]]) -> str:
    """The cache key of image files: paths relative to ``root``, labels and bytes."""
    root = Path(root)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(
        f"format {CACHE_FORMAT} torchvision {torchvision.__version__}\n".encode()
    )
    for path, target in tqdm(samples, desc="hashing images", unit="img", leave=False):
        data = Path(path).read_bytes()
        relative = os.path.relpath(path, root)
        digest.update(f"{relative}\0{target}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def decode_folder(
    root: str | Path,
    samples: Sequence[tuple[str, int]],
    sizes: Sequence[tuple[int, int]],
    classes: Sequence[str],
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> DecodedImages:
    """The decoded images of an image folder: from its cache, or decoded and cached.

    Args:
        root:
            The folder (its class folders hold ``samples``).
        samples:
            ``(file, label)`` of every image, as an ImageFolder's ``samples``.
        sizes:
            ``(width, height)`` of every image, from the files' headers; the buffer
            is allocated from them before decoding.
        classes:
            The class names.
        cache_dir:
            Where the cache goes when ``root`` is not writable (see
            :func:`cache_directory`).
        num_workers:
            Processes decoding the files (0: this one).

    Returns:
        The images that decoded, in the order of ``samples``; the others are in
        ``failures``.
    """
    key = folder_key(root, samples)
    locations = cache_locations(root, cache_dir)
    for location in locations:
        cached = _read_cache(location, key, root)
        if cached is not None:
            logger.info("read %d decoded images from %s", len(cached), location)
            return cached
    images = _decode(samples, sizes, classes, num_workers)
    _write_cache(images, key, root, locations)
    return images


class _Decoded(NamedTuple):
    image: Tensor | None
    error: str


class _FileDecoder(Dataset):
    """Decodes files in loader workers; a failure is returned, not raised."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> _Decoded:
        try:
            return _Decoded(read_image(self.files[index]), "")
        except Exception as error:
            return _Decoded(None, str(error) or type(error).__name__)


def _as_list(items: list[_Decoded]) -> list[_Decoded]:
    return items


def _decode(
    samples: Sequence[tuple[str, int]],
    sizes: Sequence[tuple[int, int]],
    classes: Sequence[str],
    num_workers: int,
) -> DecodedImages:
    """Decodes every file into a buffer allocated from the header sizes."""
    files = [path for path, _ in samples]
    shapes = torch.tensor([(height, width) for width, height in sizes]).view(-1, 2)
    lengths = 3 * shapes.prod(dim=1)
    offsets = torch.cumsum(lengths, 0) - lengths
    pixels = torch.empty(int(lengths.sum()), dtype=torch.uint8)
    loader = DataLoader(
        _FileDecoder(files),
        batch_size=_DECODE_BATCH,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    kept: list[int] = []
    failures: list[tuple[str, str]] = []
    extra: list[tuple[int, Tensor]] = []  # images whose size differs from the header
    decoded = (item for batch in loader for item in batch)
    progress = tqdm(decoded, total=len(files), desc="decoding images", leave=False)
    for index, (image, error) in enumerate(progress):
        if image is None:
            failures.append((files[index], error))
            continue
        kept.append(index)
        if tuple(image.shape[1:]) != tuple(shapes[index].tolist()):
            extra.append((index, image))
            continue
        start = int(offsets[index])
        pixels[start : start + image.numel()] = image.reshape(-1)
    offsets, shapes = offsets.clone(), shapes.clone()
    if extra:
        start = pixels.numel()
        for index, image in extra:
            offsets[index], shapes[index] = start, torch.tensor(image.shape[1:])
            start += image.numel()
        pixels = torch.cat([pixels, *(image.reshape(-1) for _, image in extra)])
    return DecodedImages(
        pixels,
        offsets[kept],
        shapes[kept],
        [samples[index][1] for index in kept],
        classes,
        files=[files[index] for index in kept],
        failures=failures,
    )


def _read_cache(location: Path, key: str, root: str | Path) -> DecodedImages | None:
    """The cached images at ``location`` if it holds ``key``'s, else ``None``."""
    if not location.is_file():
        return None
    try:
        cache: dict[str, Any] = torch.load(
            location, mmap=True, weights_only=True, map_location="cpu"
        )
    except Exception as error:  # a foreign or damaged file: rebuilt
        logger.warning("ignoring unreadable image cache %s (%s)", location, error)
        return None
    if cache.get("format") != CACHE_FORMAT or cache.get("key") != key:
        logger.info("image cache %s is out of date; decoding again", location)
        return None
    root = Path(root)
    return DecodedImages(
        cache["pixels"],
        cache["offsets"],
        cache["shapes"],
        cache["targets"].tolist(),
        cache["classes"],
        files=[str(root / name) for name in cache["files"]],
        failures=[(str(root / name), error) for name, error in cache["failures"]],
    )


def _write_cache(
    images: DecodedImages, key: str, root: str | Path, locations: Sequence[Path]
) -> None:
    """Writes the cache to the first writable location (none: logs a warning)."""
    cache = {
        "format": CACHE_FORMAT,
        "key": key,
        "pixels": images.pixels,
        "offsets": images.offsets,
        "shapes": images.shapes,
        "targets": torch.tensor(images.targets, dtype=torch.int64),
        "classes": images.classes,
        "files": [os.path.relpath(path, root) for path in images.files],
        "failures": [
            [os.path.relpath(path, root), error] for path, error in images.failures
        ],
    }
    for location in locations:
        if location.parent.exists() and not os.access(location.parent, os.W_OK):
            continue
        try:
            with atomic_path(location) as temporary:
                torch.save(cache, temporary)
        except OSError as error:
            logger.info("could not write the image cache %s (%s)", location, error)
            continue
        logger.info("cached %d decoded images in %s", len(images), location)
        return
    logger.warning(
        "could not write the decoded images of %s to %s; they will be decoded "
        "again next time",
        root,
        " or ".join(str(location) for location in locations),
    )


__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_FILE_NAME",
    "DecodedImages",
    "as_uint8_image",
    "cache_directory",
    "cache_locations",
    "decode_folder",
    "decoded_bytes",
    "folder_key",
    "read_image",
]
