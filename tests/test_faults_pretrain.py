"""Nothing lost, nothing silently wrong: pretraining runs, checkpoints and resume."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lightly_msn.cli import main
from lightly_msn.files import atomic_path, atomic_write_text
from lightly_msn.train import MetricsCSVLogger, pretrain
from tests._train_helpers import TINY_HEAD, tiny_vit

TINY_CLI = [
    "--data.img_size", "16", "--model.patch_size", "4", "--trainer.max_epochs", "1",
    "--data.batch_size", "4", "--data.num_workers", "0", "--data.focal_views", "1",
    "--model.num_prototypes", "8", "--model.hidden_dim", "16",
    "--model.output_dim", "8", "--trainer.accelerator", "cpu",
    "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
    "--model.vit_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
]  # fmt: skip


def write_images(folder: Path, count: int = 8, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def pretrain_cli(data: Path, output: Path, *extra: str) -> int:
    return main(
        ["pretrain", "--data.dataset", str(data), *TINY_CLI]
        + ["--output_dir", str(output), *extra]
    )


# -- run directories ------------------------------------------------------------


def test_a_second_run_into_the_same_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = write_images(tmp_path / "data" / "a")
    run = tmp_path / "run"
    assert pretrain_cli(data.parent, run) == 0
    first = (run / "backbone.safetensors").read_bytes()
    capsys.readouterr()
    assert pretrain_cli(data.parent, run) == 2
    error = capsys.readouterr().err
    assert f"output directory {run} already holds a run" in error
    assert "--resume last" in error and "--overwrite" in error
    assert (run / "backbone.safetensors").read_bytes() == first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch=000.ckpt",
        "last.ckpt",
    ]
    # --overwrite says what it deletes, then writes a fresh run
    with caplog.at_level(logging.WARNING, logger="lightly_msn.train"):
        assert pretrain_cli(data.parent, run, "--overwrite", "true") == 0
    assert f"deleting {run / 'backbone.safetensors'}" in caplog.text
    printed = capsys.readouterr().out
    assert f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in printed
    assert not list(run.glob("**/*-v1*"))


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as temporary:
        temporary.write_text("half of the new cont")
        raise OSError("disk full")
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("writer", ["metrics", "plot", "export"])
def test_every_writer_renames_a_complete_file_into_place(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between writing and renaming leaves the old file, for every file."""
    from lightly_msn.checkpoint import export_backbone
    from lightly_msn.train import plot_metrics

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n0,1.0\n1,0.5\n")
    targets = {
        "metrics": metrics,
        "plot": tmp_path / "training.png",
        "export": tmp_path / "backbone.safetensors",
    }
    target = targets[writer]
    if writer != "metrics":
        target.write_bytes(b"old")
    before = target.read_bytes()

    def crash(source: Any, destination: Any) -> None:
        assert Path(source).parent == Path(destination).parent  # beside, not /tmp
        assert Path(source).stat().st_size > 0
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed before the rename"):
        if writer == "metrics":
            logger = MetricsCSVLogger(tmp_path)
            logger.log_metrics({"loss": 0.25}, step=2)
            logger.save()
        elif writer == "plot":
            plot_metrics(metrics, target)
        else:
            vit = tiny_vit()
            export_backbone(vit.state_dict(), {"model_name": "x", "kwargs": {}}, target)
    assert target.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.csv", target.name}


