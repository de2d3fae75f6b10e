"""Datasets for pretraining and evaluation: image folders, CIFAR-10 and bundled digits.

:class:`MSNDataModule` is the Lightning ``LightningDataModule`` of MSN pretraining: it
builds the training set with the MSN multi-view transform, checks it, and makes its
``DataLoader``. ``build_dataset`` returns a torch ``Dataset`` of ``(image, label)``
pairs where ``image`` is an RGB ``PIL.Image`` (or whatever ``transform`` makes of it)
and ``label`` an int.

Image files are checked **eagerly**, when the dataset is built: every file is opened
and its structure verified with ``PIL.Image.verify`` (headers and chunk structure; it
does not decode the pixels, so it costs a file read, about a millisecond for a small
JPEG). A broken file therefore fails before training starts instead of hours into an
epoch. With ``on_bad_image="skip"`` such files are dropped, counted and reported in
one logged warning. A file whose header is intact but whose pixel data is truncated
can still pass ``verify``: loading it later raises an error that names the file, or,
with ``"skip"``, the next image takes its place and the file is counted
(:class:`CheckedImageFolder`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from lightly_msn.device_batches import (
    AugmentingCollate,
    ImageBatch,
    augmentation_seed,
    collate_images,
    decode_encoded,
    jpeg_decoding_available,
    read_encoded,
)
from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.image_cache import (
    DecodedImages,
    as_uint8_image,
    decode_folder,
    decoded_bytes,
    read_image,
)
from lightly_msn.transforms import CIFAR10_NORMALIZE, IMAGENET_NORMALIZE, MSNTransform

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("fail", "skip")
AUGMENT_MODES = ("auto", "device", "loader")
DEFAULT_MEMORY_LIMIT_GB = 8.0
SPLITS = ("train", "test")

# The bundled digits are split once, stratified, with a fixed seed, so that every run
# (and every test) sees the same train and test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
MAX_LOADER_PROCESSES = 256
# images up to this size get the small-image preset (CIFAR-10's statistics, no blur)
SMALL_IMAGE_SIZE = 64
NORMALIZATIONS: dict[str, dict[str, list[float]]] = {
    "cifar10": CIFAR10_NORMALIZE,
    "imagenet": IMAGENET_NORMALIZE,
}


def build_dataset(
    data: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    transform: Callable[[Image.Image], Any] | None = None,
    on_bad_image: str = "fail",
    img_size: int = 32,
    min_size: int | None = None,
) -> Dataset:
    """Builds a labelled image dataset.

    Args:
        data:
            ``"digits"`` (scikit-learn's bundled 8x8 digits, upsampled to ``img_size``,
            no download), ``"cifar10"`` or the path of an ImageFolder
            (``root/<class>/<image>``). If the path has a ``train/`` or ``test/``
            sub-folder (``root/train/<class>/...``), it is split: the ``<split>``
            sub-folder is used, and a ``ValueError`` names the folder and the split
            when that sub-folder is missing (``root/test/`` alone never becomes a
            train set).
        split:
            ``"train"`` or ``"test"``.
        data_dir:
            For ``"cifar10"``: a local ImageFolder root with ``train/`` and ``test/``,
            or torchvision's CIFAR-10 root (downloaded there when missing and the
            network allows it).
        transform:
            Applied to each RGB PIL image.
        on_bad_image:
            ``"fail"`` raises on the first unreadable image file and names it;
            ``"skip"`` drops unreadable files and logs how many were dropped.
        img_size:
            Side length of the upsampled ``"digits"`` images.
        min_size:
            If given, every image must have a shorter side of at least ``min_size``
            pixels (e.g. the crop size of a transform); a ``ValueError`` names the
            first smaller image otherwise.

    Returns:
        A dataset of ``(image, label)`` pairs with a ``classes`` attribute.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(
            f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
        )
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if min_size is not None and min_size < 1:
        raise ValueError(f"min_size must be positive, got {min_size}")

    if data == "digits":
        if min_size is not None and img_size < min_size:
            raise ValueError(
                f"digits images are {img_size}x{img_size} pixels, smaller than the "
                f"requested min_size={min_size}; raise img_size"
            )
        return DigitsDataset(split=split, img_size=img_size, transform=transform)
    if data == "cifar10":
        return _build_cifar10(split, data_dir, transform, on_bad_image, min_size)
    return _build_image_folder(data, split, transform, on_bad_image, min_size)


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits as RGB PIL images.

    The 1,797 grey 8x8 images (values 0..16) are scaled to 0..255, upsampled to
    ``img_size`` with bicubic interpolation and repeated over three channels. The
    train/test split is stratified and fixed (20 % test, seed 0).
    """

    def __init__(
        self,
        split: str = "train",
        img_size: int = 32,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_indices, test_indices = train_test_split(
            indices,
            test_size=DIGITS_TEST_FRACTION,
            stratify=digits.target,
            random_state=DIGITS_SPLIT_SEED,
        )
        chosen = np.sort(train_indices if split == "train" else test_indices)
        grey = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [
            Image.fromarray(image, mode="L")
            .resize((img_size, img_size), Image.Resampling.BICUBIC)
            .convert("RGB")
            for image in grey
        ]
        self.targets = [int(label) for label in digits.target[chosen]]
        self.classes = [str(digit) for digit in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class CheckedImageFolder(ImageFolder):
    """torchvision's ``ImageFolder`` whose loading errors name the failing file.

    ``num_skipped_images`` counts the unreadable files dropped when it was built,
    ``image_sizes`` holds the ``(width, height)`` of each sample, read from the files'
    headers when they were checked.
    With ``skip_unreadable`` (``on_bad_image="skip"``), a file that passed the check
    at build time but cannot be decoded when it is loaded (a JPEG whose header is
    intact but whose data is truncated) is replaced by the next readable image, so
    batches keep their size and training never dies on it; such files are counted
    in :attr:`load_failures`, shared with the loader's worker processes.
    """

    num_skipped_images: int = 0
    skip_unreadable: bool = False
    image_sizes: list[tuple[int, int]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # one slot per process (main + workers), so no two processes add to one
        # number; in shared memory, so the main process sees the workers' counts
        self.load_failures = torch.zeros(MAX_LOADER_PROCESSES, dtype=torch.int64)
        self.load_failures.share_memory_()

    @property
    def num_load_failures(self) -> int:
        """Images that failed to load (and were replaced) since it was built."""
        return int(self.load_failures.sum())

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                sample = self.loader(path)
                break
            except Exception as error:
                if not self.skip_unreadable:
                    raise OSError(
                        f"could not load image file {path}: {error}"
                    ) from error
                self._count_load_failure(path, error)
        else:
            raise OSError(f"no image of {self.root} could be loaded")
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def _count_load_failure(self, path: str, error: Exception) -> None:
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (MAX_LOADER_PROCESSES - 1)
        self.load_failures[slot] += 1
        logger.warning("skipped unreadable image file %s (%s)", path, error)


def _build_cifar10(
    split: str,
    data_dir: str | Path | None,
    transform: Callable[[Image.Image], Any] | None,
    on_bad_image: str,
    min_size: int | None,
) -> Dataset:
    if min_size is not None and min_size > 32:
        raise ValueError(
            f"CIFAR-10 images are 32x32 pixels, smaller than min_size={min_size}"
        )
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None and (root / "train").is_dir() and (root / "test").is_dir():
        return _build_image_folder(root / split, split, transform, on_bad_image, None)

    from torchvision.datasets import CIFAR10

    download_root = root if root is not None else Path("~/.cache/cifar10").expanduser()
    try:
        return CIFAR10(
            str(download_root),
            train=split == "train",
            transform=transform,
            download=True,
        )
    except Exception as error:  # no network, bad archive, ...
        raise FileNotFoundError(
            f"could not load or download CIFAR-10 into {download_root} ({error}). "
            "Offline, pass data_dir (--data.data_dir) pointing at a local "
            "ImageFolder with train/ and test/ sub-folders, or at a folder holding "
            "torchvision's cifar-10-batches-py"
        ) from error


def image_folder_root(path: str | Path, split: str) -> Path:
    """The folder whose class sub-folders ``build_dataset(path, split)`` reads.

    ``path/<split>`` when ``path`` is split into ``train/`` and ``test/``
    sub-folders, else ``path``. Reads no image, so a wrong folder fails at once.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        NotADirectoryError: If ``path`` is not a folder.
        ValueError: If ``path`` has a ``train/`` or ``test/`` sub-folder but not
            ``split``; the message names the folder and the split.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"dataset folder {root} does not exist (expected an ImageFolder, "
            "'cifar10' or 'digits')"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path {root} is not a folder")
    present = [name for name in SPLITS if (root / name).is_dir()]
    if not present:
        return root
    if split not in present:
        raise ValueError(
            f"dataset folder {root} is split into {present[0]}/ but has no {split}/ "
            f"sub-folder: the {split} split is missing"
        )
    return root / split


