"""Tests of the benchmark harness: every method trains, results are tabulated right."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from benchmarks import results
from benchmarks.methods import available_methods, load_method
from benchmarks.methods.base import BenchmarkConfig
from benchmarks.run import load_profile, main, merge_profile, parse_overrides
from lightly_msn.data import TransformedSubset, balanced_indices, build_dataset
from tests._train_helpers import quiet_cpu_trainer

ALL_METHODS = ("msn", "msn_lightly", "pmsn", "dino", "ibot", "simclr", "byol", "mae")


TINY_PROFILE: dict[str, Any] = {
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1},
    "data": {
        "dataset": "digits",
        "img_size": 16,
        "focal_size": 8,
        "focal_views": 2,
        "batch_size": 8,
        "num_workers": 0,
    },
    "vit": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
}


def tiny_config(**sections: Any) -> BenchmarkConfig:
    """The tiny profile with ``sections`` merged in (``data={"focal_views": 3}``)."""
    return BenchmarkConfig.from_profile(merge_profile(TINY_PROFILE, sections))


@pytest.fixture(scope="module")
def digits() -> Any:
    return build_dataset("digits", "train", img_size=16)


def test_every_method_is_registered() -> None:
    assert set(ALL_METHODS) <= set(available_methods())
    assert available_methods()[: len(ALL_METHODS)] == list(ALL_METHODS)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_one_training_step_has_finite_loss_and_trains(name: str, digits: Any) -> None:
    torch.manual_seed(0)
    config = tiny_config()
    method_class = load_method(name)
    method = method_class.from_config(config)
    dataset = TransformedSubset(digits, range(8), method_class.make_transform(config))
    before = {
        key: value.detach().clone()
        for key, value in method.named_parameters()
        if value.requires_grad
    }
    trainer = quiet_cpu_trainer()
    trainer.fit(method, DataLoader(dataset, batch_size=8, drop_last=True))

    loss = trainer.callback_metrics["loss"]
    assert torch.isfinite(loss), f"{name}: loss {loss}"
    changed = [
        key
        for key, value in method.named_parameters()
        if key in before and not torch.equal(value, before[key])
    ]
    assert changed, f"{name}: no parameter changed after one step"
    features = method.backbone_features(torch.randn(3, 3, 16, 16))
    assert features.shape == (3, config.embed_dim)
    assert torch.isfinite(features).all()


def test_msn_prototypes_learn_but_lightly_example_prototypes_do_not(
    digits: Any,
) -> None:
    """lightly's example passes ``prototypes.data``; ours passes them with grad."""
    config = tiny_config()
    prototypes = {}
    for name in ("msn", "msn_lightly"):
        torch.manual_seed(0)
        method_class = load_method(name)
        method = method_class.from_config(config)
        weight = (
            method.model.prototypes.weight
            if name == "msn"
            else method.prototypes.weight
        )
        initial = weight.detach().clone()
        dataset = TransformedSubset(
            digits, range(8), method_class.make_transform(config)
        )
        quiet_cpu_trainer().fit(method, DataLoader(dataset, batch_size=8))
        prototypes[name] = not torch.equal(weight.detach(), initial)
    assert prototypes == {"msn": True, "msn_lightly": False}


@pytest.mark.parametrize(("fraction", "trained"), [(0.5, True), (1.0, False)])
def test_dino_freezes_its_last_layer_for_a_fraction_of_the_budget(
    fraction: float, trained: bool, digits: Any
) -> None:
    """Frozen for the first ``fraction`` of the steps, even in a one-epoch run."""
    torch.manual_seed(0)
    config = tiny_config(methods={"dino": {"freeze_last_layer_fraction": fraction}})
    method = load_method("dino").from_config(config)
    last_layer = [
        p.detach().clone() for p in method.student_head.last_layer.parameters()
    ]
    dataset = TransformedSubset(
        digits, range(8), load_method("dino").make_transform(config)
    )
    trainer = quiet_cpu_trainer(max_steps=4)  # one epoch of four steps
    trainer.fit(method, DataLoader(dataset, batch_size=2, drop_last=True))
    after = list(method.student_head.last_layer.parameters())
    changed = any(not torch.equal(a, b) for a, b in zip(after, last_layer, strict=True))
    assert changed == trained


def test_every_method_starts_from_lightlys_vit_initialisation() -> None:
    """Fixed 2-D sin-cos position embedding for all, ours included."""
    config = tiny_config()
    position_embeddings = {}
    for name in ALL_METHODS:
        method = load_method(name).from_config(config)
        vits = [m for m in method.modules() if isinstance(m, VisionTransformer)]
        position_embeddings[name] = vits[0].pos_embed
    reference = position_embeddings["msn_lightly"]
    for name, pos_embed in position_embeddings.items():
        assert not pos_embed.requires_grad, name
        torch.testing.assert_close(pos_embed, reference, msg=name)
    assert reference[0, 1:].abs().max() > 0.5  # sin-cos values, not trunc-normal
    # and the frozen embedding stays out of our optimizer groups
    msn = load_method("msn").from_config(config)
    grouped = {id(p) for g in msn.model.parameter_groups() for p in g["params"]}
    assert id(msn.model.vit.pos_embed) not in grouped


def test_every_method_starts_from_the_same_weights() -> None:
    """Whatever a method draws before or after its ViT, the ViT's weights agree."""
    config = tiny_config()
    torch.manual_seed(1)
    images = torch.randn(3, 3, config.img_size, config.img_size)
    features = {}
    for name in ALL_METHODS:
        torch.manual_seed(len(name))  # a different global stream for each method
        method = load_method(name).from_config(config).eval()
        with torch.no_grad():
            features[name] = method.backbone_features(images)
    for name, values in features.items():
        torch.testing.assert_close(values, features["msn_lightly"], msg=name)
    other_seed = load_method("msn").from_config(tiny_config(seed_everything=1))
    with torch.no_grad():
        moved = other_seed.eval().backbone_features(images)
    assert not torch.allclose(moved, features["msn"])


def test_views_follow_the_config() -> None:
    config = tiny_config(data={"focal_views": 3})
    image = build_dataset("digits", "train", img_size=16)[0][0]
    expected = {
        "msn": [16, 16, 8, 8, 8],
        "msn_lightly": [16, 16, 8, 8, 8],
        "dino": [16, 16, 8, 8, 8],
        "ibot": [16, 16, 8, 8, 8],
        "simclr": [16, 16],
        "byol": [16, 16],
        "mae": [16],
    }
    for name, sizes in expected.items():
        views = load_method(name).make_transform(config)(image)
        assert [view.shape[-1] for view in views] == sizes, name


