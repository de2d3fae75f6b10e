"""Tests for lightly_msn.masking."""

from __future__ import annotations

import pytest
import torch
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.utils import random_token_mask as lightly_random_token_mask
from timm.models.vision_transformer import VisionTransformer

from lightly_msn.masking import focal_token_mask, random_token_mask

PATCH = 8
GRID = 4  # 32 px image, 8 px patches: 16 patches + class token


@pytest.fixture(scope="module")
def masked_vit() -> MaskedVisionTransformerTIMM:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=GRID * PATCH, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2
    )
    return MaskedVisionTransformerTIMM(vit=vit).eval()


def _pixels_of(patch_index: int) -> tuple[slice, slice]:
    row, col = divmod(patch_index - 1, GRID)
    return (
        slice(row * PATCH, (row + 1) * PATCH),
        slice(col * PATCH, (col + 1) * PATCH),
    )


@pytest.mark.parametrize(
    ("num_patches", "ratio", "expected_kept_patches"),
    [(64, 0.15, 54), (196, 0.15, 166), (16, 0.5, 8), (10, 0.9, 1), (49, 0.0, 49)],
)
def test_random_token_mask_shapes_and_exact_ratio(
    num_patches: int, ratio: float, expected_kept_patches: int
) -> None:
    torch.manual_seed(0)
    idx_keep, idx_mask = random_token_mask((5, num_patches + 1), mask_ratio=ratio)

    assert idx_keep.shape == (5, 1 + expected_kept_patches)
    assert idx_mask.shape == (5, num_patches - expected_kept_patches)
    assert idx_keep.dtype == idx_mask.dtype == torch.long
    assert (idx_keep[:, 0] == 0).all()  # class token kept, first
    both = torch.cat([idx_keep, idx_mask], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(num_patches + 1).expand(5, -1))


def test_random_token_mask_reaches_every_patch_unlike_lightly_example_usage() -> None:
    torch.manual_seed(0)
    num_patches = 64  # 32 px image with 4 px patches, as in the CIFAR setting
    idx_keep, _ = random_token_mask((400, num_patches + 1), mask_ratio=0.15)
    patches_kept = idx_keep[:, 1:]
    assert patches_kept.shape[1] == 54  # masks 10/64 = 15.6 %
    assert set(patches_kept.unique().tolist()) == set(range(1, num_patches + 1))

    # lightly's MSN example passes the patch count without the class token:
    # the last patch is unreachable and 11/64 = 17 % are masked at "0.15".
    example_keep, _ = lightly_random_token_mask((400, num_patches), mask_ratio=0.15)
    assert example_keep.shape[1] - 1 == 53
    assert num_patches not in example_keep.tolist()


def test_random_token_mask_is_per_sample_and_can_mask_class_token() -> None:
    torch.manual_seed(0)
    idx_keep, _ = random_token_mask((8, 17), mask_ratio=0.5)
    assert len({tuple(row) for row in idx_keep.tolist()}) > 1

    idx_keep, idx_mask = random_token_mask((200, 17), 0.5, mask_class_token=True)
    assert idx_keep.shape == (200, 8) and idx_mask.shape == (200, 9)
    assert (idx_mask == 0).any()


@pytest.mark.parametrize(
    ("sequence_length", "ratio", "mask_class_token"),
    [(17, 1.0, False), (17, 1.0, True), (5, 0.9, False), (5, 0.9, True)],
)
def test_random_token_mask_can_mask_every_token_like_lightly(
    sequence_length: int, ratio: float, mask_class_token: bool
) -> None:
    # 4 or 5 candidate tokens at 0.9 leave 0.4 or 0.5: no token is kept, as in lightly
    torch.manual_seed(0)
    idx_keep, idx_mask = random_token_mask(
        (3, sequence_length), ratio, mask_class_token=mask_class_token
    )
    theirs_keep, theirs_mask = lightly_random_token_mask(
        (3, sequence_length), ratio, mask_class_token=mask_class_token
    )
    assert idx_keep.shape == theirs_keep.shape
    assert idx_mask.shape == theirs_mask.shape
    if mask_class_token:
        assert idx_keep.shape == (3, 0)
    else:
        assert torch.equal(idx_keep, torch.zeros(3, 1, dtype=torch.long))