def _build_image_folder(
    path: str | Path,
    split: str,
    transform: Callable[[Image.Image], Any] | None,
    on_bad_image: str,
    min_size: int | None,
) -> CheckedImageFolder:
    root = image_folder_root(path, split)
    if not any(entry.is_dir() for entry in root.iterdir()):
        raise ValueError(
            f"dataset folder {root} has no class sub-folders; expected the "
            "ImageFolder layout root/<class>/<image>"
        )
    try:
        dataset = CheckedImageFolder(str(root), transform=transform)
    except FileNotFoundError as error:
        raise ValueError(
            f"dataset folder {root} has no image files with one of the extensions "
            f"{', '.join(IMG_EXTENSIONS)} in its class sub-folders"
        ) from error
    _check_image_files(dataset, on_bad_image, min_size)
    return dataset


def _check_image_files(
    dataset: CheckedImageFolder, on_bad_image: str, min_size: int | None
) -> None:
    """Verifies every image file; drops (``skip``) or raises on (``fail``) bad ones."""
    kept: list[tuple[str, int]] = []
    sizes: list[tuple[int, int]] = []
    bad: list[str] = []
    # disable=None: a bar on a terminal, none in a redirected log
    for path, target in tqdm(
        dataset.samples,
        desc="checking images",
        unit="img",
        leave=False,
        disable=None,
    ):
        try:
            with Image.open(path) as image:
                image.verify()
                size = image.size
        except Exception as error:
            if on_bad_image == "fail":
                raise _unreadable_image_error(path, error) from error
            bad.append(path)
            continue
        if min_size is not None and min(size) < min_size:
            raise ValueError(
                f"image file {path} is {size[0]}x{size[1]} pixels, smaller than the "
                f"required {min_size} pixels (e.g. the crop size); resize the data or "
                "lower the crop size"
            )
        kept.append((path, target))
        sizes.append(size)
    if bad:
        logger.warning(
            "skipped %d unreadable image file(s) of %d in %s, e.g. %s",
            len(bad),
            len(dataset.samples),
            dataset.root,
            bad[0],
        )
        if not kept:
            raise ValueError(f"all {len(bad)} image files in {dataset.root} are bad")
    dataset.samples = kept
    dataset.imgs = kept
    dataset.targets = [target for _, target in kept]
    dataset.image_sizes = sizes
    dataset.num_skipped_images = len(bad)
    dataset.skip_unreadable = on_bad_image == "skip"


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The labels of an ImageFolder, torchvision's ``CIFAR10`` or ``DigitsDataset``."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(
            f"{type(dataset).__name__} has no 'targets' attribute; a class-balanced "
            "subset needs the labels"
        )
    return np.asarray(targets, dtype=np.int64)


