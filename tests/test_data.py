import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightly_msn.data import build_dataset

CIFAR_TARBALL = Path(__file__).resolve().parents[1].parent / (
    "shared/data/cifar10-jpg.tar.gz"
)


def extract_cifar_sample(destination: Path, patterns: tuple[str, ...]) -> Path:
    """Extracts the CIFAR-10 JPEGs matching ``patterns`` (tar wildcards)."""
    if not CIFAR_TARBALL.exists():
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR_TARBALL}")
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-xzf", str(CIFAR_TARBALL), "-C", str(destination), "--wildcards"]
        + list(patterns),
        check=True,
    )
    return destination


def _write_image(path: Path, size: int = 16, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size, 3), value, dtype=np.uint8)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    for name in ("cat", "dog"):
        for index in range(3):
            _write_image(tmp_path / name / f"{index}.png", value=40 * index)
    return tmp_path


def test_digits_split_is_stratified_disjoint_and_deterministic() -> None:
    train = build_dataset("digits", split="train", img_size=16)
    test = build_dataset("digits", split="test", img_size=16)
    assert len(train) + len(test) == 1797
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (16, 16)
    assert isinstance(label, int)
    train_counts = np.bincount(train.targets, minlength=10)
    test_counts = np.bincount(test.targets, minlength=10)
    # stratified: every class is ~20 % test
    np.testing.assert_allclose(
        test_counts / (train_counts + test_counts), 0.2, atol=0.01
    )
    again = build_dataset("digits", split="test", img_size=16)
    assert again.targets == test.targets
    assert np.array_equal(np.asarray(again[5][0]), np.asarray(test[5][0]))
    train_pixels = {np.asarray(img).tobytes() for img in train.images}
    shared = sum(np.asarray(img).tobytes() in train_pixels for img in test.images)
    assert shared <= 2  # the digits set itself holds a couple of exact duplicates


def test_digits_applies_transform_and_checks_min_size() -> None:
    dataset = build_dataset("digits", transform=lambda image: image.size, img_size=24)
    assert dataset[0][0] == (24, 24)
    with pytest.raises(ValueError, match="smaller than the requested min_size=32"):
        build_dataset("digits", img_size=24, min_size=32)


def test_image_folder_loads_rgb_images_with_class_labels(image_folder: Path) -> None:
    dataset = build_dataset(str(image_folder))
    assert len(dataset) == 6
    assert dataset.classes == ["cat", "dog"]
    image, label = dataset[5]
    assert image.mode == "RGB" and label == 1


def test_image_folder_uses_split_subfolder(tmp_path: Path) -> None:
    _write_image(tmp_path / "train" / "a" / "0.png")
    _write_image(tmp_path / "test" / "a" / "0.png")
    _write_image(tmp_path / "test" / "b" / "0.png")
    assert len(build_dataset(str(tmp_path), split="test")) == 2
    assert len(build_dataset(str(tmp_path), split="train")) == 1


def test_bad_arguments_and_folders_raise_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        build_dataset(str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image files"):
        build_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("digits", split="val")
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        build_dataset("digits", on_bad_image="ignore")


def test_corrupt_image_fails_naming_file_or_is_skipped_with_count(
    image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = image_folder / "dog" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ValueError, match="unreadable image file .*broken.png"):
        build_dataset(str(image_folder))
    with caplog.at_level(logging.WARNING, logger="lightly_msn.data"):
        dataset = build_dataset(str(image_folder), on_bad_image="skip")
    assert len(dataset) == 6
    assert dataset.num_skipped_images == 1
    assert "skipped 1 unreadable image file(s) of 7" in caplog.text
    assert all("broken" not in path for path, _ in dataset.samples)


def test_image_smaller_than_min_size_is_named(image_folder: Path) -> None:
    _write_image(image_folder / "cat" / "tiny.png", size=8)
    assert len(build_dataset(str(image_folder), min_size=8)) == 7
    with pytest.raises(ValueError, match="tiny.png is 8x8 pixels, smaller than"):
        build_dataset(str(image_folder), min_size=12)


def test_truncated_image_error_names_file_on_load(image_folder: Path) -> None:
    path = image_folder / "cat" / "cut.jpg"
    Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    ).save(path)
    path.write_bytes(path.read_bytes()[:-400])
    dataset = build_dataset(str(image_folder))  # the header is intact: verify passes
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith("cut.jpg"))
    with pytest.raises(OSError, match="could not load image file .*cut.jpg"):
        dataset[index]


def test_cifar10_local_image_folder(tmp_path: Path) -> None:
    extract_cifar_sample(tmp_path, ("train/cat/000*", "test/dog/000*"))
    train = build_dataset("cifar10", split="train", data_dir=tmp_path)
    test = build_dataset("cifar10", split="test", data_dir=tmp_path)
    assert len(train) > 0 and len(test) > 0
    image, _ = train[0]
    assert image.size == (32, 32)
    with pytest.raises(ValueError, match="CIFAR-10 images are 32x32"):
        build_dataset("cifar10", data_dir=tmp_path, min_size=64)


def test_cifar10_without_local_copy_or_network_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", offline)
    with pytest.raises(FileNotFoundError, match="Offline, pass data_dir"):
        build_dataset("cifar10", data_dir=tmp_path)


def test_validation_images_are_held_out_of_every_training_draw() -> None:
    from lightly_msn.data import training_indices, validation_indices

    labels = np.repeat(np.arange(4), 50)  # 4 classes of 50
    held_out = validation_indices(labels, 20)
    assert np.bincount(labels[held_out]).tolist() == [5, 5, 5, 5]
    for seed in range(3):  # the held-out images do not depend on the subset seed
        everything = training_indices(labels, None, seed, validation_size=20)
        assert sorted(set(everything) | set(held_out)) == list(range(200))
        assert not set(everything) & set(held_out)
        subset = training_indices(labels, 40, seed, validation_size=20)
        assert len(subset) == 40 and set(subset) <= set(everything)
        assert np.bincount(labels[subset]).tolist() == [10, 10, 10, 10]
    assert training_indices(labels, None, 0) == list(range(200))
    assert validation_indices(labels, None) == []


def test_the_data_module_never_trains_on_validation_images() -> None:
    from lightly_msn.data import MSNDataModule, validation_indices

    with pytest.raises(ValueError, match="validation_size must be >= 1"):
        MSNDataModule(dataset="digits", validation_size=0)
    data = MSNDataModule(
        dataset="digits", img_size=16, batch_size=8, validation_size=100
    )
    data.setup("fit")
    train = build_dataset("digits", "train")
    held_out = set(validation_indices(np.asarray(train.targets), 100))
    assert len(data.train_dataset) == len(train) - 100
    assert not held_out & set(data.train_dataset.indices)
