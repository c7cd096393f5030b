"""Tensors cached on disk (test-set features, feature networks trained for a data set, decoded pictures): written
whole with the SHA-256 of their tensors, read back only if they still match it; a cache that cannot be used is only a
warning, and the caller computes the tensors again."""

from __future__ import annotations

import contextlib
import hashlib
import os
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


def write(path: Path, tensors: dict[str, Tensor], what: str, metadata: dict[str, str] | None = None,
          setting: str = EVAL_CACHE) -> None:
    """Cache `tensors` (`what` they are, for the warning) with their SHA-256 and `metadata`; one that cannot be
    written is a warning, which names the `setting` that moves the cache: the work goes on, and is done again next
    time."""
    tensors = {name: tensor.cpu().contiguous() for name, tensor in tensors.items()}
    staging = path.with_name(f".{path.name}.{os.getpid()}.incomplete")
    try:  # written by Python, so that a full disk or a read-only cache is an OSError
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.write_bytes(safetensors.torch.save(tensors, metadata={**(metadata or {}),
                                                                      "sha256": tensors_sha256(tensors)}))
        os.replace(staging, path)  # atomic: concurrent runs never read a half-written cache
    except OSError as error:
        with contextlib.suppress(OSError):  # e.g. eval.cache_dir is a file: there is no staging file
            staging.unlink()
        warnings.warn(f"could not cache the {what} in {path} ({error}); a writable {setting} saves the time they "
                      "take", stacklevel=3)


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
