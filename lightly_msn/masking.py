"""Token masks for the MSN anchor views: random patch dropping and focal masking.

MSN masks the anchor views only [0]: random masking drops a random subset of
the patch tokens (the ratio depends on the ViT size, e.g. 0.15 for ViT-S/16),
focal masking keeps one local block of adjacent patches and drops the rest.

Both functions return indices into the token sequence of a ViT whose index 0 is
the class token, ready for
``lightly.models.modules.MaskedVisionTransformerTIMM(vit)(images, idx_keep=...)``.

Pitfall (lightly's ``examples/pytorch/msn.py``): ``size`` must count the class
token, ``(batch_size, num_patches + 1)``, e.g.
``MaskedVisionTransformerTIMM(vit).sequence_length``. Passing ``num_patches``
instead makes the last patch index unreachable and drops one patch too many:
on an 8x8 grid "0.15" then masks 11 of 64 patches (17 %) and the bottom-right
patch is never seen.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Guards the floor in ``num_patches * (1 - mask_ratio)`` against float error,
# e.g. 10 * (1 - 0.9) = 0.9999999999999998 must keep 1 patch, not 0.
_FLOOR_EPSILON = 1e-9


def random_token_mask(
    size: tuple[int, int],
    mask_ratio: float = 0.6,
    mask_class_token: bool = False,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Creates per-sample random token masks with an exact ratio over the patches.

    Same signature and return value as ``lightly.models.utils.random_token_mask``:
    with ``mask_class_token=False`` the class token (index 0) is always kept, at
    position 0 of ``idx_keep``, and ``floor(num_patches * (1 - mask_ratio))`` of
    the ``num_patches = sequence_length - 1`` patch tokens are kept, as in the
    official ``patch_drop`` [0]. Unlike lightly, the count is immune to float
    rounding (``floor`` of 0.9999999 is 1 here) and ``idx_keep`` is sorted
    ascending, which makes no difference to a ViT (positions are embedded before
    tokens are dropped) but gathers memory in order. As in lightly, a ratio of 1
    (or one that leaves less than one token) masks every candidate token.

    Args:
        size:
            ``(batch_size, sequence_length)`` where ``sequence_length`` counts the
            class token: ``num_patches + 1``.
        mask_ratio:
            Fraction of the patch tokens to mask, in [0, 1].
        mask_class_token:
            If False the class token is never masked. If True the class token is
            treated like a patch and the ratio applies to all tokens.
        device:
            Device on which to create the indices.

    Returns:
        ``(idx_keep, idx_mask)`` of shapes ``(batch_size, num_keep)`` and
        ``(batch_size, sequence_length - num_keep)``; each row of the two
        together is a permutation of ``range(sequence_length)``.

    Raises:
        ValueError: For a ratio outside [0, 1], a negative batch size or a
            sequence too short to hold a class token and a patch.
    """
    batch_size, sequence_length = size
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(
            f"random_token_mask: mask_ratio must be in [0, 1], got {mask_ratio}."
        )
    if batch_size < 0:
        raise ValueError(
            f"random_token_mask: batch size must be >= 0, got {batch_size}."
        )
    num_prefix = 0 if mask_class_token else 1
    num_candidates = sequence_length - num_prefix
    if num_candidates < 1:
        raise ValueError(
            f"random_token_mask: sequence_length={sequence_length} leaves no patch "
            "token to mask; it must count the class token (num_patches + 1)."
        )
    num_keep = math.floor(num_candidates * (1.0 - mask_ratio) + _FLOOR_EPSILON)

    noise = torch.rand(batch_size, num_candidates, device=device)
    order = noise.argsort(dim=1) + num_prefix
    idx_keep = order[:, :num_keep].sort(dim=1).values
    idx_mask = order[:, num_keep:].sort(dim=1).values
    if num_prefix:
        class_token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        idx_keep = torch.cat([class_token, idx_keep], dim=1)
    return idx_keep, idx_mask


def focal_token_mask(
    size: tuple[int, int],
    block_size: int | tuple[int, int],
    grid_size: int | tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Creates per-sample focal masks: one random block of adjacent patches is kept.

    This is the focal masking of [0] at the token level. For each sample a
    ``block_height x block_width`` rectangle is placed uniformly at random on the
    patch grid (fully inside it); the class token (index 0) and the patches of the
    rectangle are kept. Patch ``(row, col)`` of a
    ``grid_height x grid_width`` grid has sequence index ``1 + row * grid_width +
    col`` (timm's row-major patch order after the class token).

    Args:
        size:
            ``(batch_size, sequence_length)`` with ``sequence_length =
            grid_height * grid_width + 1`` (the class token counts), as for
            :func:`random_token_mask`.
        block_size:
            Size of the kept block in patches, ``int`` for a square or
            ``(block_height, block_width)``.
        grid_size:
            Patch grid, ``int`` for a square or ``(grid_height, grid_width)``.
            Default: the square grid with ``sequence_length - 1`` patches.
        device:
            Device on which to create the indices.

    Returns:
        ``idx_keep`` of shape ``(batch_size, 1 + block_height * block_width)``,
        the class token first, then the block's patches in ascending order.

    Raises:
        ValueError: If the grid does not match the sequence length or the block
            does not fit in the grid.
    """
    batch_size, sequence_length = size
    if batch_size < 0:
        raise ValueError(
            f"focal_token_mask: batch size must be >= 0, got {batch_size}."
        )
    num_patches = sequence_length - 1
    if grid_size is None:
        side = math.isqrt(max(num_patches, 0))
        if num_patches < 1 or side * side != num_patches:
            raise ValueError(
                f"focal_token_mask: sequence_length={sequence_length} is not a square "
                "grid plus a class token; pass grid_size=(height, width)."
            )
        grid_size = side
    grid_height, grid_width = _pair(grid_size)
    block_height, block_width = _pair(block_size)
    if grid_height * grid_width != num_patches:
        raise ValueError(
            f"focal_token_mask: grid {grid_height}x{grid_width} has "
            f"{grid_height * grid_width} patches but sequence_length={sequence_length} "
            f"holds {num_patches} patches after the class token."
        )
    if not (1 <= block_height <= grid_height and 1 <= block_width <= grid_width):
        raise ValueError(
            f"focal_token_mask: block {block_height}x{block_width} must be at least "
            f"1x1 and fit in the {grid_height}x{grid_width} patch grid."
        )

    top = torch.randint(
        0, grid_height - block_height + 1, (batch_size, 1, 1), device=device
    )
    left = torch.randint(
        0, grid_width - block_width + 1, (batch_size, 1, 1), device=device
    )
    rows = top + torch.arange(block_height, device=device).view(1, -1, 1)
    cols = left + torch.arange(block_width, device=device).view(1, 1, -1)
    block = (1 + rows * grid_width + cols).flatten(start_dim=1)
    class_token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    return torch.cat([class_token, block], dim=1)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)