def balanced_indices(labels: np.ndarray, size: int | None, seed: int) -> list[int]:
    """A random subset of ``size`` indices with (nearly) equal counts per class.

    Classes get ``size // num_classes`` images each, the first ``size %
    num_classes`` classes one more; ``None`` returns every index.
    """
    if size is None:
        return list(range(len(labels)))
    if size < 1:
        raise ValueError(f"a subset needs at least one image, got size={size}")
    classes = np.unique(labels)
    per_class, remainder = divmod(size, len(classes))
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for position, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        count = per_class + int(position < remainder)
        if count > len(members):
            raise ValueError(
                f"a balanced subset of {size} images needs {count} images of class "
                f"{label}, which has only {len(members)}; lower the subset size"
            )
        chosen.extend(rng.choice(members, size=count, replace=False).tolist())
    return sorted(chosen)


# The validation images are drawn with their own fixed seed, so that every run,
# method and tuning trial holds out the same images whatever its subset seed.
VALIDATION_SEED = 20220414


def validation_indices(labels: np.ndarray, validation_size: int | None) -> list[int]:
    """The training images held out for validation: a fixed class-balanced draw.

    ``None`` holds out nothing. The draw depends only on the labels and the size, so
    :func:`training_indices` and an evaluation that scores on the held-out images
    agree on them.
    """
    if validation_size is None:
        return []
    return balanced_indices(labels, validation_size, VALIDATION_SEED)


def training_indices(
    labels: np.ndarray,
    train_subset: int | None,
    subset_seed: int,
    validation_size: int | None = None,
) -> list[int]:
    """The training images: all but the validation ones, or a balanced subset of them.

    Args:
        labels: The label of every image of the training split.
        train_subset: Draw this many images, class-balanced (``None``: all).
        subset_seed: Seed of that draw.
        validation_size: Images held out first (:func:`validation_indices`).
    """
    held_out = validation_indices(labels, validation_size)
    remaining = np.setdiff1d(np.arange(len(labels)), held_out)
    chosen = balanced_indices(labels[remaining], train_subset, subset_seed)
    return remaining[chosen].tolist()


