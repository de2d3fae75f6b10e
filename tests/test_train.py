import logging
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from packaging.version import Version
from PIL import Image
from pytorch_lightning import Trainer
from torch.utils.data import DataLoader

from lightly_msn.cli import main
from lightly_msn.model import load_backbone
from lightly_msn.train import pretrain
from tests._train_helpers import (
    TINY_PRETRAIN,
    TINY_VIT,
    FixedViews,
    RandomImages,
    quiet_cpu_trainer,
    tiny_module,
    tiny_vit,
)

CIFAR_TARBALL = Path(__file__).resolve().parents[1].parent / (
    "shared/data/cifar10-jpg.tar.gz"
)


def test_export_loads_into_timm_without_missing_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = pretrain(
        RandomImages(16),
        vit=tiny_vit(),
        output_dir=tmp_path,
        epochs=1,
        **TINY_PRETRAIN,
    )
    exported = result.module.model.backbone_state_dict("target")
    overlays = [dict(file=str(result.backbone), custom_load=False)]  # the docs' form
    if Version(timm.__version__) >= Version("1.0.31"):
        # from 1.0.31 a file overlay resets the registry's npz reader by itself
        overlays.append(dict(file=str(result.backbone)))
    for overlay in overlays:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="timm"):
            vit = timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=True,
                pretrained_cfg_overlay=overlay,
                num_classes=0,
                **TINY_VIT,
            )
        assert "Missing keys" not in caplog.text
        assert "Unexpected keys" not in caplog.text
        loaded = vit.state_dict()
        assert loaded.keys() == exported.keys()
        for key, value in exported.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)

    # load_backbone: the same features from the export and the checkpoint
    images = torch.randn(2, 3, 16, 16)
    expected = result.module.model.backbone_features(images)
    for path in (result.backbone, result.checkpoint):
        features = load_backbone(path)(images)
        torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-6)
    post_norm = load_backbone(result.backbone, norm=True)(images)
    torch.testing.assert_close(post_norm, vit.eval()(images), atol=1e-5, rtol=1e-5)


def test_load_backbone_rejects_foreign_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not exported by lightly_msn"):
        load_backbone(foreign)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone(tmp_path / "missing.ckpt")


def extract_cifar_images(root: Path, per_class: int = 8) -> Path:
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {CIFAR_TARBALL}")
    wanted = {"cat", "ship"}
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TARBALL) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[-3] != "train" or parts[-2] not in wanted:
                continue
            if counts.get(parts[-2], 0) >= per_class:
                if all(counts.get(c, 0) >= per_class for c in wanted):
                    break
                continue
            counts[parts[-2]] = counts.get(parts[-2], 0) + 1
            member.name = str(Path(*parts[-2:]))
            archive.extract(member, root, filter="data")
    return root


def test_cli_pretrain_on_real_cifar10_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = extract_cifar_images(tmp_path / "images")
    out = tmp_path / "run"
    code = main(
        [
            "pretrain", "--data.dataset", str(data),
            "--model.vit", "vit_tiny_patch16_224", "--data.img_size", "32",
            "--model.patch_size", "8", "--trainer.max_epochs", "1",
            "--data.batch_size", "8", "--data.focal_views", "2",
            "--data.num_workers", "0", "--model.num_prototypes", "16",
            "--trainer.devices", "1", "--trainer.accelerator", "cpu",
            "--output_dir", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "backbone.safetensors" in printed
    for name in ("backbone.safetensors", "metrics.csv", "training.png", "config.yaml"):
        assert (out / name).is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    features = load_backbone(out / "backbone.safetensors")(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 192)


def write_images(folder: Path, sizes: list[int]) -> None:
    folder.mkdir(parents=True)
    for index, size in enumerate(sizes):
        Image.new("RGB", (size, size), (index * 20, 0, 0)).save(folder / f"{index}.png")


TINY_CLI = [
    "--data.img_size", "16", "--model.patch_size", "4", "--trainer.max_epochs", "1",
    "--data.batch_size", "4", "--data.num_workers", "0", "--data.focal_views", "1",
    "--model.num_prototypes", "8", "--model.hidden_dim", "16",
    "--model.output_dim", "8", "--trainer.devices", "1",
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    "--model.vit_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
]  # fmt: skip


def run_cli(data: Path, tmp_path: Path, *extra: str) -> int:
    return main(
        ["pretrain", "--data.dataset", str(data), *TINY_CLI]
        + ["--output_dir", str(tmp_path / "run"), *extra]
    )


def test_cli_reports_missing_and_empty_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(tmp_path / "nowhere", tmp_path) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli(tmp_path / "empty", tmp_path) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_cli_unreadable_images_fail_or_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_images(data / "a", [16] * 8)
    (data / "a" / "broken.png").write_bytes(b"not an image")
    assert run_cli(data, tmp_path) == 2
    error = capsys.readouterr().err
    assert "broken.png" in error and "lightly-msn pretrain: error:" in error
    # the failed run wrote nothing, so the same output directory can be reused
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    assert run_cli(data, tmp_path, "--data.on_bad_image", "skip") == 0


def test_cli_rejects_images_smaller_than_the_crop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_images(data / "a", [16] * 7 + [8])
    assert run_cli(data, tmp_path) == 2
    message = capsys.readouterr().err
    assert "7.png" in message and "16" in message


def test_cli_rejects_a_missing_resume_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_images(data / "a", [16] * 8)
    assert run_cli(data, tmp_path, "--resume", str(tmp_path / "gone.ckpt")) == 2
    assert "gone.ckpt" in capsys.readouterr().err


def test_pretrain_accepts_a_lightly_dataset(tmp_path: Path) -> None:
    from lightly.data import LightlyDataset

    write_images(tmp_path / "images", [16] * 8)
    dataset = LightlyDataset(str(tmp_path / "images"))
    result = pretrain(
        dataset, vit=tiny_vit(), output_dir=tmp_path / "run", epochs=1,
        **{**TINY_PRETRAIN, "batch_size": 4},
    )  # fmt: skip
    assert result.module.global_step == 2


def test_cpu_bf16_training_uses_explicit_attention_and_restores_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from timm.models.vision_transformer import Attention

    import lightly_msn.train as train_module
    from lightly_msn.train import CPULowPrecision

    module = tiny_module()
    attention = [m for m in module.modules() if isinstance(m, Attention)]
    seen: list[bool] = []
    hook = attention[0].register_forward_pre_hook(
        lambda layer, _: seen.append(bool(layer.fused_attn))
    )
    monkeypatch.setattr(train_module, "cpu_has_native_bfloat16", lambda: False)
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CPULowPrecision()],
    )
    with caplog.at_level(logging.WARNING, logger="lightly_msn.train"):
        trainer.fit(module, DataLoader(FixedViews(size=8), batch_size=8))
    hook.remove()
    assert seen and not any(seen)  # explicit attention while training
    assert all(m.fused_attn for m in attention)  # timm's choice restored
    assert "no native bfloat16 matrix instructions" in caplog.text
    # fp32 keeps timm's fused attention and says nothing
    seen.clear()
    caplog.clear()
    hook = attention[0].register_forward_pre_hook(
        lambda layer, _: seen.append(bool(layer.fused_attn))
    )
    quiet = quiet_cpu_trainer()
    quiet.callbacks.append(CPULowPrecision())
    with caplog.at_level(logging.WARNING, logger="lightly_msn.train"):
        quiet.fit(tiny_module(), DataLoader(FixedViews(size=8), batch_size=8))
    hook.remove()
    assert "bfloat16" not in caplog.text
