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
import sys
from collections.abc import Sequence

from lightly_msn import __version__


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

    commands.add_parser(
        "pretrain",
        help="MSN pretraining (LightningCLI: see 'lightly-msn pretrain --help')",
        add_help=False,
    )
    _add_eval_arguments(
        commands.add_parser("eval", help="kNN / retrieval / few-shot evaluation")
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

        return run_eval_cli(args)
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
