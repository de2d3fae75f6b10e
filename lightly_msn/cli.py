"""The ``lightly-msn`` command line.

Subcommands:

- ``demo``: pretrain a small ViT with MSN on scikit-learn's bundled digits (no download,
  CPU friendly) and compare its kNN accuracy with the same ViT at random initialisation.
- ``pretrain``: MSN pretraining on an image folder, CIFAR-10 or the bundled digits,
  on Lightning's ``LightningCLI`` (``--config``, ``--print_config``, ``--trainer.*``).
- ``eval``: kNN, retrieval and few-shot evaluation of a checkpoint or a timm model.

The top-level parser is built without importing torch so ``--help`` and
``--version`` are instant; each subcommand imports its implementation when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lightly_msn import __version__


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

    commands.add_parser(
        "pretrain",
        help="MSN pretraining (LightningCLI: see 'lightly-msn pretrain --help')",
        add_help=False,
    )
    _add_eval_arguments(
        commands.add_parser(
            "eval",
            help="kNN / retrieval / few-shot evaluation",
            formatter_class=_DefaultsHelpFormatter,
        )
    )
    convert = commands.add_parser(
        "convert-config",
        help="translate an official MSN YAML config into a 'pretrain --config' file",
        description="Translate a config of the official MSN code "
        "(configs/pretrain/msn_vits16.yaml) into a 'lightly-msn pretrain --config' "
        "file; untranslated keys are listed as comments.",
    )
    convert.add_argument("official", help="the official YAML config")
    convert.add_argument(
        "-o", "--output", default=None, help="write here instead of to stdout"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightly-msn`` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["pretrain"]:
        # LightningCLI parses the rest: --model.*, --data.*, --trainer.*, --config
        from lightly_msn.pretrain_cli import run_pretrain_cli

        return run_pretrain_cli(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from lightly_msn.demo import run_demo

        return run_demo(args)
    if args.command == "convert-config":
        return _convert_config(args)
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


def _convert_config(args: argparse.Namespace) -> int:
    from lightly_msn.official_config import convert_official_file

    try:
        text = convert_official_file(args.official)
    except (ValueError, OSError) as error:
        print(f"lightly-msn convert-config: error: {error}", file=sys.stderr)
        return 2
    if args.output is None:
        print(text, end="")
        return 0
    from lightly_msn.files import atomic_write_text

    atomic_write_text(args.output, text)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
