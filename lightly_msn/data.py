"""Datasets for pretraining and evaluation: image folders, CIFAR-10 and bundled digits.

`build_dataset` returns a torch ``Dataset`` of ``(image, label)`` pairs where ``image``
is an RGB ``PIL.Image`` (or whatever ``transform`` makes of it) and ``label`` an int.

Image files are checked **eagerly**, when the dataset is built: every file is opened
and its structure verified with ``PIL.Image.verify`` (headers and chunk structure; it
does not decode the pixels, so it costs a file read, about a millisecond for a small
JPEG). A broken file therefore fails before training starts instead of hours into an
epoch. With ``on_bad_image="skip"`` such files are dropped, counted and reported in
one logged warning. A file whose header is intact but whose pixel data is truncated
can still pass ``verify``; loading it later raises an error that names the file.
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
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from lightly_msn.transforms import CIFAR10_NORMALIZE, IMAGENET_NORMALIZE

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("fail", "skip")
SPLITS = ("train", "test")

# The bundled digits are split once, stratified, with a fixed seed, so that every run
# (and every test) sees the same train and test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


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

    ``num_skipped_images`` counts the unreadable files dropped when it was built.
    """

    num_skipped_images: int = 0

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as error:
            raise OSError(f"could not load image file {path}: {error}") from error
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


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
        raise RuntimeError(
            f"could not load or download CIFAR-10 into {download_root} ({error}). "
            "Offline, pass data_dir (--data-dir) pointing at a local ImageFolder with "
            "train/ and test/ sub-folders, or at a folder holding torchvision's "
            "cifar-10-batches-py"
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
    bad: list[str] = []
    for path, target in tqdm(
        dataset.samples, desc="checking images", unit="img", leave=False
    ):
        try:
            with Image.open(path) as image:
                image.verify()
                size = image.size
        except Exception as error:
            if on_bad_image == "fail":
                raise ValueError(
                    f"unreadable image file {path} ({error}); fix or remove it, or "
                    "use on_bad_image='skip' (--on-bad-image skip) to drop such files"
                ) from error
            bad.append(path)
            continue
        if min_size is not None and min(size) < min_size:
            raise ValueError(
                f"image file {path} is {size[0]}x{size[1]} pixels, smaller than the "
                f"required {min_size} pixels (e.g. the crop size); resize the data or "
                "lower the crop size"
            )
        kept.append((path, target))
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
    dataset.num_skipped_images = len(bad)


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
    "Overlap",
    "build_dataset",
    "eval_transform",
    "find_overlap",
    "image_folder_root",
    "match_classes",
]
