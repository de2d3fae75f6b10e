import subprocess
import sys

import pytest

from lightly_msn import __version__
from lightly_msn.cli import main


def test_version_flag_prints_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightly-msn {__version__}"


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "pretrain", "eval"):
        assert command in out


def test_console_script_runs_as_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightly_msn", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert __version__ in result.stdout
    # the parser must not pull in torch: --version should be instant
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lightly_msn.cli; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"


def test_unknown_public_name_raises_attribute_error() -> None:
    import lightly_msn

    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        lightly_msn.NotAThing  # noqa: B018


def test_every_public_name_resolves_to_its_module() -> None:
    import importlib

    import lightly_msn

    assert lightly_msn.__all__ == ["__version__", *lightly_msn._EXPORTS]
    for name, module in lightly_msn._EXPORTS.items():
        value = getattr(lightly_msn, name)
        assert value is getattr(importlib.import_module(module), name)