def test_unknown_method_and_bad_overrides_raise() -> None:
    with pytest.raises(ValueError, match="unknown method 'mocov9'.*msn"):
        load_method("mocov9")
    config = tiny_config(methods={"dino": {"lr_per_128": 1.0}})
    with pytest.raises(ValueError, match=r"methods.dino has unknown keys.*lr_per_128"):
        load_method("dino").from_config(config)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"unknown sections \['epochs'\]"):
        BenchmarkConfig.from_profile({**TINY_PROFILE, "epochs": 3})
    with pytest.raises(ValueError, match=r"unknown keys in data: \['epochs'\]"):
        tiny_config(data={"epochs": 3})
    with pytest.raises(ValueError, match=r"unknown keys in trainer: \['max_epoch'\]"):
        tiny_config(trainer={"max_epoch": 3})
    with pytest.raises(ValueError, match="focal_size=10 is not a multiple"):
        tiny_config(data={"focal_size": 10})
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        tiny_config(data={"batch_size": 1})
    config = tiny_config(trainer={"devices": 4, "num_nodes": 2})
    assert config.global_batch_size == 64
    # a config round-trips through its sections
    assert BenchmarkConfig.from_profile(config.to_dict()) == config


def test_recipe_overrides_reach_the_method() -> None:
    config = tiny_config(
        data={"batch_size": 64}, methods={"dino": {"lr_per_256": 1e-3}}
    )
    method = load_method("dino").from_config(config)
    assert method.lr == pytest.approx(1e-3 * 64 / 256)


def test_balanced_indices_are_balanced_deterministic_and_checked() -> None:
    labels = np.repeat(np.arange(4), 10)
    first = balanced_indices(labels, 10, seed=0)
    assert first == balanced_indices(labels, 10, seed=0)
    assert first != balanced_indices(labels, 10, seed=1)
    assert np.bincount(labels[first]).tolist() == [3, 3, 2, 2]
    assert len(set(first)) == 10
    assert balanced_indices(labels, None, seed=0) == list(range(40))
    with pytest.raises(ValueError, match="needs 11 images of class 0"):
        balanced_indices(labels, 44, seed=0)


def test_parse_overrides() -> None:
    overrides = parse_overrides(
        ["trainer.max_epochs=3", "data.dataset=/x/y", 'benchmark.fewshot=["1","5"]']
    )
    assert overrides == {
        "trainer": {"max_epochs": 3},
        "data": {"dataset": "/x/y"},
        "benchmark": {"fewshot": ["1", "5"]},
    }
    merged = merge_profile(TINY_PROFILE, overrides)
    assert merged["trainer"] == {"max_epochs": 3, "accelerator": "cpu", "devices": 1}
    assert merged["data"]["img_size"] == 16 and merged["data"]["dataset"] == "/x/y"
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        parse_overrides(["epochs"])


def fake_record(method: str, offset: float) -> dict[str, Any]:
    return {
        "method": method,
        "run": "fake",
        "pretrain": {
            "epochs": 2,
            "wall_time_s": 90.0 + offset,
            "images_per_s": 100.0 + offset,
            "peak_memory_mb": 1000.0 + offset,
            "memory_kind": "rss",
        },
        "knn": {
            "20": {"top1": 50.0 + offset, "top5": 90.0},
            "200": {"top1": 45.0 - offset, "top5": 88.0},
        },
        "fewshot": [
            {
                "setting": "1",
                "labels_per_class": 1.0,
                "mean": 20.0 + offset,
                "std": 1.25,
                "accuracies": [19.0, 21.0],
            },
            {
                "setting": "1%",
                "labels_per_class": 5.0,
                "mean": 30.0,
                "std": 0.5,
                "accuracies": [30.0],
            },
        ],
        "retrieval": {"mean_average_precision_at_r": 10.0 + offset},
        "knn_curve": [{"epoch": 0, "top1": 20.0}, {"epoch": 1, "top1": 30.0 + offset}],
    }


def test_every_benchmarked_method_has_its_own_fixed_plot_colour() -> None:
    colours = [results.method_color(method) for method in available_methods()]
    assert None not in colours
    assert len(set(colours)) == len(colours)
    assert results.method_color("not_a_method") is None  # the cycle's next colour


