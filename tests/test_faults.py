"""Nothing lost, nothing silently wrong: every known fault gets a clear error.

Each test feeds the package an input that once produced a wrong number, a crash deep
inside a dependency or an unsafe hint, and checks the error that replaces it: its
type or exit code and that its message names what is wrong and where.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import traceback
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning import Callback, LightningModule, Trainer

from lightly_msn.cli import main
from lightly_msn.data import build_dataset
from lightly_msn.files import atomic_path, atomic_write_text
from lightly_msn.train import MetricsCSVLogger, pretrain
from tests._train_helpers import TINY_HEAD, TINY_PRETRAIN, RandomImages, tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, counts: dict[str, int], level: int = 128) -> None:
    """Writes ``counts[name]`` distinct 16x16 noise PNGs to ``folder/<name>/``.

    Every file gets its own noise (seeded by its folder, class and index), so no two
    files are equal byte for byte; ``level`` sets the mean brightness.
    """
    for name, count in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            path = folder / name / f"{index}.png"
            seed = zlib.crc32(f"{folder.name}/{name}/{index}/{level}".encode())
            noise = np.random.default_rng(seed).integers(-8, 9, size=(16, 16, 3))
            array = np.clip(level + noise, 0, 255).astype(np.uint8)
            Image.fromarray(array).save(path)


def run_eval(
    arguments: Sequence[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: Sequence[str] = ("--timm", "vit_tiny_patch16_224"),
) -> tuple[int, str, str]:
    """Runs ``lightly-msn eval`` in-process; returns (exit code, stdout, stderr)."""
    argv = [
        "eval",
        *model,
        "--img-size",
        "16",
        "--knn",
        "--batch-size",
        "8",
        "--output-dir",
        str(tmp_path / "out"),
        *arguments,
    ]
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_eval_on_train_and_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *arguments: str
) -> tuple[int, str, str]:
    """``run_eval`` on the folders ``tmp_path/train`` and ``tmp_path/test``."""
    folders = ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test")]
    return run_eval([*folders, *arguments], tmp_path, capsys)


def error_line(stderr: str) -> str:
    """The last line of ``stderr``, checked to be the eval command's error line."""
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("lightly-msn eval: error: "), stderr
    return line


# --- evaluation data: splits -------------------------------------------------------


def test_eval_with_a_missing_test_split_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_images(data / "train", {"cat": 3, "dog": 3})
    (data / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    code, out, err = run_eval(
        ["--train", str(data), "--test", str(data)], tmp_path, capsys
    )
    assert code == 2
    line = error_line(err)
    assert str(data) in line and "test/" in line
    assert "broken.png" not in err  # found before any image is read
    assert "top1" not in out


def test_build_dataset_does_not_train_on_the_test_split(tmp_path: Path) -> None:
    write_images(tmp_path / "test", {"cat": 2})
    with pytest.raises(ValueError, match="no train/") as error_info:
        build_dataset(str(tmp_path), "train")
    assert str(tmp_path) in str(error_info.value)
    assert len(build_dataset(str(tmp_path), "test")) == 2


# --- evaluation data: train images in the test set ---------------------------------


def test_eval_on_the_same_folder_is_an_error_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_images(data, {"cat": 3, "dog": 3})
    arguments = ["--train", str(data), "--test", str(data)]
    broken = data / "cat" / "broken.png"
    broken.write_bytes(b"not a png")
    code, out, err = run_eval(arguments, tmp_path, capsys)
    assert code == 2
    line = error_line(err)
    assert "same folder" in line and str(data) in line and "--allow-overlap" in line
    assert "broken.png" not in err  # found before any image is read
    assert "top1" not in out
    broken.unlink()

    code, out, _ = run_eval([*arguments, "--allow-overlap"], tmp_path, capsys)
    assert code == 0 and "top1" in out
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["allow_overlap"] is True


def test_eval_with_a_copy_of_a_train_image_in_the_test_set_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "train", {"cat": 3, "dog": 3}, level=60)
    write_images(tmp_path / "test", {"cat": 2, "dog": 2}, level=200)
    copy = tmp_path / "test" / "dog" / "renamed.png"
    shutil.copy(tmp_path / "train" / "cat" / "1.png", copy)
    code, out, err = run_eval_on_train_and_test(tmp_path, capsys)
    assert code == 2
    line = error_line(err)
    assert "1 of 5 test images" in line and str(copy) in line
    assert str(tmp_path / "train" / "cat" / "1.png") in line
    assert "identical content" in line and "top1" not in out


