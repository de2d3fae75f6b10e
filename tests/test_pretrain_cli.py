"""``lightly-msn pretrain`` on LightningCLI, its configs, and lightly's Lightning."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from safetensors.torch import load_file

from lightly_msn.cli import main
from lightly_msn.data import MSNDataModule
from lightly_msn.official_config import OfficialConfigError, convert_official_config
from lightly_msn.train import MSNLightningModule

REPO = Path(__file__).resolve().parents[1]
LINKED = {"img_size", "num_random_views"}  # set from data.img_size, data.random_views


def print_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", *args, "--print_config"])
    assert exit_info.value.code == 0
    config: dict[str, Any] = yaml.safe_load(capsys.readouterr().out)
    return config


def test_the_package_depends_on_pytorch_lightning_not_lightning() -> None:
    names = {
        Requirement(line).name.lower().replace("_", "-")
        for line in importlib.metadata.requires("lightly-msn") or []
    }
    assert "pytorch-lightning" in names
    assert "lightning" not in names


def test_a_lightly_style_pl_trainer_trains_our_module() -> None:
    """lightly's examples: ``import pytorch_lightning as pl``, ``pl.Trainer().fit``."""
    import pytorch_lightning as pl
    import torchvision

    from lightly_msn import MSNTransform

    transform = MSNTransform(random_size=16, focal_size=8, focal_views=2)
    dataset = torchvision.datasets.FakeData(
        size=8, image_size=(3, 16, 16), transform=transform
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True)
    model = MSNLightningModule(
        vit="vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        vit_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2},
        hidden_dim=16,
        output_dim=8,
        num_prototypes=8,
    )
    assert isinstance(model, pl.LightningModule)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    before = model.model.prototypes.weight.detach().clone()
    trainer.fit(model=model, train_dataloaders=loader)
    assert trainer.global_step == 2
    assert not torch.equal(model.model.prototypes.weight.detach(), before)


def test_print_config_shows_every_hyperparameter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = print_config(capsys)
    module_arguments = set(inspect.signature(MSNLightningModule).parameters) - LINKED
    data_arguments = set(inspect.signature(MSNDataModule).parameters)
    assert set(config["model"]) == module_arguments
    assert set(config["data"]) == data_arguments
    assert {"max_epochs", "precision", "devices"} <= set(config["trainer"])
    assert {"output_dir", "resume", "overwrite", "seed_everything"} <= set(config)
    # the command line's defaults are today's small-image defaults
    assert config["model"]["vit"] == "vit_tiny_patch16_224"
    assert (config["model"]["patch_size"], config["data"]["img_size"]) == (4, 32)


def test_help_describes_every_option_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in inspect.signature(MSNLightningModule).parameters.keys() - LINKED:
        assert f"--model.{name} " in text, name
    assert "Peak learning rate" in text and "default: 0.001" in text
    assert "--data.on_bad_image" in text and "default: fail" in text


@pytest.mark.parametrize("name", ["small_images", "msn_vits16_imagenet"])
def test_shipped_configs_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO / "configs" / f"{name}.yaml"
    config = print_config(capsys, "--config", str(path))
    written = yaml.safe_load(path.read_text())
    for section in ("model", "data", "trainer"):
        for key, value in written[section].items():
            printed = config[section][key]
            assert printed == (list(value) if isinstance(value, tuple) else value)


def test_the_paper_config_is_the_papers_recipe(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = print_config(
        capsys, "--config", str(REPO / "configs" / "msn_vits16_imagenet.yaml")
    )
    model, data = config["model"], config["data"]
    assert (model["vit"], model["patch_size"], model["mask_ratio"]) == (
        "vit_small_patch16_224",
        16,
        0.15,
    )
    assert (model["lr"], model["start_lr"], model["warmup_epochs"]) == (1e-3, 2e-4, 15)
    assert (model["weight_decay"], model["final_weight_decay"]) == (0.04, 0.4)
    assert (data["img_size"], data["focal_size"], data["focal_views"]) == (224, 96, 10)
    assert (data["batch_size"], data["cj_strength"]) == (64, 0.5)
    assert config["trainer"]["max_epochs"] == 800


TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--data.img_size", "16", "--data.focal_size", "8", "--data.focal_views", "2",
    "--data.batch_size", "8", "--data.num_workers", "0",
    "--model.hidden_dim", "16", "--model.output_dim", "8",
    "--model.num_prototypes", "8",
    "--model.vit_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
]  # fmt: skip


