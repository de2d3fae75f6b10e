"""Input checks shared by the evaluation protocols: clear errors, no silent results."""

from __future__ import annotations

import torch
from torch import Tensor


def check_features(features: Tensor, name: str = "features") -> Tensor:
    """Returns ``features`` as a float32 CPU-or-device tensor after checking it.

    Raises ``ValueError`` for a non-2-D or empty tensor, and for rows that hold NaN /
    inf or whose L2 norm overflows float32 (every protocol normalises the rows).
    """
    if not isinstance(features, Tensor):
        features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows); is the dataset empty?")
    # every protocol L2-normalises the rows: a row norm is finite exactly when the
    # row holds no NaN / inf and normalising it does not overflow (one pass, no
    # N x D mask)
    norms = torch.linalg.vector_norm(features, dim=1, dtype=torch.float32)
    if not bool(torch.isfinite(norms).all()):
        bad_rows = (~torch.isfinite(norms)).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN or inf values (or values too large to square in "
            f"float32) in {len(bad_rows)} of {features.shape[0]} rows (first: row "
            f"{int(bad_rows[0])}); the backbone diverged or the input was not "
            "normalised"
        )
    return features.float()


def check_labels(labels: Tensor, num_rows: int, name: str = "labels") -> Tensor:
    """Returns ``labels`` as int64 after checking it has ``num_rows`` class ids."""
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(labels.shape)}")
    if labels.shape[0] != num_rows:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but the features have {num_rows} "
            "rows; they must have the same length"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class ids, got {labels.dtype}")
    if labels.numel() > 0 and int(labels.min()) < 0:
        raise ValueError(f"{name} must be non-negative class ids")
    return labels.long()