# -- resume ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    data = write_images(root / "data" / "a")
    run = root / "run"
    assert pretrain_cli(data.parent, run) == 0
    return data.parent, run


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--data.batch_size", "2"], "batch_size: 4 in the checkpoint, 2 requested"),
        (["--trainer.max_epochs", "2"], "max_epochs: 1 in the checkpoint, 2"),
        (["--model.lr", "0.01"], "lr: 0.001 in the checkpoint, 0.01 requested"),
        (
            ["--model.vit_kwargs", '{"embed_dim": 64, "depth": 1, "num_heads": 2}'],
            "embed_dim: 32 in the checkpoint, 64 requested",
        ),
    ],
)
def test_resuming_with_other_settings_is_refused_and_lists_them(
    change: list[str],
    expected: str,
    finished_run: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, run = finished_run
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert pretrain_cli(data, run, "--resume", "last", *change) == 2
    error = capsys.readouterr().err
    assert "cannot resume" in error and expected in error
    # one line per setting, not a state-dict dump
    assert len(error.strip().splitlines()) <= 4
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


@pytest.mark.parametrize(
    "content, suffix",
    [
        (os.urandom(256), ".ckpt"),
        (b"just some text\n", ".ckpt"),
        (None, ".safetensors"),
    ],
)
def test_a_corrupt_or_foreign_resume_file_gives_one_safe_line(
    content: bytes | None,
    suffix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_images(tmp_path / "data" / "a")
    bad = tmp_path / f"bad{suffix}"
    if content is None:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(bad))
    else:
        bad.write_bytes(content)
    assert pretrain_cli(data.parent, tmp_path / "run", "--resume", str(bad)) == 2
    error = capsys.readouterr().err.strip()
    assert str(bad) in error and "checkpoint" in error
    assert "weights_only" not in error and "Traceback" not in error
    assert len(error.splitlines()) == 1


# -- arguments checked before any data is read ----------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model.patch_size", "0"], "patch_size must be positive"),
        (["--model.patch_size", "5"], "not a multiple of the patch size"),
        (["--data.focal_size", "6"], "focal_size=6 is not a multiple"),
        (["--model.lr", "inf"], 'Parser key "model.lr"'),  # not a YAML float
        (["--model.lr", ".inf"], "lr must be finite"),
        (["--model.lr", "0"], "lr must be > 0"),
        (["--model.num_prototypes", "1"], "num_prototypes must be >= 2"),
        (["--data.batch_size", "1"], "batch_size must be >= 2"),
        (["--model.momentum", "1.5"], "momentum must be in [0, 1]"),
    ],
)
def test_bad_arguments_fail_before_any_image_is_read(
    arguments: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # an unreadable image would be reported if the data were read first
    data = write_images(tmp_path / "data" / "a")
    (data / "broken.png").write_bytes(b"not an image")
    try:
        code = pretrain_cli(data.parent, tmp_path / "run", *arguments)
    except SystemExit as parser_exit:  # the parser's own errors, argparse-style
        code = parser_exit.code  # type: ignore[assignment]
    assert code == 2
    error = capsys.readouterr().err
    assert message in error
    assert "broken.png" not in error
    assert not (tmp_path / "run").exists()


# -- images that only fail when they are decoded ---------------------------------


def truncated_jpeg(path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(path) as image:  # the header is intact: the check passes
        image.verify()


def test_skip_survives_a_truncated_jpeg_and_reports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_images(tmp_path / "data" / "a", count=7)
    truncated_jpeg(data / "truncated.jpg")
    with caplog.at_level(logging.WARNING):
        result = pretrain(
            data.parent,
            vit=tiny_vit(),
            img_size=16,
            patch_size=4,
            focal_views=1,
            batch_size=4,
            epochs=2,
            num_workers=0,
            accelerator="cpu",
            devices=1,
            progress=False,
            output_dir=tmp_path / "run",
            on_bad_image="skip",
            **TINY_HEAD,
        )
    assert result.module.global_step == 4  # every batch kept its size
    assert "skipped unreadable image file" in caplog.text
    assert "truncated.jpg" in caplog.text
    assert "epoch 0: 1 image(s) could not be decoded" in caplog.text
    assert "epoch 1: 1 image(s) could not be decoded" in caplog.text


def test_fail_names_a_truncated_jpeg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_images(tmp_path / "data" / "a", count=7)
    truncated_jpeg(data / "truncated.jpg")
    assert pretrain_cli(data.parent, tmp_path / "run") == 2
    assert "truncated.jpg" in capsys.readouterr().err
