"""``lightly-msn eval``: kNN, retrieval and few-shot evaluation in one table.

Writes ``results.csv``, ``results.json`` and (with few-shot) ``fewshot.png`` to
``--output-dir``. Nothing is downloaded: ``--timm NAME`` builds the model with random
weights unless ``--timm-weights FILE`` names a local weights file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from lightly_msn.eval.protocols import FeatureEvaluation

logger = logging.getLogger(__name__)

KNN_KS = (10, 20, 100, 200)
ALL_PROTOCOLS_SHOTS = "1,2,5,1%"
NAMED_DATASETS = ("cifar10", "digits")  # build_dataset's data sets that are no folder
ALLOW_OVERLAP_HINT = "pass --allow-overlap to evaluate on train images deliberately"


def run_eval_cli(args: argparse.Namespace) -> int:
    """Runs the evaluation described by the parsed ``lightly-msn eval`` arguments.

    The parser has checked every single argument; the device, the splits and the
    folders are checked here before the model or any image is read, the timm name
    before the model is built, and classes, overlap and few-shot sizes before
    anything is embedded.

    Raises:
        ValueError, OSError: For bad input, with a message that names it.
    """
    from lightly_msn.data import eval_transform
    from lightly_msn.eval.embed import embed
    from lightly_msn.eval.fewshot import parse_shots
    from lightly_msn.eval.protocols import evaluate_features

    _check_model_and_device(args)
    _check_folders(args)
    if not (args.knn or args.retrieval or args.fewshot):
        args.knn = args.retrieval = True
        args.fewshot = parse_shots(ALL_PROTOCOLS_SHOTS)
    model, source = _load_model(args)
    img_size = args.img_size or _model_image_size(model)
    train_set, test_set = _load_datasets(args, eval_transform(img_size), img_size)
    train = embed(model, train_set, args.batch_size, args.device)
    test = embed(model, test_set, args.batch_size, args.device)

    evaluation = evaluate_features(
        train,
        test,
        knn_ks=sorted({min(k, len(train[0])) for k in KNN_KS}) if args.knn else (),
        retrieval=args.retrieval,
        shots=args.fewshot or (),
        seeds=args.seeds,
        device=args.device,
        progress=True,
    )
    rows = result_rows(evaluation)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, output_dir / "results.csv")
    report = {
        "model": source,
        "train": args.train,
        "test": args.test,
        "allow_overlap": args.allow_overlap,
        "classes": list(train_set.classes),  # type: ignore[attr-defined]
        "img_size": img_size,
        "num_train": len(train[0]),
        "num_test": len(test[0]),
        "feature_dim": train[0].shape[1],
        "results": rows,
    }
    if evaluation.fewshot:
        report["fewshot_results"] = [
            {
                "shots": result.name,
                "seeds": result.seeds,
                "num_labelled": result.num_labelled,
                "accuracies": result.accuracies,
                "regularizations": result.regularizations,
            }
            for result in evaluation.fewshot
        ]
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    if evaluation.fewshot:
        from lightly_msn.eval.plots import plot_few_shot

        plot_few_shot(
            evaluation.fewshot,
            output_dir / "fewshot.png",
            title=f"few-shot: {source}",
            knn_top1=max(
                (scores["top1"] for scores in evaluation.knn.values()), default=None
            ),
        )
    print(format_table(rows))
    print(f"results written to {output_dir}/")
    return 0


def result_rows(evaluation: FeatureEvaluation) -> list[dict[str, Any]]:
    """The rows of the results table: protocol, setting, metric, mean, std, runs."""
    rows = [
        _row("knn", f"k={k}", metric, value)
        for k, scores in evaluation.knn.items()
        for metric, value in scores.items()
    ]
    rows += [
        _row("retrieval", "test->train", metric, value)
        for metric, value in evaluation.retrieval.items()
    ]
    rows += [
        _row(
            "fewshot",
            result.name,
            "top1",
            result.mean,
            result.std,
            len(result.accuracies),
        )
        for result in evaluation.fewshot
    ]
    return rows


def _check_model_and_device(args: argparse.Namespace) -> None:
    if args.timm_weights and not args.timm:
        raise ValueError("--timm-weights is only used with --timm")
    if args.device is None:
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(
            f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {args.device}: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )


def _load_datasets(
    args: argparse.Namespace, transform: Any, img_size: int
) -> tuple[Dataset, Dataset]:
    """The train and test sets, labelled alike by class name and checked disjoint."""
    from lightly_msn.data import build_dataset, find_overlap, match_classes

    train_set = build_dataset(
        args.train, "train", transform=transform, img_size=img_size
    )
    test_set = build_dataset(args.test, "test", transform=transform, img_size=img_size)
    match_classes(test_set, train_set.classes)  # type: ignore[attr-defined]
    if args.allow_overlap:
        logger.warning("--allow-overlap: test images are not checked against train")
    elif overlaps := find_overlap(train_set, test_set):
        first = overlaps[0]
        relation = (
            "the same file as"
            if first.same_file
            else "a file with identical content to"
        )
        raise ValueError(
            f"{len(overlaps)} of {len(test_set)} test images are also train "  # type: ignore[arg-type]
            f"images, e.g. {first.test_file} is {relation} {first.train_file}; "
            f"{ALLOW_OVERLAP_HINT}"
        )
    if args.fewshot:
        _check_few_shot_sizes(args.fewshot, train_set)
    return train_set, test_set


def _check_folders(args: argparse.Namespace) -> None:
    """Splits and the same folder for both sets, before any image is read."""
    from lightly_msn.data import image_folder_root

    roots = [
        None if data in NAMED_DATASETS else image_folder_root(data, split)
        for data, split in ((args.train, "train"), (args.test, "test"))
    ]
    train_root, test_root = roots
    if args.allow_overlap or train_root is None or test_root is None:
        return
    if os.path.samefile(train_root, test_root):
        raise ValueError(
            f"--train and --test are the same folder {test_root}: every test image is "
            f"a train image; {ALLOW_OVERLAP_HINT}"
        )


def _check_few_shot_sizes(shots: list[Any], train_set: Dataset) -> None:
    """Every train class must hold the images that an int few-shot setting draws."""
    counts: Counter[int] = Counter(train_set.targets)  # type: ignore[attr-defined]
    classes = train_set.classes  # type: ignore[attr-defined]
    needed = max((shot for shot in shots if isinstance(shot, int)), default=0)
    for label, count in sorted(counts.items()):
        if count < needed:
            raise ValueError(
                f"--fewshot {needed}: train class {classes[label]!r} has {count} "
                f"images, fewer than the {needed} per class requested"
            )


def format_table(rows: list[dict[str, Any]]) -> str:
    """One plain-text table of all results."""
    header = f"{'protocol':<10} {'setting':<12} {'metric':<28} {'value':>16}"
    lines = [header, "-" * len(header)]
    for row in rows:
        value = f"{row['mean']:.2f}"
        if row["runs"] > 1:
            value += f" ± {row['std']:.2f}"
        lines.append(
            f"{row['protocol']:<10} {row['setting']:<12} {row['metric']:<28} "
            f"{value:>16}"
        )
    return "\n".join(lines)


def _row(
    protocol: str,
    setting: str,
    metric: str,
    mean: float,
    std: float = 0.0,
    runs: int = 1,
) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "setting": setting,
        "metric": metric,
        "mean": round(mean, 4),
        "std": round(std, 4),
        "runs": runs,
    }


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


RANDOM_INIT_SEED = 0


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    if args.checkpoint:
        from lightly_msn.model import load_backbone

        return load_backbone(args.checkpoint), args.checkpoint
    import timm

    from lightly_msn.checkpoint import timm_file_overlay

    if not timm.is_model(args.timm):
        raise ValueError(f"--timm {args.timm}: no such timm model")
    weights = getattr(args, "timm_weights", None)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if args.img_size:
        kwargs["img_size"] = args.img_size
    if weights:
        kwargs["pretrained_cfg_overlay"] = timm_file_overlay(weights)
    else:
        logger.warning(
            "evaluating %s with random weights (no --timm-weights), initialised "
            "with seed %d",
            args.timm,
            RANDOM_INIT_SEED,
        )
    # a fixed seed, so a random-initialisation baseline is the same in every run
    # (torch seeds its default generator at random per process)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            model = timm.create_model(args.timm, pretrained=bool(weights), **kwargs)
        except Exception as error:
            if not weights:
                raise
            raise _unloadable_weights(weights, args.timm, error) from None
    return model, f"timm:{args.timm}" + ("" if weights else " (random init)")


def _unloadable_weights(path: str, model_name: str, error: Exception) -> ValueError:
    from lightly_msn.checkpoint import describe_unloadable

    return ValueError(
        f"--timm-weights {path}: expected weights of the timm model {model_name} "
        f"(safetensors, a PyTorch state dict or a JAX .npz), found "
        f"{describe_unloadable(path, error)}"
    )


def _model_image_size(model: nn.Module) -> int:
    """The input side of the first patch embedding in ``model``, else 224."""
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if size is not None and not isinstance(module, nn.Identity):
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    return 224
