"""Writing files so that a crash never leaves a torn one.

Every file the package writes (checkpoints, the exported backbone, CSV metrics, plots,
configs and evaluation results) goes through :func:`atomic_path`: the content is
written to a temporary file in the same folder, flushed to disk, and renamed over the
final path. A rename within one folder is atomic on POSIX and Windows file systems,
so a crash at any byte (a kill, a full disk) leaves either the old file or the new
one. Staging in the system's temporary folder would not do: it is often another file
system, where the final move is a copy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it to ``path`` on success.

    The caller writes the whole file to the yielded path. If the block raises, the
    temporary file is removed and ``path`` is left as it was.

    Examples:
        >>> with atomic_path("metrics.csv") as tmp:
        ...     tmp.write_text("step,loss\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _flush_to_disk(path: Path) -> None:
    # without fsync a power loss after the rename can leave an empty file behind
    with path.open("rb+") as file:
        os.fsync(file.fileno())
