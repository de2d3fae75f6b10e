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
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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
    source.add_argument(
        "--checkpoint",
        type=_existing_file,
        help="MSN checkpoint (.ckpt of lightly-msn pretrain) or exported backbone "
        "(.safetensors) (default: none; give --checkpoint or --timm)",
    )
    source.add_argument(
        "--timm",
        help="name of a timm model to evaluate, random init unless --timm-weights, no "
        "download (default: none; give --checkpoint or --timm)",
    )
    parser.add_argument(
        "--timm-weights",
        type=_existing_file,
        default=None,
        help="local weights file for --timm: safetensors, PyTorch state dict or JAX "
        ".npz (default: none, random weights)",
    )
    parser.add_argument(
        "--train",
        required=True,
        type=_dataset,
        help="labelled train set: an ImageFolder (its train/ split if it has one), "
        "'cifar10' or 'digits'",
    )
    parser.add_argument(
        "--test",
        required=True,
        type=_dataset,
        help="test set: an ImageFolder (its test/ split if it has one), 'cifar10' or "
        "'digits'; its classes must be train classes (matched by name)",
    )
    parser.add_argument(
        "--allow-overlap",
        action="store_true",
        help="allow test images that are train images (the same folder, file or "
        "bytes), for a deliberate evaluation on the train set",
    )
    parser.add_argument("--knn", action="store_true", help="faiss kNN classification")
    parser.add_argument(
        "--fewshot",
        type=_few_shot_settings,
        default=None,
        help="comma separated few-shot settings, images per class or percent of the "
        "train set, e.g. 1,2,5,1%%; without --knn, --retrieval and --fewshot all "
        "three run (default: none; 1,2,5,1%% when all three run)",
    )
    parser.add_argument("--retrieval", action="store_true", help="MAP@R, P@1, R-P")
    parser.add_argument(
        "--img-size",
        type=_positive_int,
        default=None,
        help="side of the resized and centre-cropped images (default: the model's "
        "input size)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=256, help="images per forward pass"
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        help="few-shot draws per setting (seeds 0 .. N-1)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--output-dir",
        type=_output_dir,
        default="runs/eval",
        help="where results.csv, results.json and fewshot.png are written",
    )


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends every option's help with its default, or with "(required)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if "(default" in text or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _few_shot_settings(value: str) -> list[int | float]:
    from lightly_msn.eval.fewshot import parse_shots

    try:
        return parse_shots(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _existing_file(value: str) -> str:
    if not Path(value).expanduser().is_file():
        kind = "a folder, not a file" if Path(value).is_dir() else "no such file"
        raise argparse.ArgumentTypeError(f"{value}: {kind}")
    return value


def _dataset(value: str) -> str:
    if value not in ("cifar10", "digits") and not Path(value).expanduser().is_dir():
        raise argparse.ArgumentTypeError(
            f"no such folder: {value} (expected an ImageFolder, 'cifar10' or 'digits')"
        )
    return value


def _output_dir(value: str) -> str:
    path = Path(value).expanduser().absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value}: {existing} is not writable")
    return value


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
        commands.add_parser(
            "eval",
            help="kNN / retrieval / few-shot evaluation",
            formatter_class=_DefaultsHelpFormatter,
        )
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

        try:
            return run_eval_cli(args)
        except (ValueError, OSError) as error:
            # what users get wrong (data, checkpoints, files): one line, no traceback
            lines = [line.strip() for line in str(error).splitlines()]
            message = " ".join(line for line in lines if line) or type(error).__name__
            print(f"lightly-msn eval: error: {message}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