def test_results_round_trip_table_csv_and_plots(tmp_path: Path) -> None:
    for method, offset in (("simclr", 2.0), ("msn", 1.0), ("zeta", 0.0)):
        results.write_record(tmp_path, fake_record(method, offset))
    records = results.load_records(tmp_path)
    assert [r["method"] for r in records] == ["msn", "simclr", "zeta"]
    assert records[1] == fake_record("simclr", 2.0)

    table = results.summarize(tmp_path).splitlines()
    assert table[0] == (
        "| method | kNN k=20 | kNN k=200 | 1 per class | 1% labelled | MAP@R "
        "| pretrain (min) | img/s | peak RSS (MB) |"
    )
    assert table[2] == (
        "| msn | 51.0 | 44.0 | 21.0 ± 1.2 | **30.0 ± 0.5** | 11.0 | 1.5 | 101 | 1001 |"
    )
    assert table[3] == (
        "| simclr | **52.0** | 43.0 | **22.0 ± 1.2** | **30.0 ± 0.5** | **12.0** "
        "| 1.5 | 102 | 1002 |"
    )
    assert table[4].startswith("| zeta | 50.0 | **45.0** |")
    assert (tmp_path / "results.md").read_text().splitlines() == table

    with open(tmp_path / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["method"] for row in rows] == ["msn", "simclr", "zeta"]
    assert float(rows[1]["knn_top1_k200"]) == 43.0
    assert float(rows[0]["fewshot_1_std"]) == 1.25
    assert float(rows[2]["pretrain_wall_time_s"]) == 90.0
    for plot in ("fewshot.png", "knn_curve.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_table_compares_msn_draw_by_draw() -> None:
    def record(method: str, one_shot: list[float], one_percent: list[float]) -> Any:
        entries = [("1", one_shot), ("1%", one_percent)]
        fewshot = [{"setting": s, "accuracies": a} for s, a in entries if a]
        return {"method": method, "fewshot": fewshot}

    records = [
        record("msn", [20.0, 22.0, 25.0, 30.0], [30.0]),
        record("dino", [18.0, 22.0], []),
        record("simclr", [19.0, 23.0, 21.0], [29.0]),
    ]
    table = results.paired_table(records)
    assert table is not None
    # differences 1, -1, 4 over the 3 shared draws: mean 4/3, sample variance
    # 57/9, standard error sqrt(57/9 / 3) = 1.45; dino shares 2 draws: 2, 0
    assert "| simclr | +1.3 ± 1.5 (2/3) | +1.0 (1/1) |" in table
    assert "| dino | +1.0 ± 1.0 (1/2) | – |" in table
    assert "| msn |" not in table
    assert results.paired_table(records[1:]) is None
    assert results.paired_table(records[:1]) is None


def test_table_marks_missing_values(tmp_path: Path) -> None:
    partial = copy.deepcopy(fake_record("dino", 0.0))
    del partial["retrieval"]
    partial["fewshot"] = partial["fewshot"][:1]
    table = results.markdown_table([fake_record("byol", 0.0), partial])
    assert table.splitlines()[3].split(" | ")[4:6] == ["–", "–"]


def test_write_record_needs_a_method(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'method'"):
        results.write_record(tmp_path, {"knn": {}})
    with pytest.raises(ValueError, match="no benchmark records"):
        results.summarize(tmp_path)


def budget_record(
    method: str, epochs: int, one_shot: list[float], knn: float, **config: Any
) -> dict[str, Any]:
    """A staged record of ``method`` trained ``epochs`` epochs on 1,000 images."""
    record = copy.deepcopy(fake_record(method, 0.0))
    record["pretrain"].update(
        epochs=epochs, train_images=1000, wall_time_s=60.0 * epochs
    )
    record["knn"]["20"]["top1"] = knn
    record["fewshot"][0].update(mean=sum(one_shot) / len(one_shot), accuracies=one_shot)
    record["knn_curve"] = [{"step": 0, "top1": 20.0}, {"step": 10, "top1": knn}]
    record["knn_curve_sets"] = "bank"
    record["recipe"] = {"lr_per_256": 1e-3}
    record["config"] = {
        "seed_everything": 0,
        "trainer": {"max_epochs": epochs},
        "vit": {"depth": 4},
        "data": {"img_size": 32, "data_dir": "/here"},
        "benchmark": {"fewshot_seeds": len(one_shot)},
        "methods": {},
    }
    for section, values in config.items():
        record["config"][section].update(values)
    return record


def test_budgets_put_runs_of_one_profile_side_by_side(tmp_path: Path) -> None:
    from benchmarks.budgets import main as budgets_main

    runs = {
        "short": [
            budget_record("simclr", 1, [20.0, 24.0], 40.0),
            budget_record("msn", 1, [19.0, 22.0], 35.0),
        ],
        "long": [
            budget_record("msn", 4, [23.0, 26.0], 45.0, data={"data_dir": "/there"}),
            budget_record("simclr", 4, [22.0, 23.0], 44.0),
        ],
    }
    for run, records in runs.items():
        for record in records:
            results.write_record(tmp_path / run, record)
    arguments = ["long", "short", "--name", "both", "--results-dir", str(tmp_path)]
    assert budgets_main(arguments) == 0
    text = (tmp_path / "both" / "budgets.md").read_text()
    lines = text.splitlines()
    assert lines[2].startswith("| method | epochs | images seen | training (min) |")
    # by method, then by epochs, whatever the order of the runs
    assert lines[4:8] == [
        "| msn | 1 | 1,000 | 1 | 35.0 | +15.0 | 20.5 | 30.0 |",
        "| msn | 4 | 4,000 | 4 | 45.0 | +25.0 | 24.5 | 30.0 |",
        "| simclr | 1 | 1,000 | 1 | 40.0 | +20.0 | 22.0 | 30.0 |",
        "| simclr | 4 | 4,000 | 4 | 44.0 | +24.0 | 22.5 | 30.0 |",
    ]
    # msn - simclr per draw: -1, -2 at 1 epoch (mean -1.5, standard error 0.5);
    # +1, +3 at 4 epochs (mean +2.0, standard error 1.0)
    assert "| simclr | 1 | -1.5 ± 0.5 (0/2) | +0.0 (0/1) |" in lines
    assert "| simclr | 4 | +2.0 ± 1.0 (2/2) | +0.0 (0/1) |" in lines
    # msn - simclr: kNN -5 then +1, 1 per class -1.5 then +2, 1% level at both
    assert (
        "| simclr | kNN top-1, k=20 | 1 / 4 | -5.0 / +1.0 | +3.0 | "
        "cross between 1 and 4 epochs; msn ahead after |" in lines
    )
    assert (
        "| simclr | few-shot top-1, 1% labelled | 1 / 4 | +0.0 / +0.0 | +0.0 | "
        "level at every budget |" in lines
    )
    # simclr's kNN 40 at 1 epoch: msn's line (35 at 1, 45 at 4) reaches it half-way
    # in log epochs, at 2 epochs (2.0x); its 44 at 4: at 4**0.9 = 3.48 epochs (0.9x)
    assert "| simclr | kNN top-1, k=20 | 2.0x | 0.9x |" in lines
    assert "| simclr | few-shot top-1, 1% labelled | ≤1.0x | ≤0.2x |" in lines
    png = (tmp_path / "both" / "budgets.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # a usage error naming the run, no traceback
        budgets_main(["long", "lost", "--name", "x", "--results-dir", str(tmp_path)])
    assert not (tmp_path / "x").exists()


def test_gap_trend_is_the_least_squares_line_against_log2_epochs() -> None:
    from benchmarks.budgets import gap_trend

    # exactly on the line 3 - log2(epochs)
    assert gap_trend([1, 2, 4, 8], [3.0, 2.0, 1.0, 0.0]) == pytest.approx((-1.0, 3.0))
    # points at x = 0, 1, 2 with y = 0, 2, 1: slope 0.5, intercept 0.5
    assert gap_trend([1, 2, 4], [0.0, 2.0, 1.0]) == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize(
    ("epochs", "gaps", "verdict"),
    [
        ([1, 2, 4], [1.0, 0.5, -1.0], "cross between 2 and 4 epochs; msn behind after"),
        # a zero gap is no side: the sign changes between 1 and 4
        ([1, 2, 4], [-1.0, 0.0, 2.0], "cross between 1 and 4 epochs; msn ahead after"),
        ([1, 2], [0.0, 0.0], "level at every budget"),
        # gap = -2 + log2(epochs): zero at 4 epochs
        (
            [1, 2],
            [-2.0, -1.0],
            "msn behind at every budget; would cross near 4 epochs on the fitted trend",
        ),
        # zero at 2**10 epochs, past 2 * 2**3
        (
            [1, 2],
            [-10.0, -9.0],
            "msn behind at every budget; closing, would cross beyond 16 epochs",
        ),
        ([1, 2], [1.0, 2.0], "msn ahead at every budget; not closing"),
        ([1, 2, 4], [1.0, 0.0, 2.0], "msn ahead or level at every budget; not closing"),
    ],
)
def test_crossing_verdict_says_where_the_lines_cross(
    epochs: list[int], gaps: list[float], verdict: str
) -> None:
    from benchmarks.budgets import crossing_verdict

    assert crossing_verdict(epochs, gaps, "msn") == verdict


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (10.0, ("≤", 1.0)),  # the curve starts there
        (12.0, ("", 2.0)),  # reached exactly at a budget
        (13.0, ("", 2.0 * 2**0.25)),  # a quarter of the way from 12 to 16, in log
        (15.0, ("", 2.0 * 2**0.75)),
        (11.0, ("", 2**0.5)),  # half-way from 10 to 12, not on the dip to 11 at 8
        (16.5, (">", 8.0)),  # never reached
    ],
)
def test_epochs_to_reach_interpolates_in_log_epochs(
    target: float, expected: tuple[str, float]
) -> None:
    from benchmarks.budgets import epochs_to_reach

    # 11 at 8 epochs: the first crossing counts, not the later dip
    curve = [(1, 10.0), (2, 12.0), (4, 16.0), (8, 11.0)]
    bound, epochs = epochs_to_reach(curve, target)
    assert (bound, epochs) == (expected[0], pytest.approx(expected[1]))


def test_budgets_refuse_runs_that_differ_in_more_than_epochs(tmp_path: Path) -> None:
    from benchmarks.budgets import load_budgets

    def run(name: str, *records: dict[str, Any]) -> Path:
        for record in records:
            results.write_record(tmp_path / name, record)
        return tmp_path / name

    one = run("one", budget_record("msn", 1, [20.0], 30.0))
    wider = run("wider", budget_record("msn", 2, [20.0], 30.0, vit={"depth": 6}))
    differs = r"wider/msn.json differs from .*one's msn in more than epochs"
    with pytest.raises(ValueError, match=differs + r" \(vit.depth: 4 -> 6\)"):
        load_budgets([one, wider])
    again = run("again", budget_record("msn", 1, [21.0], 31.0))
    with pytest.raises(ValueError, match="msn trained for 1 epochs in both"):
        load_budgets([one, again])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no benchmark records"):
        load_budgets([one, tmp_path / "empty"])
    retuned = copy.deepcopy(budget_record("msn", 2, [20.0], 30.0))
    retuned["recipe"]["lr_per_256"] = 2e-3
    with pytest.raises(
        ValueError,
        match=r"\(recipe: \{'lr_per_256': 0.001\} -> \{'lr_per_256': 0.002\}\)",
    ):
        load_budgets([one, run("retuned", retuned)])


@pytest.mark.parametrize("method", ["mae", "msn"])
def test_end_to_end_run_writes_record_table_and_curve(
    method: str, tmp_path: Path
) -> None:
    overrides = {
        "trainer.max_epochs": 2,
        "data.dataset": "digits",
        "data.img_size": 16,
        "data.focal_size": 8,
        "data.batch_size": 32,
        "data.train_subset": 64,
        "data.num_workers": 0,
        "vit.embed_dim": 32,
        "vit.depth": 1,
        "vit.num_heads": 2,
        "benchmark.bank_subset": 300,
        "benchmark.test_subset": 100,
        "benchmark.monitor_bank": 50,
        "benchmark.monitor_test": 50,
        "benchmark.fewshot": ["1", "5%"],
        "benchmark.fewshot_seeds": 2,
    }
    arguments = [
        "--profile", "cpu-quick", "--methods", method, "--name", "e2e",
        "--results-dir", str(tmp_path), "--no-progress", "--set",
        *(f"{key}={json.dumps(value)}" for key, value in overrides.items()),
    ]  # fmt: skip
    assert main(arguments) == 0
    record = json.loads((tmp_path / "e2e" / f"{method}.json").read_text())
    assert record["pretrain"]["epochs"] == 2
    assert record["pretrain"]["steps"] == 4  # 64 images / 32 per batch x 2 epochs
    assert record["pretrain"]["peak_memory_mb"] > 0
    assert [point["epoch"] for point in record["knn_curve"]] == [0, 1, 2]
    assert set(record["knn"]) == {"20", "200"}
    assert [entry["setting"] for entry in record["fewshot"]] == ["1", "5%"]
    assert all(len(entry["accuracies"]) == 2 for entry in record["fewshot"])
    assert 0 <= record["retrieval"]["mean_average_precision_at_r"] <= 100
    assert math.isfinite(record["pretrain"]["final_loss"])
    assert (tmp_path / "e2e" / "results.md").read_text().startswith("| method |")
    # the method trained through the package's run directory
    method_dir = tmp_path / "e2e" / method
    assert (method_dir / "checkpoints" / "last.ckpt").is_file()
    assert (method_dir / "metrics.csv").is_file()


def test_a_run_announces_each_method_once_and_names_the_failed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess

    from benchmarks import run as run_module

    commands: list[list[str]] = []

    def child(command: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, returncode=int("dino" in command))

    monkeypatch.setattr(run_module.subprocess, "run", child)
    monkeypatch.setattr(run_module, "pretrain_and_evaluate", lambda *a, **k: None)
    config = tiny_config(trainer={"max_epochs": 1})
    parse = run_module.build_parser().parse_args
    several = parse(["--profile", "cpu-quick", "--methods", "msn,dino"])
    failed = run_module.pretrain_methods(several, config, ["msn", "dino"], tmp_path)
    assert failed == ["dino"]
    assert [command[command.index("--methods") + 1] for command in commands] == [
        "msn",
        "dino",
    ]
    # each child process announces itself; the parent adds only the failures
    assert capsys.readouterr().out == "[benchmarks] dino: FAILED\n"

    one = parse(["--profile", "cpu-quick", "--methods", "msn"])
    assert run_module.pretrain_methods(one, config, ["msn"], tmp_path) == []
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[benchmarks] msn: pretraining (1 epoch)"
    assert lines[1].startswith("[benchmarks] msn: done in ")
    assert len(lines) == 2 and len(commands) == 2


def test_an_interrupted_method_continues_from_its_last_checkpoint(
    tmp_path: Path,
) -> None:
    from pytorch_lightning import Callback

    config = tiny_config(trainer={"max_epochs": 2}, data={"train_subset": 16})
    config.bank_subset, config.test_subset = 40, 20
    config.monitor_bank = config.monitor_test = 20
    config.fewshot, config.fewshot_seeds, config.knn_ks = ("1",), 1, (5,)

    class Killed(Exception):
        pass

    class Interrupt(Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if trainer.current_epoch == 1:
                raise Killed

    from benchmarks import run as run_module

    original = run_module.run_trainer_arguments

    def with_interrupt(*args: Any, **kwargs: Any) -> dict[str, Any]:
        arguments = original(*args, **kwargs)
        arguments["callbacks"].append(Interrupt())
        return arguments

    run_dir = tmp_path / "run"
    run_module.run_trainer_arguments = with_interrupt  # type: ignore[assignment]
    try:
        with pytest.raises(Killed):
            run_module.pretrain_and_evaluate(config, "simclr", run_dir, progress=False)
    finally:
        run_module.run_trainer_arguments = original  # type: ignore[assignment]
    assert (run_dir / "simclr" / "checkpoints" / "epoch=000.ckpt").is_file()
    record = run_module.pretrain_and_evaluate(config, "simclr", run_dir, progress=False)
    assert record is not None
    assert record["pretrain"]["resumed"] is True
    assert record["pretrain"]["steps"] == 4  # 2 epochs of 16 images / 8
    assert [point["epoch"] for point in record["knn_curve"]] == [0, 1, 2]


def test_profiles_load_and_imagenet_follows_the_paper() -> None:
    quick = BenchmarkConfig.from_profile(load_profile("cpu-quick"))
    assert (quick.img_size, quick.patch_size, quick.trainer["accelerator"]) == (
        32,
        4,
        "cpu",
    )
    imagenet = BenchmarkConfig.from_profile(load_profile("imagenet-vits16"))
    assert imagenet.global_batch_size == 1024
    assert (imagenet.img_size, imagenet.patch_size, imagenet.embed_dim) == (
        224,
        16,
        384,
    )
    assert (imagenet.local_size, imagenet.num_local_views) == (96, 10)
    assert imagenet.trainer["precision"] == "bf16-mixed"
    msn_recipe = imagenet.recipe("msn", load_method("msn").defaults)
    assert msn_recipe["lr_per_256"] * imagenet.global_batch_size / 256 == 1e-3
    assert msn_recipe["mask_ratio"] == 0.15
    with pytest.raises(ValueError, match="no profile 'gpu-fast'.*cpu-quick"):
        load_profile("gpu-fast")


@pytest.mark.parametrize("name", ["cpu-quick", "imagenet-vits16"])
def test_profiles_share_the_pretrain_config_format(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A profile's trainer and data sections are a ``pretrain --config`` file."""
    from lightly_msn.cli import main as cli_main

    profile = load_profile(name)
    sections = {k: profile[k] for k in ("seed_everything", "trainer", "data")}
    path = tmp_path / "sections.yaml"
    path.write_text(yaml.safe_dump(sections))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pretrain", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for section in ("trainer", "data"):
        for key, value in sections[section].items():
            assert printed[section][key] == value, (section, key)


def test_perf_components_ema_table_reports_ratio_and_floor() -> None:
    from benchmarks.perf_components import benchmark_ema

    rows = benchmark_ema(torch.device("cpu"), repeats=1, warmup=0)
    assert rows[0].startswith("| update_momentum, ViT-S/16 pair (21.7 M parameters)")
    assert "x faster)" in rows[2]
    assert rows[-1].startswith("Floor in the same rounds: a bare torch._foreach_lerp_")
    assert "faster than lightly" in rows[-1] and rows[-1].endswith("x.")


def test_perf_train_step_onednn_linear_matches_torch_linear() -> None:
    from benchmarks.perf_train_step import OneDNNLinear

    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("this torch build has no oneDNN linear operator")
    torch.manual_seed(0)
    reference = torch.nn.Linear(12, 5)
    onednn = OneDNNLinear(12, 5)
    onednn.load_state_dict(reference.state_dict())
    inputs = torch.randn(3, 7, 12)
    outputs = []
    for layer in (reference, onednn):
        x = inputs.clone().requires_grad_()
        out = layer(x)
        (out * torch.linspace(-1, 1, 5)).square().sum().backward()
        outputs.append((out, x.grad, layer.weight.grad, layer.bias.grad))
    for expected, actual in zip(*outputs, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


TINY_STAGED_BENCHMARK: dict[str, Any] = {
    "bank_subset": 60,
    "test_subset": 30,
    "knn_ks": [5, 20],
    "fewshot": ["1", "2"],
    "fewshot_seeds": 2,
    "stages": [0.25, 0.5],
    "stage_shots": 2,
}
"""A staged evaluation small enough for a test: 2-shot at each stage, 2 draws."""


def test_staged_evaluation_measures_at_fractions_of_the_budget(tmp_path: Path) -> None:
    from benchmarks.run import pretrain_and_evaluate

    config = tiny_config(
        trainer={"max_epochs": 2},
        data={"train_subset": 32},
        benchmark=TINY_STAGED_BENCHMARK,
    )
    record = pretrain_and_evaluate(config, "simclr", tmp_path / "run", progress=False)
    assert record is not None and record["knn_curve_sets"] == "bank"
    curve = record["knn_curve"]
    # 2 epochs of 32 images / 8 = 8 steps: init, 25 % (2), 50 % (4), the end (8)
    assert [p["step"] for p in curve] == [0, 2, 4, 8]
    assert [p["epoch"] for p in curve] == [0, 0.5, 1.0, 2]
    assert [p["images_seen"] for p in curve] == [0, 16, 32, 64]
    seconds = [p["train_seconds"] for p in curve]
    assert seconds == sorted(seconds) and seconds[0] < seconds[-1]
    assert all(0 <= p["fewshot_top1"] <= 100 for p in curve)
    # the points measured during training are in metrics.csv too, for runs cut short
    with (tmp_path / "run" / "simclr" / "metrics.csv").open() as file:
        logged = [row for row in csv.DictReader(file) if row["progress/top1"]]
    assert [int(row["step"]) for row in logged] == [0, 2, 4]
    assert [float(row["progress/top1"]) for row in logged] == [
        p["top1"] for p in curve[:3]
    ]
    # the last point is the final evaluation's k=20 kNN and 2-shot accuracy
    assert curve[-1]["top1"] == record["knn"]["20"]["top1"]
    two_shot = [e["mean"] for e in record["fewshot"] if e["setting"] == "2"]
    assert curve[-1]["fewshot_top1"] == two_shot[0]
    table = results.summarize(tmp_path / "run")
    assert "kNN k=20 at init | gain" in table
    initial = f"{curve[0]['top1']:.1f}"
    assert f"| simclr | {initial} |" in table
    assert (tmp_path / "run" / "progress.png").stat().st_size > 0
    assert not (tmp_path / "run" / "knn_curve.png").exists()
    assert "| kNN k=20 at 0 % | kNN k=20 at 25 % | kNN k=20 at 50 % |" in table


def test_reevaluation_reproduces_the_run_and_adds_draws(tmp_path: Path) -> None:
    from benchmarks.run import pretrain_and_evaluate, reevaluate

    benchmark = {**TINY_STAGED_BENCHMARK, "stages": [0.5]}
    config = tiny_config(data={"train_subset": 32}, benchmark=benchmark)
    run_dir = tmp_path / "run"
    before = pretrain_and_evaluate(config, "simclr", run_dir, progress=False)
    assert before is not None
    more_draws = tiny_config(
        data={"train_subset": 32}, benchmark={**benchmark, "fewshot_seeds": 4}
    )
    after = reevaluate(more_draws, "simclr", run_dir, progress=False)

    # the trained weights, not the initial ones: the first draws and kNN repeat
    assert after["knn"] == before["knn"]
    for old, new in zip(before["fewshot"], after["fewshot"], strict=True):
        assert len(new["accuracies"]) == 4
        assert new["accuracies"][:2] == old["accuracies"]
    assert after["pretrain"] == before["pretrain"]
    # the curve stays on the 2 draws its earlier stages were measured with
    assert after["knn_curve"] == before["knn_curve"]
    assert after["eval"]["curve_fewshot_seeds"] == 2
    written = json.loads(results.record_path(run_dir, "simclr").read_text())
    assert written == json.loads(json.dumps(after))

    longer = tiny_config(
        trainer={"max_epochs": 2}, data={"train_subset": 32}, benchmark=benchmark
    )
    with pytest.raises(
        ValueError, match=r"other values \(trainer\.max_epochs: 1 -> 2\)"
    ):
        reevaluate(longer, "simclr", run_dir, progress=False)
    # another method's recipe does not touch simclr's weights; its own does
    other_recipe = tiny_config(
        data={"train_subset": 32},
        benchmark=benchmark,
        methods={"dino": {"momentum": 0.9}},
    )
    rescored = reevaluate(other_recipe, "simclr", run_dir, progress=False)
    assert rescored["knn"] == before["knn"]
    own_recipe = tiny_config(
        data={"train_subset": 32},
        benchmark=benchmark,
        methods={"simclr": {"temperature": 0.3}},
    )
    with pytest.raises(ValueError, match=r"other values \(methods\.simclr: "):
        reevaluate(own_recipe, "simclr", run_dir, progress=False)
    with pytest.raises(FileNotFoundError, match="msn.json does not exist"):
        reevaluate(config, "msn", run_dir, progress=False)


def test_a_run_folder_keeps_one_budget(tmp_path: Path) -> None:
    from benchmarks import run as run_module

    config = tiny_config(data={"train_subset": 16})
    config.bank_subset, config.test_subset = 40, 20
    config.monitor_bank = config.monitor_test = 20
    config.fewshot, config.fewshot_seeds, config.knn_ks = ("1",), 1, (5,)
    run_dir = tmp_path / "run"
    run_module.pretrain_and_evaluate(config, "simclr", run_dir, progress=False)
    written = json.loads((run_dir / "simclr" / "config.json").read_text())
    assert written == json.loads(json.dumps(config.to_dict()))

    longer = copy.deepcopy(config)
    longer.trainer["max_epochs"] = 2
    # continuing the method's checkpoint under another budget is refused ...
    with pytest.raises(ValueError, match=r"trainer\.max_epochs: 1 -> 2\).*--name"):
        run_module.pretrain_and_evaluate(longer, "simclr", run_dir, progress=False)
    # ... and so is keeping its record as if it were this run's
    parse = run_module.build_parser().parse_args
    args = parse(["--profile", "cpu-quick", "--methods", "simclr", "--skip-existing"])
    with pytest.raises(ValueError, match=r"simclr\.json: simclr ran under other"):
        run_module.pretrain_methods(args, longer, ["simclr"], run_dir)
    assert run_module.pretrain_methods(args, config, ["simclr"], run_dir) == []

    # where the run is made and how it is evaluated may change; what it trains may not
    moved = copy.deepcopy(config.to_dict())
    moved["data"].update(data_dir="/elsewhere", num_workers=8)
    moved["benchmark"]["fewshot_seeds"] = 10
    assert run_module.profile_differences(config.to_dict(), moved, "simclr") == [
        "benchmark.fewshot_seeds: 1 -> 10"
    ]
    assert not run_module.profile_differences(
        config.to_dict(), moved, "simclr", run_module.REEVALUATION_KEYS
    )
    flat = {"epochs": 1, "data": "cifar10", "precision": "32-true"}  # before sections
    assert run_module.profile_differences(flat, moved, "simclr") == [
        "a profile in the older format without sections, not comparable"
    ]


def staged_record(method: str, top1: list[float]) -> dict[str, Any]:
    record = fake_record(method, 0.0)
    record["config"] = {"benchmark": {"stage_shots": 5}}
    record["knn_curve_sets"] = "bank"
    record["knn_curve"] = [
        {"step": step, "top1": acc, "fewshot_top1": acc / 2, "train_seconds": 30 * step}
        for step, acc in zip([0, 10, 20, 40], top1, strict=True)
    ]
    return record


def test_stage_table_reads_each_stage_of_the_budget() -> None:
    records = [
        staged_record("msn", [30.0, 32.0, 34.0, 40.0]),
        staged_record("simclr", [31.0, 35.0, 38.0, 42.25]),
    ]
    lines = results.stage_table(records).splitlines()  # type: ignore[union-attr]
    assert lines[0] == (
        "| method | kNN k=20 at 0 % | kNN k=20 at 25 % | kNN k=20 at 50 % "
        "| kNN k=20 at 100 % | 5 per class at 0 % | 5 per class at 25 % "
        "| 5 per class at 50 % | 5 per class at 100 % "
        "| training min at 25 / 50 / 100 % |"
    )
    assert lines[2] == (
        "| msn | 30.0 | 32.0 | 34.0 | 40.0 | 15.0 | 16.0 | 17.0 | 20.0 "
        "| 5.0 / 10.0 / 20.0 |"
    )
    assert lines[3].startswith("| simclr | 31.0 | 35.0 | 38.0 | 42.2 |")
    assert results.stage_table([fake_record("msn", 0.0)]) is None


def test_stages_need_their_final_evaluation_settings() -> None:
    with pytest.raises(ValueError, match="stages must lie in"):
        tiny_config(benchmark={"stages": [0.5, 1.0]})
    with pytest.raises(ValueError, match="k=20 in knn_ks and '5' in fewshot"):
        tiny_config(benchmark={"stages": [0.5], "fewshot": ["1"]})


def test_tuning_logs_every_trial_and_picks_the_best_per_method(
    tmp_path: Path,
) -> None:
    from benchmarks import tune

    tuning_dir = tmp_path / "tuning"
    scores = {("msn", 0): 20.0, ("msn", 1): 30.0, ("dino", 0): 25.0, ("dino", 1): 5.0}
    for (method, index), value in scores.items():
        record = fake_record(method, 0.0)
        for entry in record["fewshot"]:
            entry["mean"] = value
        tune.write_trial_log(
            tuning_dir, method, index, {"lr_per_256": 10.0**-index}, record, "fewshot"
        )
    table = tune.summarize_tuning(tuning_dir)
    winners = yaml.safe_load((tuning_dir / "winners.yaml").read_text())
    assert winners == {"dino": {"lr_per_256": 1.0}, "msn": {"lr_per_256": 0.1}}
    assert "| msn | 1 |" in table and "**30.00**" in table and "**25.00**" in table
    with (tuning_dir / "trials.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["method"], r["winner"]) for r in rows] == [
        ("dino", "True"),
        ("dino", "False"),
        ("msn", "False"),
        ("msn", "True"),
    ]
    log = json.loads((tuning_dir / "msn-1.json").read_text())
    assert log["score"] == 30.0 and log["overrides"] == {"lr_per_256": 0.1}


def tiny_tuning_plan(
    tmp_path: Path, shorten: dict[str, Any], simclr_trials: list[dict[str, Any]]
) -> dict[str, Any]:
    """A fewshot-scored plan of ``simclr`` trials on the tiny profile."""
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump(TINY_PROFILE))
    return {
        "profile": str(profile),
        "shorten": shorten,
        "metric": "fewshot",
        "trials": {"simclr": simclr_trials},
    }


def test_tuning_skips_logged_trials_but_refuses_a_log_the_plan_no_longer_asks_for(
    tmp_path: Path,
) -> None:
    from benchmarks import tune

    plan = tiny_tuning_plan(
        tmp_path, {"data": {"validation_size": 50}}, [{"lr_per_256": 1e-3}]
    )
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(plan))
    tuning_dir = tmp_path / "run" / tune.TUNING_DIR
    tune.write_trial_log(
        tuning_dir,
        "simclr",
        0,
        {"lr_per_256": 1e-3},
        fake_record("simclr", 0.0),
        "fewshot",
    )
    argv = ["--plan", str(plan_path), "--results-dir", str(tmp_path), "--name", "run"]
    assert tune.main(argv) == 0  # nothing left to run: no trial process started
    assert (tuning_dir / "winners.yaml").is_file()

    plan["trials"]["simclr"][0] = {"lr_per_256": 2e-3}
    plan_path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ValueError, match=r"simclr-0\.json ran .* simclr trial 0 is"):
        tune.main(argv)


def test_tuning_rescores_logged_trials_under_new_evaluation_settings(
    tmp_path: Path,
) -> None:
    from benchmarks import tune

    plan = tiny_tuning_plan(
        tmp_path,
        {
            "data": {"train_subset": 32, "validation_size": 50},
            "benchmark": {
                "bank_subset": 60,
                "test_subset": None,
                "monitor_bank": 0,
                "knn_ks": [5, 20],
                "fewshot": ["1", "2"],
                "fewshot_seeds": 2,
            },
        },
        [{"lr_per_256": 1e-3}, {"lr_per_256": 2e-3}],
    )
    run_dir = tmp_path / "run"
    tune.run_trial(plan, "simclr", 0, run_dir, progress=False)  # trial 1 not run
    tuning_dir = run_dir / tune.TUNING_DIR
    before = json.loads((tuning_dir / "simclr-0.json").read_text())
    assert tune.reevaluate_trials(plan, run_dir, ["simclr"], progress=False) == []

    plan["shorten"]["benchmark"]["fewshot_seeds"] = 3
    rewritten = tune.reevaluate_trials(plan, run_dir, ["simclr"], progress=False)
    assert rewritten == [tuning_dir / "simclr-0.json"]
    after = json.loads(rewritten[0].read_text())
    assert after["overrides"] == {"lr_per_256": 1e-3}
    assert after["record"]["knn"] == before["record"]["knn"]
    for old, new in zip(
        before["record"]["fewshot"], after["record"]["fewshot"], strict=True
    ):
        assert new["accuracies"][:2] == old["accuracies"]  # nested draws
    assert after["score"] == pytest.approx(
        np.mean([entry["mean"] for entry in after["record"]["fewshot"]])
    )
    assert tune.reevaluate_trials(plan, run_dir, ["simclr"], progress=False) == []
    plan["trials"]["simclr"][0] = {"lr_per_256": 5e-3}
    plan["shorten"]["benchmark"]["fewshot_seeds"] = 4
    with pytest.raises(ValueError, match=r"other values \(methods\.simclr: "):
        tune.reevaluate_trials(plan, run_dir, ["simclr"], progress=False)


def test_tuning_plans_give_every_method_the_same_trials(tmp_path: Path) -> None:
    from benchmarks import tune

    plan = {
        "profile": "cpu-quick",
        "shorten": {"data": {"validation_size": 100}},
        "metric": "fewshot",
        "trials": {"msn": [{}, {"lr_per_256": 1e-3}], "dino": [{}]},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ValueError, match="same number of trials"):
        tune.load_plan(str(path))
    plan["trials"]["dino"].append({"teacher_temp": 0.07})
    plan["metric"] = "loss"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ValueError, match="metric must be one of"):
        tune.load_plan(str(path))


