"""The ``lightly-msn`` command line.

Subcommands:

- ``demo``: pretrain a small ViT with MSN on scikit-learn's bundled digits (no download,
  CPU friendly) and compare its kNN accuracy with the same ViT at random initialisation.
- ``pretrain``: MSN pretraining on an image folder, CIFAR-10 or the bundled digits.
- ``eval``: kNN, retrieval and few-shot evaluation of a checkpoint or a timm model.

The parser is built without importing torch so ``--help`` and ``--version`` are instant;
each subcommand imports its implementation when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightly_msn import __version__


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="digits",
        help="an ImageFolder path, 'cifar10' (with --data-dir: a local ImageFolder or "
        "torchvision download root) or 'digits' (bundled with scikit-learn, default)",
    )
    parser.add_argument("--data-dir", default=None, help="root for --data cifar10")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/msn", help="checkpoints, logs")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--on-bad-image",
        choices=("skip", "fail"),
        default="fail",
        help="what to do with unreadable image files",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument(
        "--warmup-epochs", type=float, default=0.0, help="learning rate warm-up"
    )
    parser.add_argument(
        "--mask-ratio",
        type=float,
        default=None,
        help="patch drop ratio of the anchor views (default: the paper's for --model)",
    )
    parser.add_argument("--focal-views", type=int, default=10)
    parser.add_argument("--num-prototypes", type=int, default=1024)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="MSN checkpoint or exported backbone")
    source.add_argument(
        "--timm", help="name of a timm model to evaluate (random init, no download)"
    )
    parser.add_argument(
        "--timm-weights", default=None, help="local weights file for --timm"
    )
    parser.add_argument("--train", required=True, help="labelled train ImageFolder")
    parser.add_argument("--test", required=True, help="test ImageFolder")
    parser.add_argument("--knn", action="store_true", help="faiss kNN classification")
    parser.add_argument(
        "--fewshot", default=None, help="comma separated shots, e.g. 1,2,5,1%%"
    )
    parser.add_argument("--retrieval", action="store_true", help="MAP@R, P@1, R-P")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output-dir", default="runs/eval")


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of ``lightly-msn``."""
    parser = argparse.ArgumentParser(
        prog="lightly-msn",
        description="Masked Siamese Networks (MSN) for lightly: pretrain, evaluate.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="offline MSN demo on scikit-learn digits (no download, CPU)"
    )
    demo.add_argument("--epochs", type=int, default=None, help="override the default")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)

    _add_pretrain_arguments(commands.add_parser("pretrain", help="MSN pretraining"))
    _add_eval_arguments(
        commands.add_parser("eval", help="kNN / retrieval / few-shot evaluation")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightly-msn`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from lightly_msn.demo import run_demo

        return run_demo(args)
    if args.command == "pretrain":
        from lightly_msn.train import run_pretrain_cli

        return run_pretrain_cli(args)
    if args.command == "eval":
        from lightly_msn.eval.cli import run_eval_cli

        return run_eval_cli(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