def test_a_config_run_reproduces_the_command_line_run(tmp_path: Path) -> None:
    """The shipped small-image config + overrides == the same options as flags."""
    config = yaml.safe_load((REPO / "configs" / "small_images.yaml").read_text())
    flags = [
        f"--{section}.{key}={value if isinstance(value, str) else json.dumps(value)}"
        for section in ("model", "data", "trainer")
        for key, value in config[section].items()
    ]
    from_config = tmp_path / "from_config"
    from_flags = tmp_path / "from_flags"
    config_path = REPO / "configs" / "small_images.yaml"
    # the config's output_dir is runs/msn: give each run its own
    code_a = main(
        [
            "pretrain",
            "--config",
            str(config_path),
            *TINY,
            "--output_dir",
            str(from_config),
        ]
    )
    code_b = main(["pretrain", *flags, *TINY, "--output_dir", str(from_flags)])
    assert code_a == code_b == 0
    first = load_file(str(from_config / "backbone.safetensors"))
    second = load_file(str(from_flags / "backbone.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert (
        yaml.safe_load((from_config / "config.yaml").read_text())["model"]
        == (yaml.safe_load((from_flags / "config.yaml").read_text())["model"])
    )


OFFICIAL: dict[str, Any] = {
    # the keys and values of the official configs/pretrain/msn_vits16.yaml
    "criterion": {
        "ent_weight": 0.0,
        "final_sharpen": 0.25,
        "me_max": True,
        "memax_weight": 1.0,
        "num_proto": 1024,
        "start_sharpen": 0.25,
        "temperature": 0.1,
        "batch_size": 64,
        "use_ent": True,
        "use_sinkhorn": True,
    },
    "data": {
        "color_jitter_strength": 0.5,
        "pin_mem": True,
        "num_workers": 10,
        "image_folder": "imagenet_full_size/061417/",
        "label_smoothing": 0.0,
        "patch_drop": 0.15,
        "rand_size": 224,
        "focal_size": 96,
        "rand_views": 1,
        "focal_views": 10,
        "root_path": "/datasets01/",
    },
    "logging": {"folder": "/checkpoint/msn_os_logs/", "write_tag": "msn-experiment-1"},
    "meta": {
        "bottleneck": 1,
        "copy_data": False,
        "drop_path_rate": 0.0,
        "hidden_dim": 2048,
        "load_checkpoint": False,
        "model_name": "deit_small",
        "output_dim": 256,
        "read_checkpoint": None,
        "use_bn": True,
        "use_fp16": False,
        "use_pred_head": False,
    },
    "optimization": {
        "clip_grad": 3.0,
        "epochs": 800,
        "final_lr": 1.0e-06,
        "final_weight_decay": 0.4,
        "lr": 0.001,
        "start_lr": 0.0002,
        "warmup": 15,
        "weight_decay": 0.04,
    },
}


def test_an_official_config_converts_to_the_shipped_paper_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    official = tmp_path / "msn_vits16.yaml"
    official.write_text(yaml.safe_dump(OFFICIAL))
    converted = tmp_path / "ours.yaml"
    assert main(["convert-config", str(official), "-o", str(converted)]) == 0
    assert capsys.readouterr().out == f"written to {converted}\n"
    text = converted.read_text()
    assert "# note: data.pin_mem not translated" in text
    ours = print_config(capsys, "--config", str(converted))
    shipped = print_config(
        capsys, "--config", str(REPO / "configs" / "msn_vits16_imagenet.yaml")
    )
    assert ours["model"] == shipped["model"]
    for key in ("img_size", "focal_size", "random_views", "focal_views", "batch_size"):
        assert ours["data"][key] == shipped["data"][key], key
    assert ours["data"]["cj_strength"] == 0.5
    assert ours["data"]["dataset"] == "/datasets01/imagenet_full_size/061417"
    assert ours["output_dir"] == "/checkpoint/msn_os_logs/msn-experiment-1"
    assert ours["trainer"]["max_epochs"] == 800


def test_official_settings_we_do_not_implement_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_head = {**OFFICIAL, "meta": {**OFFICIAL["meta"], "use_pred_head": True}}
    with pytest.raises(OfficialConfigError, match="meta.use_pred_head"):
        convert_official_config(with_head)
    other_model = {**OFFICIAL, "meta": {**OFFICIAL["meta"], "model_name": "vitc_4gf"}}
    with pytest.raises(OfficialConfigError, match="'vitc_4gf'"):
        convert_official_config(other_model)
    no_sinkhorn = {
        **OFFICIAL,
        "criterion": {**OFFICIAL["criterion"], "use_sinkhorn": False, "me_max": False},
    }
    config, _ = convert_official_config(no_sinkhorn)
    assert config["model"]["sinkhorn_iterations"] == 0
    assert config["model"]["me_max_weight"] == 0.0
    patch4 = {**OFFICIAL, "meta": {**OFFICIAL["meta"], "model_name": "deit_base_p4"}}
    config, _ = convert_official_config(patch4)
    assert (config["model"]["vit"], config["model"]["patch_size"]) == (
        "vit_base_patch16_224",
        4,
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("meta: {model_name: deit_small}\n")
    assert main(["convert-config", str(broken)]) == 2
    assert "sections" in capsys.readouterr().err


def test_the_defaults_are_the_shipped_small_image_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lightly_msn.pretrain_cli import SMALL_DATA_RECIPE

    defaults = print_config(capsys)
    shipped = yaml.safe_load((REPO / "configs" / "small_images.yaml").read_text())
    for section in ("model", "data"):
        for key, value in shipped[section].items():
            if defaults[section][key] is not None:  # None: chosen by the image size
                assert defaults[section][key] == value, (section, key)
    for key, value in SMALL_DATA_RECIPE.items():
        assert shipped["model"][key] == value, key


@pytest.mark.parametrize("img_size, warned", [(32, False), (112, True)])
def test_small_image_defaults_on_large_images_are_pointed_out(
    img_size: int, warned: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lightly_msn.pretrain_cli import PretrainCLI

    arguments = ["--data.img_size", str(img_size), "--output_dir", str(tmp_path)]
    with caplog.at_level("WARNING"):
        PretrainCLI(arguments)
    assert ("configs/msn_vits16_imagenet.yaml" in caplog.text) is warned
