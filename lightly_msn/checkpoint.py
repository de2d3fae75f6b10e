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
import pickle
import re
import warnings
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
CHECKPOINT_EXPECTED = "a Lightning checkpoint written by lightly-msn pretrain"
EXPORT_EXPECTED = (
    f"a backbone exported by lightly-msn (safetensors with '{METADATA_KEY}' metadata)"
)


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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a Lightning checkpoint written by ``lightly-msn pretrain``, safely.

    Only tensors and plain Python containers are unpickled
    (``torch.load(weights_only=True)``); a file that holds other objects is refused,
    never handed to an unpickler that could run its code.

    Args:
        path:
            The ``.ckpt`` file.

    Returns:
        The checkpoint: ``state_dict``, the ``lightly_msn`` ViT config, optimizer and
        loop states.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: One line naming the file, what was expected and what was found,
            if it is not such a checkpoint.
    """
    path = _existing_file(path)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        found = describe_unloadable(path, error)
        raise _unexpected(path, CHECKPOINT_EXPECTED, found) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise _unexpected(path, CHECKPOINT_EXPECTED, _describe_object(checkpoint))
    if METADATA_KEY not in checkpoint:
        found = (
            f"a Lightning checkpoint without the '{METADATA_KEY}' entry (written by "
            "another program)"
        )
        raise _unexpected(path, CHECKPOINT_EXPECTED, found)
    return checkpoint


def describe_unloadable(path: str | Path, error: BaseException) -> str:
    """What a weights file that failed to load holds, in a few words.

    Never repeats the loader's own message: torch's refusal of a pickle that holds
    Python objects advises loading it unsafely.
    """
    if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in str(error):
        match = re.search(r"GLOBAL ([\w.]+)", str(error))
        name = match.group(1) if match else "unknown"
        return (
            f"a pickle holding Python objects besides tensors ({name}); not loaded: "
            "unpickling it could run code"
        )
    if isinstance(error, RuntimeError) and "state_dict" in str(error):
        return f"weights that do not fit the model ({_first_detail(error)})"
    return describe_contents(path)


def describe_contents(path: str | Path) -> str:
    """The kind of file ``path`` is, from its first bytes (e.g. ``an empty file``)."""
    with open(path, "rb") as file:
        head = file.read(64)
    if not head:
        return "an empty file"
    header_length = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and header_length < Path(path).stat().st_size:
        return "a safetensors file (give a lightly-msn export the .safetensors suffix)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (
            "a Python pickle that is not a torch checkpoint (not loaded: unpickling "
            "it could run code)"
        )
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that torch cannot read as a checkpoint"
    text = _as_text(head)
    if text is not None:
        first_line = text.strip().splitlines()[0] if text.strip() else text
        return f"a text file starting with {first_line[:40]!r}"
    return "binary data that is neither a torch checkpoint nor a safetensors file"


def load_backbone_vit(path: str | Path) -> VisionTransformer:
    """Loads the target encoder's ViT from an export or a training checkpoint.

    Args:
        path:
            ``backbone.safetensors`` written by :func:`export_backbone`, or a
            Lightning checkpoint (``.ckpt``) written by ``lightly-msn pretrain``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not an MSN export or checkpoint (one line naming
            the file, what was expected and what was found).
    """
    path = _existing_file(path)
    if path.suffix == ".safetensors":
        state_dict, config = _read_safetensors(path)
    else:
        checkpoint = read_checkpoint(path)
        config = checkpoint[METADATA_KEY]
        state_dict = {
            key[len(BACKBONE_PREFIX) :]: value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith(BACKBONE_PREFIX)
        }
    try:
        vit = create_vit_from_config(config)
        vit.load_state_dict(state_dict, strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"checkpoint {path}: its weights do not fit the ViT its '{METADATA_KEY}' "
            f"entry describes ({_first_detail(error)})"
        ) from None
    return vit


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            keys = list(file.keys())
            state_dict = (
                {key: file.get_tensor(key) for key in keys}
                if METADATA_KEY in metadata
                else {}
            )
    except Exception:  # safetensors raises its own SafetensorError on a bad header
        raise _unexpected(path, EXPORT_EXPECTED, describe_contents(path)) from None
    if METADATA_KEY not in metadata:
        example = f", e.g. {keys[0]!r}" if keys else ""
        found = (
            f"a safetensors file without '{METADATA_KEY}' metadata ({len(keys)} "
            f"tensors{example}; not exported by lightly_msn, so load it with "
            "timm.create_model or --timm NAME --timm-weights FILE)"
        )
        raise _unexpected(path, EXPORT_EXPECTED, found)
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        found = f"a safetensors file whose '{METADATA_KEY}' metadata is not JSON"
        raise _unexpected(path, EXPORT_EXPECTED, found) from None
    return state_dict, config


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: expected a file, found a folder")
    return path


def _unexpected(path: Path, expected: str, found: str) -> ValueError:
    return ValueError(f"checkpoint {path}: expected {expected}, found {found}")


def _describe_object(value: object) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(key) for key in list(value)[:3])
        if any(isinstance(item, Tensor) for item in value.values()):
            return (
                f"a dict of weights without 'state_dict' ({len(value)} entries, e.g. "
                f"{keys}), such as a plain model state dict"
            )
        return f"a dict without 'state_dict' (keys {keys})"
    if isinstance(value, Tensor):
        return "a single tensor"
    return f"a pickled {type(value).__name__}"


def _as_text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 text, or ``None`` if it is not printable text."""
    for cut in range(4):  # the read may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(char.isprintable() or char in "\t\n\r" for char in text):
            return text
        return None
    return None


def _first_detail(error: BaseException) -> str:
    """The most specific line of a (multi-line) error message, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = (
        lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
    )
    return detail if len(detail) <= 200 else detail[:197] + "..."
