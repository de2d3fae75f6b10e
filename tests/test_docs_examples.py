"""Executes every ``python`` code block of README.md and docs/**/*.md.

Blocks of one file run in order in one namespace (a page is one script), inside a
temporary working directory. A block preceded by the line ``<!-- illustrative -->`` is
only shown, not run; there should be few of those.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ILLUSTRATIVE = "<!-- illustrative -->"
_FENCE = re.compile(r"^```python\s*$")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """Returns ``(first_line, code, illustrative)`` per python fence in ``text``."""
    lines = text.splitlines()
    blocks: list[tuple[int, str, bool]] = []
    index = 0
    while index < len(lines):
        if _FENCE.match(lines[index]):
            previous = next(
                (line.strip() for line in reversed(lines[:index]) if line.strip()), ""
            )
            start = index + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"unterminated python block at line {index + 1}")
            blocks.append(
                (start + 1, "\n".join(lines[start:end]), previous == ILLUSTRATIVE)
            )
            index = end
        index += 1
    return blocks


FILES_WITH_BLOCKS = [
    path
    for path in _markdown_files()
    if path.exists() and python_blocks(path.read_text(encoding="utf-8"))
]


def test_block_parser_finds_blocks_and_markers() -> None:
    text = "x\n```python\na = 1\n```\n<!-- illustrative -->\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [(3, "a = 1", False), (7, "b = 2", True)]


def test_block_parser_rejects_unterminated_block() -> None:
    with pytest.raises(ValueError, match="unterminated python block at line 1"):
        python_blocks("```python\na = 1\n")


@pytest.mark.parametrize(
    "path", FILES_WITH_BLOCKS, ids=[str(p.relative_to(ROOT)) for p in FILES_WITH_BLOCKS]
)
def test_markdown_python_blocks_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    relative = path.relative_to(ROOT)
    for first_line, code, illustrative in python_blocks(path.read_text("utf-8")):
        if illustrative:
            continue
        # pad with newlines so tracebacks point at the markdown line numbers
        source = "\n" * (first_line - 1) + code
        exec(compile(source, str(relative), "exec"), namespace)  # noqa: S102
    assert os.getcwd() == str(tmp_path)