def test_eval_with_a_link_to_a_train_image_in_the_test_set_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "train", {"cat": 2, "dog": 2}, level=60)
    write_images(tmp_path / "test", {"cat": 2}, level=200)
    link = tmp_path / "test" / "cat" / "link.png"
    os.symlink(tmp_path / "train" / "dog" / "0.png", link)
    code, _, err = run_eval_on_train_and_test(tmp_path, capsys)
    assert code == 2
    line = error_line(err)
    assert str(link) in line and "the same file as" in line


# --- evaluation data: class names ---------------------------------------------------


def test_eval_matches_test_labels_to_train_labels_by_class_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # train classes ant (dark), bee (mid), cow (bright); the test set has only bee
    # and cow, which sorted-index matching would label as ant and bee
    for name, level in [("ant", 20), ("bee", 128), ("cow", 235)]:
        write_images(tmp_path / "train", {name: 4}, level=level)
    for name, level in [("bee", 128), ("cow", 235)]:
        write_images(tmp_path / "test", {name: 3}, level=level)
    code, _, err = run_eval_on_train_and_test(tmp_path, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    top1 = {
        row["setting"]: row["mean"]
        for row in report["results"]
        if row["metric"] == "top1"
    }
    # k=10: most of the 12 train images vote, but the nearest (same brightness)
    # dominate the exp(similarity / 0.07) weights
    assert top1["k=10"] == 100.0  # sorted-index matching: 0.0
    assert report["classes"] == ["ant", "bee", "cow"]


def test_eval_with_a_test_class_unknown_to_the_train_set_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "train", {"cat": 2, "dog": 2}, level=60)
    write_images(tmp_path / "test", {"bird": 1, "cat": 1, "emu": 1}, level=200)
    code, _, err = run_eval_on_train_and_test(tmp_path, capsys)
    assert code == 2
    line = error_line(err)
    assert "'bird', 'emu'" in line and str(tmp_path / "test") in line


# --- checkpoints -------------------------------------------------------------------


class _NotWeights:
    """An object that only a full (code-running) unpickler would rebuild."""


def _write_bad_checkpoint(path: Path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "text":
        path.write_text("model: vit_small\nepochs: 100\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain state dict":
        torch.save({"weight": torch.zeros(2)}, path)
    elif kind == "python object":
        torch.save(_NotWeights(), path)
    elif kind == "foreign safetensors":
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2)}, str(path))
    elif kind == "foreign lightning":
        torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, path)


BAD_CHECKPOINTS = [
    ("random bytes", ".ckpt", "binary data"),
    ("text", ".ckpt", "a text file starting with 'model: vit_small"),
    ("empty", ".ckpt", "an empty file"),
    ("plain state dict", ".ckpt", "a dict of weights without 'state_dict'"),
    ("python object", ".ckpt", "_NotWeights); not loaded"),
    ("foreign lightning", ".ckpt", "without the 'lightly_msn' entry"),
    ("foreign safetensors", ".safetensors", "without 'lightly_msn' metadata"),
    ("random bytes", ".safetensors", "binary data"),
    ("text", ".safetensors", "a text file"),
    ("foreign safetensors", ".ckpt", "a safetensors file"),
]


@pytest.mark.parametrize(("kind", "suffix", "found"), BAD_CHECKPOINTS)
def test_a_bad_checkpoint_gives_one_line_naming_file_expected_and_found(
    tmp_path: Path, kind: str, suffix: str, found: str
) -> None:
    from lightly_msn.checkpoint import load_backbone_vit

    path = tmp_path / f"model{suffix}"
    _write_bad_checkpoint(path, kind)
    with pytest.raises(ValueError) as error_info:
        load_backbone_vit(path)
    message = str(error_info.value)
    assert "\n" not in message
    assert str(path) in message and "expected" in message and found in message
    # not even in the traceback: torch's refusal advises loading unsafely
    printed = "".join(traceback.format_exception(error_info.value))
    assert "weights_only" not in printed and "trust" not in printed


