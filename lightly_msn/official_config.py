"""Translation of the official MSN YAML configs into ``lightly-msn pretrain`` configs.

The official implementation [1] reads one YAML file with the sections ``meta``,
``criterion``, ``data``, ``optimization`` and ``logging`` (``configs/pretrain/
msn_vits16.yaml``). :func:`convert_official_config` maps every key of those sections
that shapes the run onto the ``model`` (:class:`~lightly_msn.train.MSNLightningModule`),
``data`` (:class:`~lightly_msn.data.MSNDataModule`) and ``trainer`` sections of a
``LightningCLI`` config; ``lightly-msn convert-config`` does it from the command line.

Conventions that differ:

- ``data.rand_views`` counts the anchor random views; the target view comes on top.
  Ours (``data.random_views``) counts the target too, so it is ``rand_views + 1``.
- ``meta.model_name`` names the official DeiT builders (``deit_small``,
  ``deit_base_p4``, ...); they become timm's ViTs of the same size and patch.
- ``criterion.batch_size`` is the batch per GPU: ``data.batch_size``.
- ``criterion.use_sinkhorn`` turns the 3 Sinkhorn iterations on or off;
  ``criterion.me_max: false`` is an ME-MAX weight of 0; ``criterion.ent_weight``
  counts only with ``criterion.use_ent``.

Settings we do not implement (a prediction head, a bottleneck, frozen prototypes, a
BatchNorm-free head) are refused with a clear error rather than silently dropped;
keys that do not change the training (paths to copy data, pinned memory, label
smoothing of the linear evaluation) are reported as notes.

- [1]: https://github.com/facebookresearch/msn
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# official DeiT builders: deit_<size>[_p<patch>]
_MODEL_NAME = re.compile(r"^deit_(tiny|small|base|large|huge)(?:_p(\d+))?$")
_SINKHORN_ITERATIONS = 3
# keys read by the official training script that do not change what is trained
_IGNORED = {
    ("meta", "copy_data"): "copies the data set to local disk first",
    ("meta", "load_checkpoint"): "use --resume",
    ("meta", "read_checkpoint"): "use --resume",
    ("data", "pin_mem"): "memory is pinned whenever CUDA is available",
    ("data", "label_smoothing"): "used by the linear evaluation only",
}


class OfficialConfigError(ValueError):
    """An official config that cannot be translated (and why)."""


def convert_official_config(
    official: Mapping[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """Translates an official MSN pretraining config.

    Args:
        official: The parsed YAML of an official config.

    Returns:
        ``(config, notes)``: a ``lightly-msn pretrain`` config with the sections
        ``trainer``, ``model``, ``data`` and ``output_dir``, and human-readable
        notes on the keys that were not translated.

    Raises:
        OfficialConfigError: For a missing section or key, or a setting this
            package does not implement.
    """
    sections = {"meta", "criterion", "data", "optimization", "logging"}
    missing = sorted(sections - set(official))
    if missing:
        raise OfficialConfigError(
            f"not an official MSN pretraining config: sections {missing} missing "
            f"(expected {sorted(sections)})"
        )
    used: set[tuple[str, str]] = set()

    def get(section: str, key: str, default: Any = ...) -> Any:
        values = official[section]
        if key not in values:
            if default is ...:
                raise OfficialConfigError(f"the official config has no {section}.{key}")
            return default
        used.add((section, key))
        return values[key]

    _refuse_if(get("meta", "use_pred_head", False), "meta.use_pred_head: true")
    _refuse_if(get("meta", "bottleneck", 1) != 1, "meta.bottleneck other than 1")
    _refuse_if(get("meta", "two_layer", False), "meta.two_layer: true")
    _refuse_if(not get("meta", "use_bn", True), "meta.use_bn: false")
    _refuse_if(get("criterion", "freeze_proto", False), "criterion.freeze_proto")

    vit, patch_size = _timm_model(get("meta", "model_name"))
    model: dict[str, Any] = {
        "vit": vit,
        "patch_size": patch_size,
        "mask_ratio": float(get("data", "patch_drop")),
        "hidden_dim": int(get("meta", "hidden_dim")),
        "output_dim": int(get("meta", "output_dim")),
        "num_prototypes": int(get("criterion", "num_proto")),
        "temperature": float(get("criterion", "temperature")),
        "sinkhorn_iterations": _SINKHORN_ITERATIONS
        if get("criterion", "use_sinkhorn")
        else 0,
        "me_max_weight": float(get("criterion", "memax_weight", 1.0))
        if get("criterion", "me_max")
        else 0.0,
        "entropy_weight": float(get("criterion", "ent_weight", 0.0))
        if get("criterion", "use_ent", False)
        else 0.0,
        "sharpen_temperature": float(get("criterion", "start_sharpen")),
        "final_sharpen_temperature": float(get("criterion", "final_sharpen")),
        "lr": float(get("optimization", "lr")),
        "start_lr": float(get("optimization", "start_lr")),
        "final_lr": float(get("optimization", "final_lr")),
        "warmup_epochs": float(get("optimization", "warmup")),
        "weight_decay": float(get("optimization", "weight_decay")),
        "final_weight_decay": float(get("optimization", "final_weight_decay")),
        "clip_grad": float(get("optimization", "clip_grad")),
        # not in the config: fixed in the official src/msn_train.py
        "momentum": 0.996,
        "final_momentum": 1.0,
    }
    drop_path_rate = float(get("meta", "drop_path_rate", 0.0))
    if drop_path_rate:
        model["vit_kwargs"] = {"drop_path_rate": drop_path_rate}
    root = Path(str(get("data", "root_path")))
    converted_data: dict[str, Any] = {
        "dataset": str(root / str(get("data", "image_folder"))),
        "img_size": int(get("data", "rand_size")),
        "focal_size": int(get("data", "focal_size")),
        "random_views": int(get("data", "rand_views")) + 1,
        "focal_views": int(get("data", "focal_views")),
        "cj_strength": float(get("data", "color_jitter_strength")),
        "gaussian_blur": 0.5,
        "normalize": "imagenet",
        "batch_size": int(get("criterion", "batch_size")),
        "num_workers": int(get("data", "num_workers", 1)),
    }
    trainer = {
        "max_epochs": int(get("optimization", "epochs")),
        "precision": "16-mixed" if get("meta", "use_fp16", False) else "32-true",
    }
    folder = Path(str(get("logging", "folder")))
    output_dir = str(folder / str(get("logging", "write_tag", "msn")))

    notes = [
        f"{section}.{key} not translated: {reason}"
        for (section, key), reason in _IGNORED.items()
        if key in official[section]
    ]
    known = used | set(_IGNORED)
    for section in sorted(sections):
        for key in official[section]:
            if (section, key) not in known:
                notes.append(f"{section}.{key} is unknown and was not translated")
    config = {
        "trainer": trainer,
        "model": model,
        "data": converted_data,
        "output_dir": output_dir,
    }
    return config, notes


def convert_official_file(source: str | Path) -> str:
    """The YAML text of the converted config of ``source``, notes as comments."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"no such config file: {source}")
    try:
        official = yaml.safe_load(source.read_text())
    except yaml.YAMLError as error:
        raise OfficialConfigError(f"{source} is not valid YAML: {error}") from None
    if not isinstance(official, Mapping):
        raise OfficialConfigError(f"{source} does not hold a mapping of sections")
    config, notes = convert_official_config(official)
    header = [f"# lightly-msn pretrain config converted from {source}"]
    header += [f"# note: {note}" for note in notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False)


def _timm_model(name: str) -> tuple[str, int]:
    match = _MODEL_NAME.match(str(name))
    if match is None:
        raise OfficialConfigError(
            f"meta.model_name {name!r} has no timm counterpart here; supported are "
            "deit_{tiny,small,base,large,huge} with an optional _pN patch size"
        )
    # timm's ViT of the same width, depth and heads; the patch size is overridden
    size, patch = match.group(1), int(match.group(2) or 16)
    timm_name = "vit_huge_patch14_224" if size == "huge" else f"vit_{size}_patch16_224"
    return timm_name, patch


def _refuse_if(condition: bool, what: str) -> None:
    if condition:
        raise OfficialConfigError(
            f"{what} is not implemented by lightly-msn, so the official config "
            "cannot be reproduced; remove it or set it to its default"
        )
