import re
from pathlib import Path

import pytest

from lightly_msn import demo as demo_module
from lightly_msn.cli import main

# the demo's code path with a very small model and one short epoch
TINY_DEMO = dict(
    demo_module.DEMO_SETTINGS,
    epochs=1,
    batch_size=256,
    focal_views=1,
    hidden_dim=32,
    output_dim=16,
    num_prototypes=16,
    vit_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
)


def test_demo_command_prints_both_knn_accuracies(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(demo_module, "DEMO_SETTINGS", TINY_DEMO)
    code = main(["demo", "--output-dir", str(tmp_path), "--epochs", "1"])
    assert code == 0
    out = capsys.readouterr().out
    random_line = re.search(r"random initialisation:\s+([\d.]+) %", out)
    msn_line = re.search(r"pretrained with MSN:\s+([\d.]+) %", out)
    assert random_line and msn_line, out
    for match in (random_line, msn_line):
        # 10 balanced classes: far above chance even at random init, below 100
        assert 20.0 < float(match.group(1)) < 100.0
    assert (tmp_path / "backbone.safetensors").is_file()


def test_demo_is_reproducible_whatever_the_global_random_state(tmp_path: Path) -> None:
    import torch

    results = []
    for run in range(2):
        torch.seed()  # as a fresh process: torch seeds its generator at random
        result = demo_module.demo(
            tmp_path / str(run), seed=0, progress=False, **TINY_DEMO
        )
        results.append((result.random_accuracy, result.msn_accuracy))
    assert results[0] == results[1]


def test_demo_settings_are_the_documented_ones() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    settings = demo_module.DEMO_SETTINGS
    vit = settings["vit_kwargs"]
    assert f"dim {vit['embed_dim']}, depth {vit['depth']}" in text
    assert f"patch {settings['patch_size']} on {settings['img_size']} px" in text
