"""Nothing lost, nothing silently wrong: every known fault gets a clear error.

Each test feeds the package an input that once produced a wrong number, a crash deep
inside a dependency or an unsafe hint, and checks the error that replaces it: its
type or exit code and that its message names what is wrong and where.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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
