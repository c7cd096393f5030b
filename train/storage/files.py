"""Durable writes of a run's files: whole or not at all, fsync'ed, and never through a symbolic link.

A link planted in run.dir (`.lock`, `metrics.jsonl`, a staging file) would otherwise redirect a
write to a file outside it; every file the run writes is opened here with O_NOFOLLOW, and a link
is refused by name. Without torch, like the other modules `python -m train` reads before it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from train.errors import RunError


def open_in_place(path: Path, flags: int, mode: int = 0o644) -> int:
    """`os.open` that refuses a symbolic link at `path` with a RunError saying what to do."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise link_refused(path) from None
        raise


def link_refused(path: Path) -> RunError:
    return RunError(f"{path} is a symbolic link; a run writes its files in place, never through a link (it could "
                    "overwrite a file elsewhere): delete the link, or choose another run.dir")


def write_file(path: Path, content: str | bytes) -> None:
    """Create or truncate `path` and write `content` durably (fsync'ed before it returns)."""
    descriptor = open_in_place(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content.encode() if isinstance(content, str) else content)
        file.flush()
        os.fsync(file.fileno())


def write_atomically(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` whole or not at all; a failed write takes its staging file with it."""
    staging = path.with_name(f".{path.name}.incomplete")
    try:
        write_file(staging, content)
        os.replace(staging, path)  # replaces a link at `path` itself, never its target
    except OSError:
        staging.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
