"""Tensors cached on disk (test-set features, feature networks trained for a data set, decoded pictures): written
whole with the SHA-256 of their tensors, read back only if they still match it; a cache that cannot be used is only a
warning, and the caller computes the tensors again."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import warnings
from pathlib import Path

import safetensors.torch
from safetensors import safe_open
from torch import Tensor


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


EVAL_CACHE = "eval.cache_dir (train.evaluate's --cache-dir)"
# The cache-directory tag (bford.info/cachedir): backup tools skip the folder, and image folders never read it as data.
CACHE_TAG = "CACHEDIR.TAG"
TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
            "# A cache of mnist-gan (decoded pictures, features, feature networks): safe to delete.\n")
STAGED = ".incomplete"  # a cache file being written: .<name>.<host>.<pid>.incomplete
STAGED_MAX_AGE_S = 86400  # a staged file this old is a dead writer's, on whichever machine it ran


def write(path: Path, tensors: dict[str, Tensor], what: str, metadata: dict[str, str] | None = None,
          setting: str = EVAL_CACHE) -> bool:
    """Cache `tensors` (`what` they are, for the warning) with their SHA-256 and `metadata`; whether it was written.
    One that cannot be written is a warning, which names the `setting` that moves the cache: the work goes on, and
    is done again next time. Staged files that dead writers left in the folder are removed first."""
    tensors = {name: tensor.cpu().contiguous() for name, tensor in tensors.items()}
    staging = path.with_name(f".{path.name}.{_host()}.{os.getpid()}{STAGED}")
    try:  # written by Python, so that a full disk or a read-only cache is an OSError
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.parent / CACHE_TAG).is_file():
            (path.parent / CACHE_TAG).write_text(TAG_TEXT)
        remove_dead_writers_files(path.parent)
        staging.write_bytes(safetensors.torch.save(tensors, metadata={**(metadata or {}),
                                                                      "sha256": tensors_sha256(tensors)}))
        os.replace(staging, path)  # atomic: concurrent runs never read a half-written cache
    except OSError as error:
        with contextlib.suppress(OSError):  # e.g. eval.cache_dir is a file: there is no staging file
            staging.unlink()
        warnings.warn(f"could not cache the {what} in {path} ({error}); a writable {setting} saves the time they "
                      "take", stacklevel=3)
        return False
    return True


def remove_dead_writers_files(folder: Path) -> None:
    """Staged files of writers that are gone: of this machine's processes that no longer run, or older than a day."""
    host = _host()
    for staged in folder.glob(f".*{STAGED}"):
        *_, writer_host, pid = staged.name.removesuffix(STAGED).rsplit(".", 2)
        with contextlib.suppress(OSError):
            if (writer_host == host and pid.isdigit() and not _running(int(pid))
                    or time.time() - staged.stat().st_mtime > STAGED_MAX_AGE_S):
                staged.unlink()


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # the staged name's fields are split at dots


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read(path: Path, what: str, expected: dict[str, str] | None = None,
         needed: tuple[str, ...] = ()) -> dict[str, Tensor] | None:
    """The cached tensors if the file is whole, its tensors match the SHA-256 it was written with, its metadata
    has the `expected` entries and it holds the `needed` tensors; None (after a warning) for a damaged, edited or
    other cache. None, silently, where there is no file."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            # Copied out of the memory map: a cache cut short in place later cannot fault the run.
            tensors = {name: file.get_tensor(name).clone() for name in file.keys()}
        mismatched = [key for key, value in (expected or {}).items() if metadata.get(key) != value]
        if "sha256" not in metadata:
            problem = "it carries no SHA-256 of its tensors (written by an older version)"
        elif metadata["sha256"] != tensors_sha256(tensors):
            problem = "its tensors do not match the SHA-256 it was written with"
        elif mismatched:
            problem = f"its {', '.join(mismatched)} is not this one's"
        elif missing := [name for name in needed if name not in tensors]:
            problem = f"it holds no {', '.join(missing)} (written by another version)"
        else:
            return tensors
    except Exception as error:  # safetensors' own error for a cut-short or garbled file
        problem = f"it cannot be read ({error})"
    warnings.warn(f"not using the cached {what} {path}: {problem}; computing them again", stacklevel=3)
    return None
