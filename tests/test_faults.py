"""Nothing lost, nothing silently wrong: every known fault gets a clear error.

Each test feeds the package an input that once produced a wrong number, a crash deep
inside a dependency or an unsafe hint, and checks the error that replaces it: its
type or exit code and that its message names what is wrong and where.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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