def test_read_checkpoint_returns_the_checkpoint_or_names_the_problem(
    tmp_path: Path,
) -> None:
    from lightly_msn.checkpoint import METADATA_KEY, read_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, METADATA_KEY: {"x": 1}}, path)
    assert read_checkpoint(path)[METADATA_KEY] == {"x": 1}
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_checkpoint(tmp_path / "missing.ckpt")
    _write_bad_checkpoint(path, "python object")
    with pytest.raises(ValueError, match="not loaded: unpickling it could run code"):
        read_checkpoint(path)


def test_console_script_reports_a_corrupt_checkpoint_in_one_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "model.ckpt"
    _write_bad_checkpoint(path, "random bytes")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightly_msn",
            "eval",
            "--checkpoint",
            str(path),
            "--train",
            "digits",
            "--test",
            "digits",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"lightly-msn eval: error: checkpoint {path}: expected a Lightning checkpoint "
        "written by lightly-msn pretrain, found binary data that is neither a torch "
        "checkpoint nor a safetensors file"
    ]


def test_corrupt_timm_weights_give_one_line_without_unsafe_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "weights.pth"
    _write_bad_checkpoint(weights, "random bytes")
    data = tmp_path / "data"
    write_images(data / "train", {"cat": 2})
    write_images(data / "test", {"cat": 2}, level=30)
    code, _, err = run_eval(
        ["--train", str(data), "--test", str(data)],
        tmp_path,
        capsys,
        model=("--timm", "vit_tiny_patch16_224", "--timm-weights", str(weights)),
    )
    assert code == 2
    line = error_line(err)
    assert str(weights) in line and "binary data" in line
    assert "weights_only" not in err


# --- command line arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--fewshot", "abc"], "--fewshot"),
        (["--fewshot", "0"], "--fewshot"),
        (["--fewshot", "1,150%"], "--fewshot"),
        (["--seeds", "0"], "--seeds"),
        (["--batch-size", "0"], "--batch-size"),
        (["--img-size", "0"], "--img-size"),
        (["--img-size", "big"], "--img-size"),
        (["--output-dir", "{file}"], "--output-dir"),
        (["--output-dir", "{file}/sub"], "--output-dir"),
        (["--train", "{missing}"], "--train"),
        (["--test", "{missing}"], "--test"),
        (["--checkpoint", "{missing}"], "--checkpoint"),
        (["--timm-weights", "{missing}"], "--timm-weights"),
        (["--device", "gpu0"], "--device"),
        (["--timm", "no_such_model_name"], "no_such_model_name"),
    ],
)
def test_eval_arguments_are_checked_before_any_data_or_model_is_read(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    named: str,
) -> None:
    # every later step would fail too, with another message: the checkpoint is
    # corrupt and an image file is broken
    data = tmp_path / "data"
    write_images(data / "train", {"cat": 2})
    write_images(data / "test", {"cat": 2}, level=30)
    (data / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    checkpoint = tmp_path / "corrupt.ckpt"
    checkpoint.write_bytes(b"\x00" * 64)
    file = tmp_path / "a-file"
    file.write_text("")
    values = {"file": str(file), "missing": str(tmp_path / "missing")}
    arguments = [argument.format(**values) for argument in arguments]
    model = ["--checkpoint", str(checkpoint)]
    if "--timm" in arguments or "--timm-weights" in arguments:
        model = [] if "--timm" in arguments else ["--timm", "vit_tiny_patch16_224"]
    defaults = {"--train": str(data), "--test": str(data)}
    for option, value in defaults.items():
        if option not in arguments:
            arguments += [option, value]
    code, out, err = run_eval(arguments, tmp_path, capsys, model=model)
    assert code == 2
    line = error_line(err)
    assert named in line
    assert "broken.png" not in err and "corrupt.ckpt" not in err
    assert out == ""


def test_errors_after_the_arguments_are_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "train", {"cat": 3, "dog": 3}, level=60)
    write_images(tmp_path / "test", {"cat": 1}, level=200)
    code, _, err = run_eval_on_train_and_test(tmp_path, capsys, "--fewshot", "5")
    assert code == 2
    assert "fewer than the 5 per class" in error_line(err)


REQUIRED_EVAL_OPTIONS = ("--train TRAIN", "--test TEST")


