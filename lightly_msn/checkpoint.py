"""Export of the pretrained backbone to safetensors, and loading it back.

The exported file holds the target encoder's timm ``VisionTransformer`` state dict
under timm's own key names, so ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=path, custom_load=False), img_size=...,
patch_size=..., num_classes=0)`` loads it with no missing keys (``custom_load=False``
is the default from timm 1.0.31 on; see ``timm_file_overlay``). The file's metadata
records the timm name and the arguments needed to rebuild the ViT
(``load_backbone_vit``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from lightly_msn.files import atomic_path

METADATA_KEY = "lightly_msn"
BACKBONE_PREFIX = "model.target_backbone.vit."


def timm_file_overlay(path: str | Path) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm load its weights from ``path``.

    ``custom_load`` is set explicitly: timm before 1.0.31 keeps the registry's value
    when a file is given, and for the augreg ViTs (``vit_tiny_patch16_224``, ...) that
    is the JAX ``.npz`` reader, which rejects a safetensors or PyTorch file.
    """
    return {"file": str(path), "custom_load": Path(path).suffix == ".npz"}


def vit_config(vit: VisionTransformer, model_name: str) -> dict[str, Any]:
    """The timm name and keyword arguments that rebuild ``vit``'s architecture."""
    patch_size = vit.patch_embed.patch_size
    img_size = vit.patch_embed.img_size
    return {
        "model_name": model_name,
        "kwargs": {
            "img_size": list(img_size) if img_size is not None else None,
            "patch_size": list(patch_size),
            "embed_dim": int(vit.embed_dim),
            "depth": len(vit.blocks),
            "num_heads": int(getattr(vit.blocks[0], "attn").num_heads),  # noqa: B009
            "num_classes": 0,
            "dynamic_img_size": True,
        },
    }


def create_vit_from_config(config: dict[str, Any]) -> VisionTransformer:
    """Creates the ViT described by :func:`vit_config` (random weights)."""
    kwargs: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in config["kwargs"].items()
    }
    vit = timm.create_model(config["model_name"], pretrained=False, **kwargs)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"{config['model_name']!r} is not a timm VisionTransformer.")
    return vit


def export_backbone(
    state_dict: dict[str, Tensor], config: dict[str, Any], path: str | Path
) -> Path:
    """Writes a ViT state dict and its config to a ``.safetensors`` file, atomically.

    The file is written next to ``path`` and renamed into place
    (:func:`lightly_msn.files.atomic_path`), so a crash never leaves a truncated
    backbone behind.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(config)})
    return path


def load_backbone_vit(path: str | Path) -> VisionTransformer:
    """Loads the target encoder's ViT from an export or a training checkpoint.

    Args:
        path:
            ``backbone.safetensors`` written by :func:`export_backbone`, or a
            Lightning checkpoint (``.ckpt``) written by ``lightly-msn pretrain``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not an MSN export or checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_backbone: no such file: {path}")
    if path.suffix == ".safetensors":
        state_dict, config = _read_safetensors(path)
    else:
        state_dict, config = _read_lightning_checkpoint(path)
    vit = create_vit_from_config(config)
    vit.load_state_dict(state_dict, strict=True)
    return vit


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(
                f"load_backbone: {path} has no '{METADATA_KEY}' metadata; it was not "
                "exported by lightly_msn (load it with timm.create_model instead)."
            )
        state_dict = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    return state_dict, json.loads(metadata[METADATA_KEY])


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a Lightning checkpoint safely (tensors and plain containers only).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: One line naming the file, what was expected and what was
            found, for anything that is not a Lightning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        found = type(error).__name__
        raise ValueError(
            f"{path} is not a Lightning checkpoint (.ckpt) written by lightly-msn: "
            f"it could not be read as one ({found})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = (
            f"a {type(checkpoint).__name__}"
            if not isinstance(checkpoint, dict)
            else "a dictionary without 'state_dict'"
        )
        raise ValueError(
            f"{path} is not a Lightning checkpoint (.ckpt): it holds {found}"
        )
    return checkpoint


def _read_lightning_checkpoint(
    path: Path,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    checkpoint = read_checkpoint(path)
    config = checkpoint.get(METADATA_KEY)
    if config is None:
        raise ValueError(
            f"load_backbone: {path} was not written by lightly_msn's pretraining "
            f"(no '{METADATA_KEY}' entry)."
        )
    state_dict = {
        key[len(BACKBONE_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(BACKBONE_PREFIX)
    }
    return state_dict, config
