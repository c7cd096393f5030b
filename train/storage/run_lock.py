"""One run at a time in a run.dir: a lock that the first rank holds from before the resume point is chosen
until it exits.

Two runs in one run.dir (a batch job submitted twice, `make train` in two terminals) would resume
from the same checkpoint, mix their lines in metrics.jsonl, clear it on a fresh start, and fail
at the first checkpoint the other had written. The lock is a POSIX record lock (fcntl), which the
kernel, or the NFS server, drops when its process dies: a killed run leaves no stale lock. Without
torch, like manifest.py, so that a busy run.dir is reported at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from train.errors import RunError
from train.storage.files import open_in_place

LOCK_FILE = ".lock"


@contextmanager
def exclusive(run_dir: Path, report) -> Iterator[None]:
    """Hold run_dir's lock; folders made here are removed again if nothing else was written into them."""
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # the deepest first
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = _lock(path, report)
    except OSError as error:
        _remove_empty(made)
        raise RunError(f"cannot write into run.dir {str(run_dir)!r} ({error.strerror}); "
                       "choose a run.dir where you may write") from None
    try:
        yield
    finally:
        if descriptor is not None:
            path.unlink(missing_ok=True)  # while held: a run that opened it meanwhile finds it gone and retries
            os.close(descriptor)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Each folder in turn, deepest first, where empty: all of them, also past one that is not (`a/stray/../b`
    made `a/stray` and `a/b`, and `a/stray/..` is `a`, not yet empty when its turn comes)."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _lock(path: Path, report) -> int | None:
    """The descriptor of the locked file, naming its holder; None where the filesystem has no locks."""
    while True:
        descriptor = open_in_place(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                try:
                    holder = path.read_text().strip()
                except FileNotFoundError:  # it has just ended
                    holder = ""
                raise RunError(f"run.dir {str(path.parent)!r} is in use by another run ({holder or 'starting'}); "
                               "wait for it to end, or choose another run.dir. Should that run be gone (an NFS "
                               f"server can keep a failed node's lock), delete {path}") from None
            report(f"warning: cannot lock {path} ({error.strerror}, e.g. Lustre mounted without flock): "
                   "a second run started in this run.dir would not be stopped")
            return None
        try:
            if os.path.samestat(os.stat(path), os.fstat(descriptor)):
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)  # the run that held it removed it after we opened it: lock the new file
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%F %T %Z')}".encode())
    return descriptor
