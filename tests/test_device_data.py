"""``MSNDataModule(augment="device")``: image cache, batches, seeds, GPU paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from lightly_msn import image_cache
from lightly_msn.data import CheckedImageFolder, MSNDataModule
from lightly_msn.device_batches import (
    ImageBatch,
    augmentation_seed,
    collate_images,
    decode_encoded,
    read_encoded,
)
from lightly_msn.device_transforms import DeviceMultiViewTransform
from lightly_msn.image_cache import DecodedImages, read_image

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CACHE = image_cache.CACHE_FILE_NAME


def write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    """An ImageFolder of random PNGs: ``{class: [(width, height), ...]}``."""
    rng = np.random.default_rng(0)
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index, (width, height) in enumerate(shapes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def device_data(root: Path, **kwargs: Any) -> MSNDataModule:
    settings: dict[str, Any] = dict(
        img_size=8, focal_views=1, batch_size=2, num_workers=0, augment="device"
    )
    data = MSNDataModule(str(root), **{**settings, **kwargs})
    data.setup("fit")
    return data


def pil_pixels(path: str | Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("images were decoded")

    monkeypatch.setattr(image_cache, "_decode", fail)


# --- the decoded-image cache --------------------------------------------------------


def test_images_of_several_sizes_are_decoded_once_into_one_cached_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_folder(tmp_path / "data", {"a": [(8, 8), (12, 9)], "b": [(10, 16)]})
    data = device_data(root)
    images = data.train_dataset
    assert isinstance(images, DecodedImages)
    assert images.pixels.dtype == torch.uint8 and images.pixels.ndim == 1
    assert images.nbytes == 3 * (8 * 8 + 12 * 9 + 10 * 16)
    files = [root / "a" / "0.png", root / "a" / "1.png", root / "b" / "0.png"]
    for index, path in enumerate(files):
        image, label = images[index]
        assert torch.equal(image, pil_pixels(path))
        assert label == (0 if index < 2 else 1)
    assert (root / CACHE).is_file()

    # a second run reads the cache (memory-mapped) and decodes nothing
    no_decoding(monkeypatch)
    again = device_data(root).train_dataset
    assert isinstance(again, DecodedImages)
    for index in range(3):
        assert torch.equal(again[index][0], images[index][0])


def test_the_cache_is_rebuilt_when_a_file_changes_or_is_added(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", {"a": [(8, 8)] * 3})
    first = device_data(root).train_dataset
    # same size, same name, other pixels
    Image.new("RGB", (8, 8), (7, 8, 9)).save(root / "a" / "1.png")
    changed = device_data(root).train_dataset
    assert changed[1][0].flatten(1)[:, 0].tolist() == [7, 8, 9]
    assert torch.equal(changed[0][0], first[0][0])
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "a" / "3.png")
    added = device_data(root).train_dataset
    assert len(added) == 4 and added[3][0].flatten(1)[:, 0].tolist() == [1, 2, 3]


def test_a_read_only_folder_is_cached_in_the_cache_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_folder(tmp_path / "data", {"a": [(8, 8)] * 2})
    cache_dir = tmp_path / "cache"
    real_access = os.access

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        if Path(path) == root and mode == os.W_OK:
            return False  # chmod does not stop root, who runs some test machines
        return real_access(path, mode, **kwargs)

    root.chmod(0o555)
    monkeypatch.setattr(os, "access", access)
    try:
        device_data(root, cache_dir=str(cache_dir))
        assert not (root / CACHE).exists()
        (cached,) = cache_dir.glob("*.pt")
        assert cached == image_cache.cache_locations(root, cache_dir)[1]
        # without the argument: $LIGHTLY_MSN_CACHE
        monkeypatch.setenv(image_cache.CACHE_DIR_ENV, str(tmp_path / "from_env"))
        device_data(root)
        assert len(list((tmp_path / "from_env").glob("*.pt"))) == 1
        no_decoding(monkeypatch)
        device_data(root, cache_dir=str(cache_dir))  # reused from there
    finally:
        root.chmod(0o755)


def test_too_large_for_memory_is_an_error_before_decoding_or_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_folder(tmp_path / "data", {"a": [(64, 64)] * 4})
    no_decoding(monkeypatch)
    limit = 2e-5  # GiB: 21 kB, less than the 48 kB the four images need
    with pytest.raises(ValueError) as error:
        device_data(root, in_memory=True, memory_limit_gb=limit)
    message = str(error.value)
    assert "need 0.00 GiB decoded" in message or "GiB decoded" in message
    assert f"memory_limit_gb={limit:g}" in message
    assert "augment='loader'" in message and "raise memory_limit_gb" in message
    assert not (root / CACHE).exists()
    # by default such a folder is decoded by the loader workers instead
    streamed = device_data(root, memory_limit_gb=limit).train_dataset
    assert isinstance(streamed, CheckedImageFolder)
    image, _ = streamed[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)


def test_the_size_check_counts_decoded_bytes(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", {"a": [(64, 64)] * 4})
    needed = 3 * 64 * 64 * 4 / 2**30
    with pytest.raises(ValueError, match=f"need {needed:.2f} GiB"):
        device_data(root, in_memory=True, memory_limit_gb=needed / 2)
    assert isinstance(
        device_data(root, in_memory=True, memory_limit_gb=needed).train_dataset,
        DecodedImages,
    )


def test_device_arguments_are_checked_when_created() -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        MSNDataModule(augment="gpu")
    with pytest.raises(ValueError, match="memory_limit_gb must be > 0"):
        MSNDataModule(memory_limit_gb=0)
    with pytest.raises(ValueError, match="needs a DeviceMultiViewTransform"):
        MSNDataModule(augment="device", transform=lambda image: [image])
    with pytest.raises(ValueError, match="use it with augment='device'"):
        MSNDataModule(augment="loader", transform=DeviceMultiViewTransform.mae())
    assert MSNDataModule(transform=lambda image: [image]).augment == "loader"
    assert MSNDataModule().augment == "device"


# --- batches of views ---------------------------------------------------------------


def first_batch(data: MSNDataModule) -> tuple[list[torch.Tensor], torch.Tensor]:
    batch: tuple[list[torch.Tensor], torch.Tensor] = next(iter(data.train_dataloader()))
    return batch


@pytest.mark.parametrize(
    "transform, sizes",
    [
        (None, [16, 16, 8, 8, 8]),  # MSN: 2 random views, 3 focal views
        (DeviceMultiViewTransform.dino(n_local_views=2).for_small_images(16, 8),
         [16, 16, 8, 8]),
    ],
    ids=["msn", "dino"],
)  # fmt: skip
def test_device_batches_hold_the_views_of_the_transform(
    transform: DeviceMultiViewTransform | None, sizes: list[int]
) -> None:
    data = MSNDataModule(
        "digits", img_size=16, focal_views=3, batch_size=8, num_workers=0,
        transform=transform,
    )  # fmt: skip
    data.setup("fit")
    assert isinstance(data.train_dataset, DecodedImages)
    views, labels = first_batch(data)
    assert [tuple(view.shape) for view in views] == [(8, 3, s, s) for s in sizes]
    assert all(view.dtype == torch.float32 for view in views)
    assert labels.shape == (8,) and labels.dtype == torch.int64
    # CIFAR-10 statistics for 16 px images: normalised, not in [0, 1]
    assert min(float(view.min()) for view in views) < 0


def test_device_batches_are_deterministic_under_the_seed() -> None:
    def batch(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        data = MSNDataModule("digits", img_size=16, batch_size=8, num_workers=0)
        data.setup("fit")
        return first_batch(data)[0]

    first, again, other = batch(3), batch(3), batch(4)
    for a, b, c in zip(first, again, other, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


class SameImage(Dataset):
    """One image, ``length`` times: views differ only by their random draws."""

    def __init__(self, length: int = 16) -> None:
        pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
        self.image = Image.fromarray(pixels)
        self.length = length
        self.transform: Any = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.image), 0


def test_loader_workers_draw_distinct_streams() -> None:
    torch.manual_seed(0)
    data = MSNDataModule.from_dataset(
        SameImage(), img_size=16, batch_size=4, num_workers=2, augment="device"
    )
    data.setup("fit")
    batches = iter(data.train_dataloader())
    worker_0, worker_1 = next(batches)[0], next(batches)[0]  # round-robin order
    for a, b in zip(worker_0, worker_1, strict=True):
        assert not torch.equal(a, b)
    # and every rank of a run, and every worker of a rank, has its own seed
    worker = type("Worker", (), {"id": 0, "seed": 5})
    seeds = {
        augmentation_seed(0, 0),
        augmentation_seed(0, 1),
        augmentation_seed(0, 0, worker),
        augmentation_seed(0, 1, worker),
    }
    assert len(seeds) == 4


# --- JPEG files decoded on the training device --------------------------------------


def write_jpegs(root: Path, count: int, size: int = 24) -> list[Path]:
    (root / "a").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        paths.append(root / "a" / f"{index}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_jpeg_bytes_decode_on_the_device_and_bad_ones_are_replaced_or_named(
    device: str, tmp_path: Path
) -> None:
    paths = write_jpegs(tmp_path, 4)
    png = tmp_path / "a" / "other.png"
    Image.new("RGB", (24, 24), (1, 2, 3)).save(png)
    items = [(read_encoded(path), index) for index, path in enumerate([*paths, png])]
    batch = collate_images(items)
    assert isinstance(batch.images, list) and batch.images[-1].ndim == 3
    decoded = decode_encoded(batch, torch.device(device))
    assert isinstance(decoded.images, torch.Tensor)
    assert decoded.images.shape == (5, 3, 24, 24)
    assert decoded.images.device.type == device
    for image, path in zip(decoded.images, [*paths, png], strict=True):
        # nvJPEG and libjpeg-turbo may round differently
        difference = (image.cpu().int() - read_image(path).int()).abs()
        assert float(difference.float().mean()) < 1.0

    truncate(paths[1])
    batch = collate_images([(read_encoded(path), i) for i, path in enumerate(paths)])
    with pytest.raises(OSError, match=r"could not load image file .*1\.jpg"):
        decode_encoded(batch, torch.device(device))
    failures: list[str] = []
    decoded = decode_encoded(
        batch, torch.device(device), lambda file, error: failures.append(file)
    )
    assert failures == [str(paths[1])]
    assert decoded.images.shape == (4, 3, 24, 24)  # the batch keeps its size
    assert torch.equal(decoded.images[1], decoded.images[2])
    assert decoded.labels.tolist() == [0, 2, 2, 3]


@CUDA
def test_a_cuda_fit_makes_the_views_on_the_gpu(tmp_path: Path) -> None:
    from pytorch_lightning import Callback, LightningModule, Trainer

    from lightly_msn.train import MSNLightningModule
    from tests._train_helpers import TINY_HEAD, tiny_vit

    write_jpegs(tmp_path / "data", 16, size=16)
    seen: list[torch.device] = []

    class Views(Callback):
        def on_train_batch_start(
            self, trainer: Trainer, module: LightningModule, batch: Any, *args: Any
        ) -> None:
            seen.extend(view.device for view in batch[0])

    for in_memory in (None, False):  # decoded in memory; JPEGs decoded on the GPU
        data = MSNDataModule(
            str(tmp_path / "data"), img_size=16, focal_views=1, batch_size=8,
            num_workers=0, augment="device", in_memory=in_memory,
        )  # fmt: skip
        module = MSNLightningModule(vit=tiny_vit(), max_steps=2, **TINY_HEAD)
        trainer = Trainer(
            max_steps=2, accelerator="gpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False,
            precision="bf16-mixed", callbacks=[Views()],
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 2
    assert seen and all(device.type == "cuda" for device in seen)


@CUDA
def test_gpu_batches_equal_the_cpu_transform_of_the_same_images() -> None:
    data = MSNDataModule("digits", img_size=16, batch_size=8, num_workers=0)
    data.setup("fit")
    items = [data.train_dataset[index] for index in range(8)]  # type: ignore[index]
    batch = collate_images(items)
    assert isinstance(batch, ImageBatch) and isinstance(batch.images, torch.Tensor)
    on_gpu = ImageBatch(batch.images.cuda(), batch.labels.cuda())
    assert data.device_transform is not None
    state = data._generator.get_state()  # type: ignore[union-attr]
    views, labels = data.on_after_batch_transfer(on_gpu, 0)
    data._generator.set_state(state)  # type: ignore[union-attr]
    expected = data.device_transform(batch.images, generator=data._generator)
    for view, reference in zip(views, expected, strict=True):
        assert view.device.type == "cuda"
        torch.testing.assert_close(view.cpu(), reference, atol=2e-5, rtol=1e-5)


# --- the views train alike ----------------------------------------------------------


def test_device_views_train_as_well_as_the_pil_views(tmp_path: Path) -> None:
    """kNN accuracy after a short pretraining: the paths agree within the seeds'
    spread (3 seeds each, same images, same model, same recipe)."""
    from lightly_msn.data import build_dataset, eval_transform, normalization
    from lightly_msn.demo import knn_accuracy
    from lightly_msn.model import ClassTokenFeatures
    from lightly_msn.train import pretrain
    from tests._train_helpers import tiny_vit

    to_tensor = eval_transform(16, normalization(None, 16))
    bank, test = (
        build_dataset("digits", split, img_size=16, transform=to_tensor)
        for split in ("train", "test")
    )

    accuracy: dict[str, list[float]] = {"device": [], "loader": []}
    for augment, runs in accuracy.items():
        for seed in range(3):
            torch.manual_seed(seed)
            result = pretrain(
                "digits", vit=tiny_vit(), img_size=16, patch_size=4, focal_size=8,
                focal_views=2, train_subset=640, epochs=2, batch_size=64,
                num_workers=0, hidden_dim=64, output_dim=32, num_prototypes=16,
                lr=3e-3, start_lr=6e-4, momentum=0.99, augment=augment, seed=seed,
                accelerator="cpu", devices=1, progress=False,
                output_dir=tmp_path / f"{augment}-{seed}",
            )  # fmt: skip
            target = ClassTokenFeatures(result.module.model.target_vit).eval()
            runs.append(knn_accuracy(target, bank, test, progress=False))  # k = 20
    means = {augment: float(np.mean(runs)) for augment, runs in accuracy.items()}
    spread = max(float(np.std(runs, ddof=1)) for runs in accuracy.values())
    assert abs(means["device"] - means["loader"]) <= 2 * spread + 1.0, accuracy