def test_a_plan_extends_another_plans_budget_but_not_its_trials(
    tmp_path: Path,
) -> None:
    from benchmarks import tune

    parent = {
        "profile": "cpu-quick",
        "metric": "knn",
        "shorten": {"trainer": {"max_epochs": 3}, "data": {"validation_size": 100}},
        "base": {"msn": {"lr_per_256": 1e-3}},
        "trials": {"msn": [{}, {}, {}], "dino": [{}, {}, {}]},
    }
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(parent))
    child = {
        "extends": "parent.yaml",
        "shorten": {"seed_everything": 1, "trainer": {"limit_train_batches": 2}},
        "trials": {"msn": [{"num_prototypes": 8}]},
    }
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(child))
    plan = tune.load_plan(str(tmp_path / "child.yaml"))
    assert plan["profile"] == "cpu-quick" and plan["metric"] == "knn"
    assert plan["shorten"] == {
        "seed_everything": 1,
        "trainer": {"max_epochs": 3, "limit_train_batches": 2},
        "data": {"validation_size": 100},
    }
    assert plan["trials"] == {"msn": [{"num_prototypes": 8}]} and "base" not in plan
    trial = tune.trial_config(plan, "msn", 0)
    assert trial.seed == 1 and trial.trainer["max_epochs"] == 3
    parent["extends"] = "child.yaml"
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(parent))
    with pytest.raises(ValueError, match="cycle: child.yaml -> parent.yaml"):
        tune.load_plan(str(tmp_path / "child.yaml"))
    child["extends"] = "no-such-plan"
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(child))
    with pytest.raises(ValueError, match="no tuning plan 'no-such-plan'"):
        tune.load_plan(str(tmp_path / "child.yaml"))