def test_every_eval_option_has_a_description_and_shows_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    entries: list[str] = []
    for line in options.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries:
            entries[-1] += " " + line.strip()
    assert len(entries) == 15
    for entry in entries:
        if entry.startswith("  -h, --help"):
            continue
        match = re.fullmatch(
            r"((?:-{1,2}[\w-]+(?: [A-Z_]+)?(?:, )?)+)\s+(.*)", entry.strip()
        )
        assert match, entry
        flags, description = match.groups()
        assert description.strip(), f"{flags} has no description"
        shown = "(required)" if flags in REQUIRED_EVAL_OPTIONS else "(default: "
        assert shown in description, f"{flags} shows no default"


# --- transforms ----------------------------------------------------------------------


@pytest.mark.parametrize("transform_name", ["MSNTransform", "MSNViewTransform"])
def test_msn_transforms_reject_float_images_outside_0_1(transform_name: str) -> None:
    from lightly_msn import transforms

    transform = getattr(transforms, transform_name)()
    pixels = torch.arange(3 * 40 * 40, dtype=torch.float32).reshape(3, 40, 40) % 256
    with pytest.raises(ValueError, match=r"in \[0, 1\].*found values in \[0, 255\]"):
        transform(pixels)
    transform(pixels / 255)  # accepted: float in [0, 1]
    transform(pixels.to(torch.uint8))  # accepted: uint8
    transform(Image.fromarray(pixels.permute(1, 2, 0).numpy().astype(np.uint8)))


# --- evaluation protocols ------------------------------------------------------------


def test_retrieval_without_any_query_class_in_the_bank_is_a_clear_error() -> None:
    from lightly_msn.eval.retrieval import retrieval_metrics

    queries = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"query classes \[5, 6\].*bank classes"):
        retrieval_metrics(
            queries,
            torch.tensor([5, 5, 6, 6]),
            torch.randn(3, 3),
            torch.tensor([0, 1, 1]),
        )
    with pytest.raises(ValueError, match="one query each"):
        retrieval_metrics(queries, torch.tensor([0, 1, 2, 3]))


# === pretraining ======================================================================
# The pretraining cases: run directories, atomic files, resume, arguments checked
# before the data, images that only fail when decoded, and the kill-and-resume
# round trip.

TINY_CLI = [
    "--data.img_size", "16", "--model.patch_size", "4", "--trainer.max_epochs", "1",
    "--data.batch_size", "4", "--data.num_workers", "0", "--data.focal_views", "1",
    "--model.num_prototypes", "8", "--model.hidden_dim", "16",
    "--model.output_dim", "8", "--trainer.accelerator", "cpu",
    "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
    "--model.vit_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
]  # fmt: skip


def write_noise_images(folder: Path, count: int = 8, size: int = 16) -> Path:
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


# --- pretraining: run directories -----------------------------------------------------


def test_a_second_run_into_the_same_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = write_noise_images(tmp_path / "data" / "a")
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


# --- pretraining: resume --------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    data = write_noise_images(root / "data" / "a")
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
    data = write_noise_images(tmp_path / "data" / "a")
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


