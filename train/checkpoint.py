"""Checkpoints as folders of safetensors files, written so that a crash never leaves a bad one.

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into
place; the `latest` marker moves only after that. A folder named like a checkpoint is complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def existing_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS
    return sorted(p for p in folder.glob("step_*") if p.is_dir()) if folder.is_dir() else []


def save(run_dir: Path, step: int, modules: dict[str, nn.Module]) -> Path:
    """Write `<name>.safetensors` for each module into `<run_dir>/checkpoints/step_N` atomically."""
    folder = run_dir / CHECKPOINTS
    final = folder / checkpoint_name(step)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; it is never overwritten")
    staging = folder / f".incomplete_{checkpoint_name(step)}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash: never valid, safe to discard
    staging.mkdir(parents=True)
    for name, module in modules.items():
        tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
        save_file(tensors, staging / f"{name}.safetensors")
        _fsync(staging / f"{name}.safetensors")
    _fsync(staging)
    os.rename(staging, final)
    _fsync(folder)
    _write_atomically(folder / LATEST, final.name + "\n")
    return final


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.incomplete")
    staging.write_text(text)
    _fsync(staging)
    os.replace(staging, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
