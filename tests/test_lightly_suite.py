"""lightly's own tests of the components we export, run against ours.

A drop-in must pass the tests of what it replaces. These tests take lightly's test
files from a lightly checkout, rewrite their imports of the components we export
to ours through one explicit mapping (``IMPORT_MAP``; every other name stays
lightly's), and run them with pytest in a subprocess::

    LIGHTLY_REPO=/path/to/lightly pytest tests/test_lightly_suite.py

``LIGHTLY_REPO`` is a lightly work tree or a bare git repository (read at
``HEAD``). Nothing of lightly's is stored in this repository; without the
variable the suite is skipped. The mapping itself is checked on every run.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LIGHTLY_REPO = os.environ.get("LIGHTLY_REPO")

# What a lightly test imports -> what it gets instead. A key is either a module that
# is imported as a name (``from lightly.loss import msn_loss``) or a name imported
# from a module (``from lightly.loss.msn_loss import MSNLoss``); a name is mapped
# only by its own key, never through its module's.
IMPORT_MAP: dict[str, str] = {
    # public import paths of the components we export
    "lightly.loss.MSNLoss": "lightly_msn.loss.MSNLoss",
    "lightly.loss.PMSNLoss": "lightly_msn.pmsn_loss.PMSNLoss",
    "lightly.loss.PMSNCustomLoss": "lightly_msn.pmsn_loss.PMSNCustomLoss",
    "lightly.loss.msn_loss.MSNLoss": "lightly_msn.loss.MSNLoss",
    "lightly.loss.msn_loss.prototype_probabilities": (
        "lightly_msn.loss.prototype_probabilities"
    ),
    "lightly.loss.msn_loss.sharpen": "lightly_msn.loss.sharpen",
    "lightly.loss.msn_loss.sinkhorn": "lightly_msn.loss.sinkhorn",
    "lightly.loss.pmsn_loss.PMSNLoss": "lightly_msn.pmsn_loss.PMSNLoss",
    "lightly.loss.pmsn_loss.PMSNCustomLoss": "lightly_msn.pmsn_loss.PMSNCustomLoss",
    "lightly.models.modules.heads.MSNProjectionHead": (
        "lightly_msn.heads.MSNProjectionHead"
    ),
    "lightly.models.utils.update_momentum": "lightly_msn.ema.update_momentum",
    "lightly.models.utils.random_token_mask": "lightly_msn.masking.random_token_mask",
    "lightly.transforms.MSNTransform": "lightly_msn.transforms.MSNTransform",
    "lightly.transforms.msn_transform.MSNTransform": (
        "lightly_msn.transforms.MSNTransform"
    ),
    "lightly.transforms.msn_transform.MSNViewTransform": (
        "lightly_msn.transforms.MSNViewTransform"
    ),
    "lightly.utils.scheduler.cosine_schedule": "lightly_msn.schedules.cosine_schedule",
    # modules the tests import as a name and use through attributes
    "lightly.loss.msn_loss": "lightly_msn.loss",
    "lightly.loss.pmsn_loss": "lightly_msn.pmsn_loss",
    "lightly.utils.scheduler": "lightly_msn.schedules",
    # the selected tests of test_ModelUtils.py use the module only for
    # utils.random_token_mask; any other attribute fails loudly
    "lightly.models.utils": "lightly_msn.masking",
}

# lightly test file -> pytest -k expression selecting the tests of what we export
# (None: the whole file)
LIGHTLY_TESTS: dict[str, str | None] = {
    "tests/loss/test_msn_loss.py": None,
    "tests/loss/test_pmsn_loss.py": None,
    # loops over all of lightly's heads, MSNProjectionHead (ours) among them
    "tests/models/test_ProjectionHeads.py": "test_single_projection_head",
    "tests/models/test_ModelUtils.py": "momentum or random_token_mask",
    "tests/transforms/test_msn_transform.py": None,
    "tests/utils/test_scheduler.py": "cosine_schedule",
}


def rewrite_imports(source: str) -> tuple[str, list[str]]:
    """Returns ``source`` with its imports mapped by ``IMPORT_MAP`` and the keys used.

    Every ``import``/``from ... import`` statement that imports a mapped name is
    replaced by one import per name, in place (so line numbers of the rest of the
    file only shift where a statement grows); unmapped names keep their import.
    """
    lines = source.splitlines(keepends=True)
    used: list[str] = []
    replacements: list[tuple[int, int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imports = [
                (f"{node.module}.{a.name}", a.asname or a.name) for a in node.names
            ]
        elif isinstance(node, ast.Import):
            imports = [(a.name, a.asname) for a in node.names]
        else:
            continue
        if not any(full in IMPORT_MAP for full, _ in imports):
            continue
        indent = re.match(r"\s*", lines[node.lineno - 1]).group()  # type: ignore[union-attr]
        statements = []
        for full, bound in imports:
            if full in IMPORT_MAP:
                used.append(full)
                target = IMPORT_MAP[full]
                if bound is None:  # plain `import a.b.c`: the name bound is `a`
                    raise ValueError(f"cannot map `import {full}` without `as`")
                module, _, name = target.rpartition(".")
                statements.append(f"from {module} import {name} as {bound}")
            elif isinstance(node, ast.ImportFrom):
                module, _, name = full.rpartition(".")
                alias = f" as {bound}" if bound != name else ""
                statements.append(f"from {module} import {name}{alias}")
            else:
                alias = f" as {bound}" if bound else ""
                statements.append(f"import {full}{alias}")
        text = "".join(f"{indent}{statement}\n" for statement in statements)
        replacements.append((node.lineno - 1, node.end_lineno or node.lineno, text))
    for start, end, text in sorted(replacements, reverse=True):
        lines[start:end] = [text]
    return "".join(lines), used


def test_rewrite_maps_only_the_listed_names() -> None:
    source = (
        "import torch\n"
        "from lightly.loss import msn_loss\n"
        "from lightly.models.modules.heads import (\n"
        "    BYOLProjectionHead,\n"
        "    MSNProjectionHead,\n"
        ")\n"
        "def f():\n"
        "    from lightly.models.utils import update_momentum as um, batch_shuffle\n"
    )
    rewritten, used = rewrite_imports(source)
    assert rewritten == (
        "import torch\n"
        "from lightly_msn import loss as msn_loss\n"
        "from lightly.models.modules.heads import BYOLProjectionHead\n"
        "from lightly_msn.heads import MSNProjectionHead as MSNProjectionHead\n"
        "def f():\n"
        "    from lightly_msn.ema import update_momentum as um\n"
        "    from lightly.models.utils import batch_shuffle\n"
    )
    assert sorted(used) == [
        "lightly.loss.msn_loss",
        "lightly.models.modules.heads.MSNProjectionHead",
        "lightly.models.utils.update_momentum",
    ]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("lightly_name, ours", sorted(IMPORT_MAP.items()))
def test_import_map_pairs_existing_objects(lightly_name: str, ours: str) -> None:
    def resolve(dotted: str) -> object:
        try:
            return importlib.import_module(dotted)
        except ModuleNotFoundError:
            module, _, name = dotted.rpartition(".")
            return getattr(importlib.import_module(module), name)

    theirs, mine = resolve(lightly_name), resolve(ours)
    assert type(theirs) is type(mine) or (
        isinstance(theirs, type) and isinstance(mine, type)
    ), (lightly_name, ours)


def _read_lightly_file(repo: Path, path: str) -> str | None:
    """A file of the lightly checkout (work tree, or bare repository at HEAD)."""
    if (repo / "tests").is_dir():
        file = repo / path
        return file.read_text() if file.is_file() else None
    shown = subprocess.run(
        ["git", f"--git-dir={repo}", "show", f"HEAD:{path}"],
        capture_output=True,
        text=True,
    )
    return shown.stdout if shown.returncode == 0 else None


def _support_files(path: str, source: str) -> list[str]:
    """Files of the lightly checkout that the test module ``path`` may need.

    Its packages' ``__init__.py`` and ``conftest.py`` files, and every module of
    lightly's ``tests`` package it imports (``from tests.helpers import ...``,
    ``from .. import helpers``). Candidates that do not exist are skipped by the
    caller: ``from tests import x`` may name a module or an attribute.
    """
    package = Path(path).parent.parts  # ("tests", "loss"), ...
    candidates = [
        "/".join(package[:depth] + (name,))
        for depth in range(1, len(package) + 1)
        for name in ("__init__.py", "conftest.py")
    ]
    for node in ast.walk(ast.parse(source)):
        modules: list[tuple[str, ...]] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative to the test's package
                base = package[: len(package) - node.level + 1]
            else:
                base = ()
            module = base + (tuple(node.module.split(".")) if node.module else ())
            if module[:1] == ("tests",):
                modules = [module] + [module + (a.name,) for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [
                tuple(a.name.split("."))
                for a in node.names
                if a.name.split(".")[0] == "tests"
            ]
        candidates += ["/".join(module) + ".py" for module in modules]
    return candidates


def _copy_lightly_tests(repo: Path, destination: Path) -> dict[str, list[str]]:
    """Copies the selected test files and what they import; returns the keys used."""
    used: dict[str, list[str]] = {}
    pending = list(LIGHTLY_TESTS)
    seen: set[str] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        source = _read_lightly_file(repo, path)
        if source is None:
            if path in LIGHTLY_TESTS:
                pytest.fail(f"{path} not found in the lightly checkout {repo}")
            continue  # not every package has an __init__.py or a conftest.py
        rewritten, used[path] = rewrite_imports(source)
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(rewritten)
        pending += _support_files(path, source)
    return used


@pytest.fixture(scope="module")
def lightly_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LIGHTLY_REPO:
        pytest.skip(
            "LIGHTLY_REPO is not set: point it to a lightly checkout to run "
            "lightly's tests against lightly_msn"
        )
    repo = Path(LIGHTLY_REPO)
    if not repo.is_dir():
        pytest.fail(f"LIGHTLY_REPO={LIGHTLY_REPO} is not a directory")
    destination = tmp_path_factory.mktemp("lightly_tests")
    used = _copy_lightly_tests(repo, destination)
    for path in LIGHTLY_TESTS:
        # otherwise the file would test lightly, not us
        assert used[path], f"{path}: no import was mapped to lightly_msn"
    return destination


@pytest.mark.parametrize("path", list(LIGHTLY_TESTS))
def test_lightly_tests_pass_against_ours(lightly_tests: Path, path: str) -> None:
    selection = LIGHTLY_TESTS[path]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    if selection is not None:
        command += ["-k", selection]
    environment = dict(os.environ)
    # the copied `tests` package first, then this repository's lightly_msn
    environment["PYTHONPATH"] = os.pathsep.join([str(lightly_tests), str(REPO_ROOT)])
    result = subprocess.run(
        command, cwd=lightly_tests, env=environment, capture_output=True, text=True
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"{path}: {summary}")
    assert result.returncode == 0, f"{path}: {summary}\n{result.stdout}{result.stderr}"
    assert " passed" in summary and "failed" not in summary, summary
    shutil.rmtree(lightly_tests / ".pytest_cache", ignore_errors=True)