def test_tuning_scores_on_held_out_training_images_never_the_test_set() -> None:
    from benchmarks.run import evaluation_sets
    from lightly_msn.data import validation_indices

    config = tiny_config(
        data={"validation_size": 50},
        benchmark={"bank_subset": 200, "test_subset": None, "monitor_bank": 0},
    )
    sets = evaluation_sets(config)
    train = build_dataset("digits", "train")
    held_out = validation_indices(np.asarray(train.targets), 50)
    test, bank = sets["test"], sets["bank"]
    assert test.dataset is bank.dataset and len(test.dataset) == len(train)
    assert sorted(test.indices) == held_out
    assert len(bank) == 200 and not set(bank.indices) & set(held_out)
    datamodule = config.datamodule(load_method("msn"))
    datamodule.setup("fit")
    assert not set(datamodule.train_dataset.indices) & set(held_out)


def test_the_cpu_standard_profile_and_its_tuning_plan_load() -> None:
    from benchmarks import tune

    config = BenchmarkConfig.from_profile(load_profile("cpu-standard"))
    assert config.stages == (0.25, 0.5) and config.test_subset is None
    assert "train_subset" not in config.data  # the full training split
    gpu = BenchmarkConfig.from_profile(load_profile("cifar10-gpu"))
    assert gpu.trainer["max_epochs"] >= 100 and gpu.augment == "device"
    assert gpu.stages == config.stages and gpu.vit == {**config.vit, "depth": 12}
    # the GPU profile runs the CPU tuning's winners, momentum set for its long schedule
    cpu_recipes = load_profile("cpu-standard")["methods"]
    gpu_recipes = load_profile("cifar10-gpu")["methods"]
    for name in ("msn", "dino", "simclr"):
        unscheduled = {**gpu_recipes[name], "momentum": None}
        assert unscheduled == {**cpu_recipes[name], "momentum": None}
    plan = tune.load_plan("cpu-standard")
    assert set(plan["trials"]) == {"msn", "dino", "simclr"}
    for method, trials in plan["trials"].items():
        for index in range(len(trials)):
            trial = tune.trial_config(plan, method, index)
            assert trial.data["validation_size"] == 2000 and trial.stages is None
            recipe = trial.recipe(method, load_method(method).defaults)
            assert recipe["lr_per_256"] == trials[index]["lr_per_256"]


