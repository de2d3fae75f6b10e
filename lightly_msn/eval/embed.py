"""Frozen features of a dataset: one no-grad pass of a backbone in eval mode."""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightly_msn.eval.checks import check_features


@torch.no_grad()
def embed(
    model_or_backbone: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Computes the features of every image of ``dataset``.

    The model runs in eval mode without gradients (its previous mode is restored),
    with bf16 autocast on CUDA. It must map an image batch to features of shape
    (N, D); outputs (N, D, 1, 1) of CNN backbones such as lightly's benchmark ResNets
    are flattened, and of a tuple output the first element is used. For a timm model
    create it with ``num_classes=0`` so that it returns its pooled features.

    Args:
        model_or_backbone:
            Any ``nn.Module`` mapping images to features, e.g.
            ``MSN.backbone_features``' module, ``load_backbone(path)`` or a timm model.
        dataset:
            Yields ``(image tensor, label)`` pairs (give it a ``ToTensor`` transform).
        batch_size:
            Passed to the ``DataLoader``.
        num_workers:
            Passed to the ``DataLoader``.
        device:
            Defaults to CUDA when available, else CPU.
        progress:
            Show a tqdm progress bar.

    Returns:
        ``(features, labels)``: float32 (N, D) and int64 (N,) CPU tensors.
    """
    if isinstance(dataset, Sized) and len(dataset) == 0:
        raise ValueError("cannot embed an empty dataset")
    first_image = dataset[0][0]
    if not isinstance(first_image, Tensor):
        raise TypeError(
            f"the dataset yields {type(first_image).__name__} images, not tensors; "
            "give it a transform such as torchvision.transforms.ToTensor()"
        )
    device = torch.device(
        device
        if device is not None
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    was_training = model_or_backbone.training
    model_or_backbone.eval().to(device)
    features: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for images, targets in tqdm(loader, desc="embedding", disable=not progress):
            with torch.autocast(
                device.type, torch.bfloat16, enabled=device.type == "cuda"
            ):
                output = model_or_backbone(images.to(device, non_blocking=True))
            features.append(_as_feature_matrix(output).float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
    finally:
        model_or_backbone.train(was_training)
    return check_features(torch.cat(features)), torch.cat(labels)


def _as_feature_matrix(output: object) -> Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, not a tensor")
    if output.ndim > 2 and all(size == 1 for size in output.shape[2:]):
        output = output.flatten(start_dim=1)
    if output.ndim != 2:
        raise ValueError(
            f"the model returned shape {tuple(output.shape)}; expected (N, D) features "
            "(for timm models use num_classes=0 so they return pooled features)"
        )
    return output