def test_random_token_mask_errors() -> None:
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\], got 1.5"):
        random_token_mask((2, 17), mask_ratio=1.5)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\], got -0.1"):
        random_token_mask((2, 17), mask_ratio=-0.1)
    with pytest.raises(ValueError, match="must count the class token"):
        random_token_mask((2, 1), mask_ratio=0.5)


def test_focal_token_mask_keeps_one_contiguous_block() -> None:
    torch.manual_seed(0)
    grid_height, grid_width, block_height, block_width = 5, 7, 2, 3
    idx_keep = focal_token_mask(
        (300, 1 + grid_height * grid_width),
        block_size=(block_height, block_width),
        grid_size=(grid_height, grid_width),
    )
    assert idx_keep.shape == (300, 1 + block_height * block_width)
    assert (idx_keep[:, 0] == 0).all()
    corners = set()
    for row in idx_keep[:, 1:].tolist():
        rows, cols = zip(*(divmod(index - 1, grid_width) for index in row), strict=True)
        top, left = min(rows), min(cols)
        expected = {
            (top + r, left + c) for r in range(block_height) for c in range(block_width)
        }
        assert set(zip(rows, cols, strict=True)) == expected
        assert top + block_height <= grid_height and left + block_width <= grid_width
        corners.add((top, left))
    # every placement of the block is drawn: 4 x 5 positions
    assert len(corners) == (grid_height - block_height + 1) * (
        grid_width - block_width + 1
    )


def test_focal_token_mask_square_grid_default_and_errors() -> None:
    idx_keep = focal_token_mask((3, 65), block_size=8)
    assert torch.equal(idx_keep[:, 1:], torch.arange(1, 65).expand(3, -1))
    with pytest.raises(ValueError, match="not a square grid"):
        focal_token_mask((2, 64), block_size=2)
    with pytest.raises(ValueError, match="must be at least 1x1 and fit"):
        focal_token_mask((2, 17), block_size=5)
    with pytest.raises(ValueError, match="grid 3x3 has 9 patches"):
        focal_token_mask((2, 17), block_size=2, grid_size=3)


@pytest.mark.parametrize("mask_kind", ["random", "focal"])
def test_masked_vit_output_depends_only_on_kept_set(
    masked_vit: MaskedVisionTransformerTIMM, mask_kind: str
) -> None:
    torch.manual_seed(1)
    images = torch.randn(4, 3, GRID * PATCH, GRID * PATCH)
    size = (4, masked_vit.sequence_length)
    if mask_kind == "random":
        idx_keep, _ = random_token_mask(size, mask_ratio=0.5)
    else:
        idx_keep = focal_token_mask(size, block_size=2)
    with torch.no_grad():
        reference = masked_vit(images, idx_keep=idx_keep)

        permuted = idx_keep.clone()
        permuted[:, 1:] = idx_keep[:, 1:].flip(dims=[1])
        torch.testing.assert_close(
            masked_vit(images, idx_keep=permuted), reference, atol=1e-5, rtol=1e-5
        )

        kept = set(idx_keep[0].tolist())
        masked_patch = next(i for i in range(1, GRID * GRID + 1) if i not in kept)
        kept_patch = idx_keep[0, 1].item()

        changed_masked = images.clone()
        changed_masked[(0, slice(None), *_pixels_of(masked_patch))] += 5.0
        torch.testing.assert_close(
            masked_vit(changed_masked, idx_keep=idx_keep), reference
        )

        changed_kept = images.clone()
        changed_kept[(0, slice(None), *_pixels_of(kept_patch))] += 5.0
        output = masked_vit(changed_kept, idx_keep=idx_keep)
    assert not torch.allclose(output[0], reference[0], atol=1e-3)
    torch.testing.assert_close(output[1:], reference[1:])