class TransformedSubset(Dataset):
    """``(transform(image), label)`` for the images ``indices`` of ``dataset``.

    The base dataset yields untransformed images, so one decoded dataset serves
    several transforms (training views, evaluation tensors).
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        transform: Callable[[Any], Any],
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), int(label)


def default_focal_size(img_size: int) -> int:
    """Focal view size: half the image up to 64 px, else 3/7 of it (96 for 224)."""
    return img_size // 2 if img_size <= SMALL_IMAGE_SIZE else img_size * 3 // 7


def normalization(name: str | None, img_size: int) -> dict[str, list[float]]:
    """Mean and std of ``"cifar10"`` or ``"imagenet"``; ``None`` picks by image size."""
    if name is None:
        name = "cifar10" if img_size <= SMALL_IMAGE_SIZE else "imagenet"
    if name not in NORMALIZATIONS:
        raise ValueError(
            f"normalize must be one of {sorted(NORMALIZATIONS)} or None, got {name!r}"
        )
    return NORMALIZATIONS[name]


class MSNDataModule(LightningDataModule):
    """The training data of MSN pretraining, as a Lightning ``LightningDataModule``.

    Builds the training split of a dataset (an ImageFolder, CIFAR-10 or the bundled
    digits, see :func:`build_dataset`), makes the MSN views of every image
    (``random_views`` views of ``img_size`` pixels, the first of which is the target
    view, and ``focal_views`` views of ``focal_size``) and serves shuffled batches of
    ``(views, labels)``. Arguments are checked when it is created; the images when
    it is set up, before training: unreadable files, images smaller than the crop,
    and a dataset smaller than one global batch are reported then, not hours into
    an epoch.

    The views are made in one of two ways (``augment``):

    - ``"device"``: the loader delivers uint8 images and the views of a whole batch
      are made at once by a
      :class:`~lightly_msn.device_transforms.DeviceMultiViewTransform` where the
      model trains: on a GPU after the batch reached it
      (``on_after_batch_transfer``), on the CPU in the loader workers, once per
      batch (in the main process with ``num_workers=0``). Image folders whose
      decoded images fit in ``memory_limit_gb`` are decoded once and cached on disk
      (:mod:`lightly_msn.image_cache`); larger ones are decoded by the loader
      workers, JPEG files on the GPU when training there. The random parameters
      come from a CPU ``torch.Generator`` per process, seeded from the run's seed
      (``torch.initial_seed()`` when set up), the global rank and, in a worker, its
      id; the main process's generator is saved in checkpoints.
    - ``"loader"``: the loader workers make each image's views with the per-image
      :class:`~lightly_msn.transforms.MSNTransform` (PIL images).

    Both make the same views (same arguments, same distributions).

    Images up to 64 px get the small-image preset (no blur, CIFAR-10 statistics,
    focal views of half the size); larger ones the paper's (blur 0.5, ImageNet
    statistics, focal views of 3/7 of the size: 96 for 224).

    Args:
        dataset:
            An ImageFolder path (with ``train/`` and ``test/`` sub-folders or a
            plain ``root/<class>/<image>`` tree), ``"cifar10"`` or ``"digits"``;
            for a dataset instance use :meth:`from_dataset`.
        data_dir:
            Root for ``dataset="cifar10"``: a local ImageFolder with ``train/`` and
            ``test/``, or torchvision's CIFAR-10 folder.
        img_size:
            Size of the random (and target) views in pixels; the side of the
            upsampled digits.
        focal_size:
            Size of the focal views; ``None``: half of ``img_size`` up to 64 px,
            else 3/7 of it.
        random_views:
            Random views per image, the target view included (2 in the paper: one
            target, one masked anchor).
        focal_views:
            Focal views per image (10 in the paper).
        random_crop_scale:
            Min and max area of the random crops, relative to the image.
        focal_crop_scale:
            Min and max area of the focal crops, relative to the image.
        cj_prob:
            Probability of colour jitter.
        cj_strength:
            Strength of the colour jitter (0.5 in the paper's ViT-S/16 config).
        random_gray_scale:
            Probability of grayscale conversion.
        hf_prob:
            Probability of a horizontal flip.
        gaussian_blur:
            Probability of Gaussian blur; ``None``: 0 up to 64 px, else 0.5.
        normalize:
            ``"cifar10"``, ``"imagenet"`` or ``None`` (by image size).
        batch_size:
            Images per batch and device.
        num_workers:
            Data loading processes per device.
        on_bad_image:
            ``"fail"``: an unreadable image file stops the run and is named;
            ``"skip"``: such files are left out (or replaced by the next image when
            they only fail at loading) and counted.
        train_subset:
            Train on a class-balanced random subset of this many images (``None``:
            all of them).
        subset_seed:
            Seed of the subset draw.
        validation_size:
            Hold out a fixed class-balanced draw of this many training images
            (:func:`validation_indices`), for tuning without the test set: they are
            never trained on, and ``train_subset`` is drawn from the others.
        transform:
            Replaces the MSN transform (e.g. another method's multi-view
            transform): a ``DeviceMultiViewTransform`` (``augment="device"``) or a
            callable returning the list of views of one image (``"loader"``); the
            view arguments above are then unused.
        augment:
            Where the views are made: ``"device"`` (whole batches, where the model
            trains), ``"loader"`` (each image in the loader workers) or ``"auto"``:
            ``"loader"`` for a per-image ``transform``, else ``"device"``.
        in_memory:
            With ``augment="device"``, decode an image folder once into memory
            (cached on disk) instead of in the loader workers at every epoch.
            ``None``: when its decoded images fit in ``memory_limit_gb``; ``True``:
            a larger folder is an error. The digits and torchvision's CIFAR-10 are
            held in memory anyway.
        memory_limit_gb:
            The most decoded images, in GiB, that ``in_memory`` holds in memory.
        cache_dir:
            Where decoded image folders are cached when their own folder is not
            writable; ``None``: ``$LIGHTLY_MSN_CACHE``, else ``~/.cache/lightly_msn``.
    """

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str | None = None,
        img_size: int = 32,
        focal_size: int | None = None,
        random_views: int = 2,
        focal_views: int = 10,
        random_crop_scale: tuple[float, float] = (0.3, 1.0),
        focal_crop_scale: tuple[float, float] = (0.05, 0.3),
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        random_gray_scale: float = 0.2,
        hf_prob: float = 0.5,
        gaussian_blur: float | None = None,
        normalize: str | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        on_bad_image: str = "fail",
        train_subset: int | None = None,
        subset_seed: int = 0,
        validation_size: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        augment: str = "auto",
        in_memory: bool | None = None,
        memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if batch_size < 2:
            raise ValueError(
                f"{name}: batch_size must be >= 2 (the projection head's BatchNorm "
                f"needs a batch), got {batch_size}."
            )
        if num_workers < 0:
            raise ValueError(f"{name}: num_workers must be >= 0, got {num_workers}.")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"{name}: on_bad_image must be one of {BAD_IMAGE_POLICIES}, got "
                f"{on_bad_image!r}."
            )
        if img_size < 1:
            raise ValueError(f"{name}: img_size must be positive, got {img_size}.")
        if random_views < 1:
            raise ValueError(
                f"{name}: random_views must be >= 1 (the target view), got "
                f"{random_views}."
            )
        if train_subset is not None and train_subset < batch_size:
            raise ValueError(
                f"{name}: train_subset={train_subset} is smaller than one batch of "
                f"{batch_size}."
            )
        if validation_size is not None and validation_size < 1:
            raise ValueError(
                f"{name}: validation_size must be >= 1 or None, got {validation_size}."
            )
        if not memory_limit_gb > 0:
            raise ValueError(
                f"{name}: memory_limit_gb must be > 0, got {memory_limit_gb}."
            )
        self.augment = _augment_mode(name, augment, transform)
        _check_dataset_name(dataset)
        self.save_hyperparameters(ignore=["transform"])
        self.dataset: str | Dataset = dataset
        self.data_dir = data_dir
        self.img_size = img_size
        self.focal_size = focal_size or default_focal_size(img_size)
        self.random_views = random_views
        self.focal_views = focal_views
        self.normalize = normalization(normalize, img_size)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_image = on_bad_image
        self.train_subset = train_subset
        self.subset_seed = subset_seed
        self.validation_size = validation_size
        self.in_memory = in_memory
        self.memory_limit_gb = memory_limit_gb
        self.cache_dir = cache_dir
        # the per-image transform ("loader") and the batched one ("device")
        self.transform: Callable[[Any], Any] | None = None
        self.device_transform: DeviceMultiViewTransform | None = None
        if isinstance(transform, DeviceMultiViewTransform):
            self.device_transform = transform
        elif transform is not None:
            self.transform = transform
        else:
            small = img_size <= SMALL_IMAGE_SIZE
            views: dict[str, Any] = dict(
                random_size=img_size,
                focal_size=self.focal_size,
                random_views=random_views,
                focal_views=focal_views,
                random_crop_scale=random_crop_scale,
                focal_crop_scale=focal_crop_scale,
                cj_prob=cj_prob,
                cj_strength=cj_strength,
                random_gray_scale=random_gray_scale,
                hf_prob=hf_prob,
                gaussian_blur=(0.0 if small else 0.5)
                if gaussian_blur is None
                else gaussian_blur,
                normalize=self.normalize,
            )
            self.transform = MSNTransform(**views)
            self.device_transform = DeviceMultiViewTransform.msn(**views)
        self.train_dataset: Dataset | None = None
        self._generator: torch.Generator | None = None
        self._seed = 0
        self._rank = 0

    @classmethod
    def from_dataset(cls, dataset: Dataset, **kwargs: Any) -> MSNDataModule:
        """A data module that trains on a dataset instance.

        Args:
            dataset:
                Items start with a PIL image or an image tensor (``ImageFolder``,
                ``LightlyDataset``, ...). Its ``transform`` attribute is replaced by
                the MSN transform (``augment="device"``: by the conversion to a
                uint8 tensor), or, with ``train_subset`` or ``validation_size``,
                it is wrapped and needs a ``targets`` attribute for the
                class-balanced draws.
            **kwargs:
                The other arguments of :class:`MSNDataModule`.
        """
        subset = kwargs.get("train_subset") or kwargs.get("validation_size")
        if not hasattr(dataset, "transform") and subset is None:
            raise ValueError(
                f"{cls.__name__}: a dataset instance needs a 'transform' attribute "
                "(as ImageFolder and LightlyDataset have) for the MSN views."
            )
        datamodule = cls(**kwargs)
        datamodule.dataset = dataset
        datamodule.hparams["dataset"] = type(dataset).__name__
        return datamodule

    def setup(self, stage: str | None = None) -> None:
        """Builds and checks the training set (reads the image files once)."""
        if self.train_dataset is None:
            self.train_dataset = self._build_train_dataset()
        self._check_size(self._world_size())
        rank = self._global_rank()
        # set up again by a trainer: the rank may differ from a set-up without one
        if self.augment == "device" and (self._generator is None or rank != self._rank):
            self._seed, self._rank = torch.initial_seed(), rank
            seed = augmentation_seed(self._seed, self._rank)
            self._generator = torch.Generator().manual_seed(seed)

    def _build_train_dataset(self) -> Dataset:
        transform: Callable[[Any], Any] | None = self.transform
        if self.augment == "loader":
            images = self._source_images()
        elif isinstance(self.dataset, str):
            images, transform = self._decoded_images(), _as_is
        else:
            images, transform = self.dataset, as_uint8_image
        assert transform is not None
        if self.train_subset is not None or self.validation_size is not None:
            indices = training_indices(
                dataset_labels(images),
                self.train_subset,
                self.subset_seed,
                self.validation_size,
            )
            return TransformedSubset(images, indices, transform)
        if not isinstance(images, DecodedImages):
            images.transform = transform  # type: ignore[attr-defined]
        return images

    def _source_images(self) -> Dataset:
        if not isinstance(self.dataset, str):
            return self.dataset
        return build_dataset(
            self.dataset,
            split="train",
            data_dir=self.data_dir,
            on_bad_image=self.on_bad_image,
            img_size=self.img_size,
            min_size=None if self.dataset == "digits" else self.img_size,
        )

    def _decoded_images(self) -> Dataset:
        """The training images as uint8 tensors: in memory, or decoded per item."""
        images = self._source_images()
        if isinstance(images, DigitsDataset):
            return DecodedImages.from_images(
                [as_uint8_image(image) for image in images.images],
                images.targets,
                images.classes,
            )
        if isinstance(images, CheckedImageFolder):
            return self._folder_images(images)
        # torchvision's CIFAR10: (N, 32, 32, 3) uint8 in memory
        pixels = torch.from_numpy(images.data).permute(0, 3, 1, 2)  # type: ignore[attr-defined]
        return DecodedImages.from_images(
            list(pixels),
            images.targets,  # type: ignore[attr-defined]
            images.classes,  # type: ignore[attr-defined]
        )

    def _folder_images(self, folder: CheckedImageFolder) -> Dataset:
        """An image folder decoded into memory (cached), or decoded by the workers."""
        needed = decoded_bytes(folder.image_sizes)
        limit = self.memory_limit_gb * 2**30
        if self.in_memory is False or (self.in_memory is None and needed > limit):
            if self.in_memory is None:
                logger.info(
                    "the decoded images of %s need %.1f GiB, more than "
                    "memory_limit_gb=%g: the loader workers decode them",
                    folder.root,
                    needed / 2**30,
                    self.memory_limit_gb,
                )
            folder.loader = read_image
            return folder
        if needed > limit:
            raise ValueError(
                f"{type(self).__name__}: the {len(folder)} training images of "
                f"{folder.root} need {needed / 2**30:.2f} GiB decoded, more than "
                f"memory_limit_gb={self.memory_limit_gb:g}; raise memory_limit_gb "
                "(--data.memory_limit_gb), let the loader workers decode them "
                "(in_memory=None or False), or use augment='loader'."
            )
        images = decode_folder(
            folder.root,
            folder.samples,
            folder.image_sizes,
            folder.classes,
            cache_dir=self.cache_dir,
            num_workers=self.num_workers,
        )
        if images.failures:
            _report_undecodable(images, folder, self.on_bad_image)
        return images

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all devices."""
        return self.batch_size * self._world_size()

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches, the last incomplete one dropped.

        ``(views, labels)``, except with ``augment="device"`` off the CPU: an
        :class:`~lightly_msn.device_batches.ImageBatch` of uint8 images, whose
        views the transfer hooks make on the device.
        """
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        collate: Callable[[Any], Any] | None = None
        if self.augment == "device":
            collate = self._device_collate()
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
        )

    def _device_collate(self) -> Callable[[Any], Any]:
        device = self._device()
        if device.type == "cpu":
            assert self.device_transform is not None and self._generator is not None
            return AugmentingCollate(
                self.device_transform, self._generator, self._seed, self._rank
            )
        folder = self._image_folder()
        if folder is not None and folder.loader in (read_image, read_encoded):
            on_device = jpeg_decoding_available(device)
            folder.loader = read_encoded if on_device else read_image
        return collate_images

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Decodes the JPEG files of an ``augment="device"`` batch on the GPU."""
        if not isinstance(batch, ImageBatch):
            return batch
        folder = self._image_folder()
        skip = folder._count_load_failure if folder and folder.skip_unreadable else None
        return decode_encoded(batch, self._device(), skip)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Makes the views of an ``augment="device"`` batch where it arrived."""
        if not isinstance(batch, ImageBatch):
            return batch
        assert self.device_transform is not None
        views = self.device_transform(batch.images, generator=self._generator)
        return views, batch.labels

    def state_dict(self) -> dict[str, Any]:
        """The main process's augmentation generator (``augment="device"``)."""
        if self._generator is None:
            return {}
        return {"augmentation_generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the generator; other ranks derive theirs from rank 0's state."""
        state = state_dict.get("augmentation_generator")
        if state is None or self._generator is None:
            return
        if self._rank == 0:
            self._generator.set_state(state)
            return
        digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest()
        seed = augmentation_seed(int.from_bytes(digest, "little"), self._rank)
        self._generator.manual_seed(seed)

    def num_load_failures(self) -> int:
        """Images that could not be decoded during training and were replaced."""
        folder = self._image_folder()
        return folder.num_load_failures if folder is not None else 0

    def _image_folder(self) -> CheckedImageFolder | None:
        dataset = self.train_dataset
        if isinstance(dataset, TransformedSubset):
            dataset = dataset.dataset
        return dataset if isinstance(dataset, CheckedImageFolder) else None

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return torch.device("cpu")
        return torch.device(trainer.strategy.root_device)

    def _global_rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _check_size(self, world_size: int) -> None:
        size = len(self.train_dataset)  # type: ignore[arg-type]
        if size < self.batch_size * world_size:
            raise ValueError(
                f"{type(self).__name__}: the training set has {size} images, fewer "
                f"than one global batch of {self.batch_size} x {world_size} "
                "device(s); lower batch_size."
            )


def _augment_mode(name: str, augment: str, transform: Any) -> str:
    """``"device"`` or ``"loader"`` for ``augment`` and ``transform``; checks both."""
    if augment not in AUGMENT_MODES:
        raise ValueError(
            f"{name}: augment must be one of {AUGMENT_MODES}, got {augment!r}."
        )
    batched = isinstance(transform, DeviceMultiViewTransform)
    per_image = transform is not None and not batched
    if augment == "auto":
        return "loader" if per_image else "device"
    if augment == "device" and per_image:
        raise ValueError(
            f"{name}: augment='device' makes the views of whole batches and needs a "
            f"DeviceMultiViewTransform (or no transform), got "
            f"{type(transform).__name__}; use augment='loader' for a per-image "
            "transform."
        )
    if augment == "loader" and batched:
        raise ValueError(
            f"{name}: a DeviceMultiViewTransform makes the views of whole batches; "
            "use it with augment='device' (or 'auto')."
        )
    return augment


def _as_is(image: Any) -> Any:
    return image


def _unreadable_image_error(path: str, error: object) -> ValueError:
    return ValueError(
        f"unreadable image file {path} ({error}); fix or remove it, or use "
        "on_bad_image='skip' (--data.on_bad_image skip) to drop such files"
    )


def _report_undecodable(
    images: DecodedImages, folder: CheckedImageFolder, on_bad_image: str
) -> None:
    """Applies ``on_bad_image`` to the files that passed the check but not decoding."""
    path, error = images.failures[0]
    if on_bad_image == "fail":
        raise _unreadable_image_error(path, error)
    logger.warning(
        "skipped %d image file(s) of %s that could not be decoded, e.g. %s (%s)",
        len(images.failures),
        folder.root,
        path,
        error,
    )
    if not len(images):
        raise ValueError(f"no image file in {folder.root} could be decoded")


def _check_dataset_name(dataset: str) -> None:
    if dataset in ("digits", "cifar10"):
        return
    root = Path(dataset).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"dataset folder {root} does not exist (expected an ImageFolder, "
            "'cifar10' or 'digits')"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path {root} is not a folder")


def eval_transform(
    img_size: int,
    normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE,
    resize: int | None = None,
) -> Callable[[Image.Image], Any]:
    """The deterministic evaluation transform: resize, centre crop, tensor, normalise.

    Args:
        img_size:
            Side of the square centre crop in pixels.
        normalize:
            ``{"mean": [...], "std": [...]}`` per channel (e.g. ``IMAGENET_NORMALIZE``
            or ``CIFAR10_NORMALIZE``), or ``None`` to keep values in [0, 1].
        resize:
            The shorter image side is resized to this before the crop; defaults to
            ``img_size`` (the crop keeps the whole shorter side).

    Returns:
        A callable mapping a PIL image to a float32 ``(3, img_size, img_size)`` tensor.
    """
    from torchvision import transforms

    steps: list[Callable[[Any], Any]] = [
        transforms.Resize(resize or img_size),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
    ]
    if normalize is not None:
        steps.append(transforms.Normalize(normalize["mean"], normalize["std"]))
    return transforms.Compose(steps)


@dataclass(frozen=True)
class Overlap:
    """A test image file that is also a train image file.

    Attributes:
        test_file:
            The test image.
        train_file:
            The train image it repeats.
        same_file:
            ``True`` when both are the same file (one path, a link or a hard link);
            ``False`` when they are different files with identical bytes.
    """

    test_file: str
    train_file: str
    same_file: bool


def find_overlap(train: Dataset, test: Dataset) -> list[Overlap]:
    """The test images that are also train images: the same file or the same bytes.

    Compares the image files of two image-folder datasets (their ``samples``) by file
    identity (device and inode, which resolves links) and by a hash of the file bytes,
    so a copy of a train image in the test folder is found too. Only files whose
    byte size occurs in both sets are hashed. Datasets without image files (the
    bundled digits, torchvision's CIFAR-10) are split by construction and give no
    overlap.

    Returns:
        One ``Overlap`` per repeated test image, in the test set's order.
    """
    train_files = _image_files(train)
    test_files = _image_files(test)
    if not train_files or not test_files:
        return []
    train_stats = {path: os.stat(path) for path in train_files}
    test_stats = {path: os.stat(path) for path in test_files}
    train_by_identity = {
        (stat.st_dev, stat.st_ino): path for path, stat in train_stats.items()
    }
    train_sizes = {stat.st_size for stat in train_stats.values()}
    test_sizes = {stat.st_size for stat in test_stats.values()}
    train_by_digest = {
        _file_digest(path): path
        for path, stat in train_stats.items()
        if stat.st_size in test_sizes
    }
    overlaps = []
    for path, stat in test_stats.items():
        twin = train_by_identity.get((stat.st_dev, stat.st_ino))
        if twin is not None:
            overlaps.append(Overlap(path, twin, same_file=True))
        elif stat.st_size in train_sizes:
            twin = train_by_digest.get(_file_digest(path))
            if twin is not None:
                overlaps.append(Overlap(path, twin, same_file=False))
    return overlaps


def match_classes(dataset: Dataset, classes: Sequence[str], name: str = "test") -> None:
    """Relabels ``dataset`` in place so that its labels index ``classes`` by name.

    Label ``i`` of the result means ``classes[i]`` whatever the dataset's own class
    order; classes of ``classes`` that the dataset lacks are fine.

    Args:
        dataset:
            A dataset of :func:`build_dataset` (``classes`` and ``targets``
            attributes; an image folder's ``samples`` are relabelled too).
        classes:
            The class names the labels must index, e.g. the train set's.
        name:
            What ``dataset`` is, for the error message.

    Raises:
        ValueError: If the dataset has classes that ``classes`` does not name.
    """
    own = list(dataset.classes)  # type: ignore[attr-defined]
    if own == list(classes):
        return
    index = {class_name: i for i, class_name in enumerate(classes)}
    unknown = [class_name for class_name in own if class_name not in index]
    if unknown:
        where = getattr(dataset, "root", None)
        raise ValueError(
            f"{name} classes {', '.join(map(repr, unknown))}"
            + (f" of {where}" if where is not None else "")
            + f" are not among the train classes ({', '.join(map(repr, classes))}); "
            "labels are matched by class name"
        )
    relabel = [index[class_name] for class_name in own]
    dataset.targets = [relabel[t] for t in dataset.targets]  # type: ignore[attr-defined]
    if isinstance(dataset, ImageFolder):
        dataset.samples = [(path, relabel[t]) for path, t in dataset.samples]
        dataset.imgs = dataset.samples
    dataset.classes = list(classes)  # type: ignore[attr-defined]
    dataset.class_to_idx = dict(index)  # type: ignore[attr-defined]


def _image_files(dataset: Dataset) -> list[str]:
    return [path for path, _ in getattr(dataset, "samples", [])]


def _file_digest(path: str) -> bytes:
    with open(path, "rb") as file:
        return hashlib.blake2b(file.read(), digest_size=16).digest()


__all__ = [
    "CIFAR10_NORMALIZE",
    "IMAGENET_NORMALIZE",
    "CheckedImageFolder",
    "DigitsDataset",
    "MSNDataModule",
    "Overlap",
    "TransformedSubset",
    "balanced_indices",
    "build_dataset",
    "dataset_labels",
    "eval_transform",
    "find_overlap",
    "image_folder_root",
    "match_classes",
    "training_indices",
    "validation_indices",
]