@pytest.mark.parametrize(
    ("plan_name", "seed"), [("prototypes-per-class", 0), ("cpu-standard-seed1", 1)]
)
def test_the_check_plans_keep_the_tuning_budget_and_differ_where_they_say(
    plan_name: str, seed: int
) -> None:
    from benchmarks import tune

    tuning = tune.load_plan("cpu-standard")
    plan = tune.load_plan(plan_name)
    reference = tune.trial_config(tuning, "msn", 0)
    for method, trials in plan["trials"].items():
        for index in range(len(trials)):
            trial = tune.trial_config(plan, method, index)
            assert trial.seed == seed
            assert trial.data == reference.data
            assert trial.trainer == reference.trainer
            assert trial.fewshot_seeds == reference.fewshot_seeds == 10
            assert trial.methods[method] == {
                **plan["base"][method],
                **trials[index],
            }


def test_a_trial_starts_from_the_plans_base_not_the_profiles_winners() -> None:
    from benchmarks import tune

    plan = tune.load_plan("cpu-standard")
    profile_recipe = load_profile("cpu-standard")["methods"]["msn"]
    assert profile_recipe["num_prototypes"] == 64  # the winners
    first = tune.trial_config(plan, "msn", 0).recipe("msn", load_method("msn").defaults)
    assert first["num_prototypes"] == 1024 and first["momentum"] == 0.99
    assert first["lr_per_256"] == 2e-3
