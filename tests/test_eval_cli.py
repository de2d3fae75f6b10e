import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from lightly_msn.cli import main
from lightly_msn.data import build_dataset
from lightly_msn.eval.embed import embed
from tests.test_data import extract_cifar_sample


def test_eval_cli_end_to_end_on_real_cifar10_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = extract_cifar_sample(
        tmp_path / "cifar",
        ("train/cat/000*", "train/ship/000*", "test/cat/000*", "test/ship/000*"),
    )
    output_dir = tmp_path / "out"
    code = main(
        [
            "eval",
            "--timm",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--train",
            str(data / "train"),
            "--test",
            str(data / "test"),
            "--knn",
            "--retrieval",
            "--fewshot",
            "1,2,50%",
            "--seeds",
            "2",
            "--batch-size",
            "8",
            "--output-dir",
            str(output_dir),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for expected in ("knn", "k=10", "precision_at_1", "fewshot", "50%", "±"):
        assert expected in printed
    with (output_dir / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {row["protocol"] for row in rows} == {"knn", "retrieval", "fewshot"}
    assert all(0.0 <= float(row["mean"]) <= 100.0 for row in rows)
    report = json.loads((output_dir / "results.json").read_text())
    assert report["feature_dim"] == 192
    assert report["model"] == "timm:vit_tiny_patch16_224 (random init)"
    assert [entry["shots"] for entry in report["fewshot_results"]] == ["1", "2", "50%"]
    assert all(len(entry["accuracies"]) == 2 for entry in report["fewshot_results"])
    assert (output_dir / "fewshot.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_fewshot_larger_than_a_class_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = extract_cifar_sample(tmp_path, ("train/cat/000[0-2]*", "test/cat/0000*"))
    code = main(
        [
            "eval",
            "--timm",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--train",
            str(data / "train"),
            "--test",
            str(data / "test"),
            "--fewshot",
            "50",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "lightly-msn eval: error: --fewshot 50: train class 'cat' has 3 images, "
        "fewer than the 50 per class requested"
    )


class _CnnLike(torch.nn.Module):
    """Returns (N, D, 1, 1) features like lightly's benchmark ResNet backbones."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3), keepdim=True)


def test_embed_flattens_pooled_outputs_restores_mode_and_checks_input() -> None:
    images = torch.rand(5, 3, 4, 4)
    dataset = TensorDataset(images, torch.arange(5))
    model = _CnnLike().train()
    features, labels = embed(model, dataset, batch_size=2, progress=False)
    torch.testing.assert_close(features, images.mean(dim=(2, 3)))
    assert labels.tolist() == [0, 1, 2, 3, 4] and labels.dtype == torch.int64
    assert model.training
    with pytest.raises(ValueError, match="empty dataset"):
        embed(model, TensorDataset(torch.empty(0, 3, 4, 4), torch.empty(0)))
    with pytest.raises(ValueError, match="NaN"):
        embed(model, TensorDataset(torch.full((2, 3, 4, 4), float("nan")), labels[:2]))
    with pytest.raises(TypeError, match="yields Image images, not tensors"):
        embed(model, build_dataset("digits", img_size=8), progress=False)
    with pytest.raises(ValueError, match="expected \\(N, D\\) features"):
        embed(torch.nn.Identity(), dataset, progress=False)


def test_eval_cli_loads_an_exported_msn_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm

    from lightly_msn.checkpoint import export_backbone, vit_config

    name = "vit_tiny_patch16_224"
    vit = timm.create_model(
        name,
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=48,
        depth=1,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
    )
    path = export_backbone(vit.state_dict(), vit_config(vit, name), tmp_path / "b.st")
    path = path.rename(tmp_path / "backbone.safetensors")
    code = main(
        [
            "eval",
            "--checkpoint",
            str(path),
            "--train",
            "digits",
            "--test",
            "digits",
            "--knn",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["img_size"] == 16  # taken from the backbone's patch embedding
    assert report["feature_dim"] == 48
    assert report["num_train"] + report["num_test"] == 1797
    assert "knn" in capsys.readouterr().out


def test_eval_cli_random_init_baseline_is_the_same_in_every_run() -> None:
    import argparse

    import torch

    from lightly_msn.eval.cli import _load_model

    args = argparse.Namespace(
        checkpoint=None, timm="vit_tiny_patch16_224", img_size=32, timm_weights=None
    )
    states = []
    for _ in range(2):
        torch.seed()  # as a fresh process: torch seeds its generator at random
        model, _ = _load_model(args)
        states.append(model.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_eval_cli_timm_weights_file_is_loaded(tmp_path: Path, suffix: str) -> None:
    import argparse

    import timm
    from safetensors.torch import save_file

    from lightly_msn.eval.cli import _load_model

    torch.manual_seed(1)  # weights unlike the seed-0 random-init baseline
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    args = argparse.Namespace(
        checkpoint=None,
        timm="vit_tiny_patch16_224",
        img_size=32,
        timm_weights=str(path),
    )
    model, description = _load_model(args)
    assert description == "timm:vit_tiny_patch16_224"
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