# --- pretraining: arguments checked before any data is read ---------------------------


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
        (["--trainer.max_epochs", "0"], "max_epochs must be >= 1"),
        (["--trainer.max_epochs", "-1"], "needs --trainer.max_steps >= 1"),
    ],
)
def test_bad_arguments_fail_before_any_image_is_read(
    arguments: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # an unreadable image would be reported if the data were read first
    data = write_noise_images(tmp_path / "data" / "a")
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


# --- pretraining: images that only fail when they are decoded -------------------------


def truncated_jpeg(path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(path) as image:  # the header is intact: the check passes
        image.verify()


@pytest.mark.parametrize(
    "augment, in_memory",
    [("loader", None), ("device", False)],
    ids=["loader", "device-streamed"],
)
def test_skip_survives_a_truncated_jpeg_and_reports_it(
    augment: str,
    in_memory: bool | None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Decoded while training: replaced by the next image, counted every epoch."""
    data = write_noise_images(tmp_path / "data" / "a", count=7)
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
            augment=augment,
            in_memory=in_memory,
            **TINY_HEAD,
        )
    assert result.module.global_step == 4  # every batch kept its size
    assert "skipped unreadable image file" in caplog.text
    assert "truncated.jpg" in caplog.text
    assert "epoch 0: 1 image(s) could not be decoded" in caplog.text
    assert "epoch 1: 1 image(s) could not be decoded" in caplog.text


def test_skip_drops_a_truncated_jpeg_when_decoding_into_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Decoded once before training: left out and counted, at every run."""
    data = write_noise_images(tmp_path / "data" / "a", count=8)
    truncated_jpeg(data / "truncated.jpg")
    for run in ("first", "cached"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = pretrain(
                data.parent,
                vit=tiny_vit(),
                output_dir=tmp_path / run,
                epochs=1,
                on_bad_image="skip",
                augment="device",
                in_memory=True,
                **{**TINY_PRETRAIN, "batch_size": 4},
            )
        assert len(result.module.trainer.datamodule.train_dataset) == 8
        assert result.module.global_step == 2
        assert "skipped 1 image file(s)" in caplog.text
        assert "truncated.jpg" in caplog.text
    assert (data.parent / ".lightly_msn_decoded.pt").is_file()


@pytest.mark.parametrize(
    "options",
    [
        ["--data.augment", "loader"],
        ["--data.augment", "device"],
        ["--data.augment", "device", "--data.in_memory", "false"],
    ],
    ids=["loader", "device", "device-streamed"],
)
def test_fail_names_a_truncated_jpeg(
    options: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_noise_images(tmp_path / "data" / "a", count=7)
    truncated_jpeg(data / "truncated.jpg")
    assert pretrain_cli(data.parent, tmp_path / "run", *options) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    line = error.strip().splitlines()[-1]  # after the progress bars
    assert line.startswith("lightly-msn pretrain: error: ")
    assert "truncated.jpg" in line


# --- pretraining: crashes -------------------------------------------------------------


def seeded_vit() -> Any:
    torch.manual_seed(0)
    return tiny_vit()


class Killed(Exception):
    pass


class KillAtEpoch(Callback):
    """Simulates a crash at the start of an epoch (after the previous checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed


@pytest.mark.parametrize("augment", ["loader", "device"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(
    augment: str, tmp_path: Path
) -> None:
    kwargs = dict(TINY_PRETRAIN, epochs=2, seed=3, warmup_epochs=1.0, augment=augment)
    full = pretrain(
        RandomImages(), vit=seeded_vit(), output_dir=tmp_path / "a", **kwargs
    )

    with pytest.raises(Killed):
        pretrain(
            RandomImages(),
            vit=seeded_vit(),
            output_dir=tmp_path / "b",
            callbacks=[KillAtEpoch(1)],
            **kwargs,
        )
    checkpoint = tmp_path / "b" / "checkpoints" / "epoch=000.ckpt"
    assert checkpoint.is_file()
    resumed = pretrain(
        RandomImages(),
        vit=seeded_vit(),
        output_dir=tmp_path / "b",
        resume=checkpoint,
        **kwargs,
    )
    expected = full.module.state_dict()
    actual = resumed.module.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:  # weights, EMA target, prototypes, BN statistics
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed.module.global_step == full.module.global_step == 8
    for name in ("epoch=000.ckpt", "epoch=001.ckpt", "last.ckpt"):
        assert (tmp_path / "a" / "checkpoints" / name).is_file()
    assert full.plot is not None and full.plot.stat().st_size > 0
    # the metrics of the resumed run cover both epochs, each step once
    with (tmp_path / "b" / "metrics.csv").open() as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row["loss"]]
    assert steps == list(range(8))


def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    saved: list[str] = []

    def save_then_fill_the_disk(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        saved.append(str(path))
        if len(saved) <= 2:  # epoch 0: epoch=000.ckpt and last.ckpt
            real_save(obj, path, *args, **kwargs)
            return
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        pretrain(
            RandomImages(16),
            vit=tiny_vit(),
            epochs=2,
            output_dir=tmp_path,
            **TINY_PRETRAIN,
        )
    checkpoints = tmp_path / "checkpoints"
    # the torn file was a temporary one beside the target, and it is gone
    assert Path(saved[-1]).parent == checkpoints
    assert Path(saved[-1]).name.endswith(".partial")
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=000.ckpt",
        "last.ckpt",
    ]
    for name in ("epoch=000.ckpt", "last.ckpt"):
        checkpoint = torch.load(checkpoints / name, weights_only=True)
        assert checkpoint["epoch"] == 0
