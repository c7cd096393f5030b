"""What a run directory holds, and the check, before any work, that each of its names is what the run will
write into: a file where it writes a file, a folder where it keeps a folder, and no link that would carry a
write outside run.dir. The one link allowed is `checkpoints/` itself, to keep the heavy files on another file
system (a scratch space): a link a person makes on purpose. Without torch, like the other modules `python -m
train` reads before it imports anything slow.
"""

from __future__ import annotations

import os
from pathlib import Path

from train.errors import RunError
from train.storage.files import link_refused

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
WANDB_SENT = "wandb_sent.json"  # what W&B has of the run: the last history step of a closed run, the artifacts
SAMPLES_DIR = "samples"
PROFILE_DIR = "profile"
WANDB_DIR = "wandb"
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # checkpoints/latest: the name of the newest checkpoint
BEST = "best"  # checkpoints/best: a link to the checkpoint with the lowest FD of the run; keep_last never deletes it

FILES = (CONFIG_FILE, METRICS_FILE, CURVES_FILE, WANDB_SENT, f"{CHECKPOINTS}/{LATEST}")
FOLDERS = (SAMPLES_DIR, PROFILE_DIR, WANDB_DIR, CHECKPOINTS)
MAY_BE_A_LINK = (CHECKPOINTS,)


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` is (or was) a run directory: the config a run writes beside its metrics or checkpoints."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and ((folder / METRICS_FILE).is_file() or (folder / CHECKPOINTS).is_dir())


def check(run_dir: Path) -> None:
    """Refuse, by name, anything planted in run_dir where the run writes (RunError: exit 2, nothing written)."""
    run_dir = Path(run_dir)
    for name in FILES + FOLDERS:
        path = run_dir / name
        if path.is_symlink() and name not in MAY_BE_A_LINK:
            raise link_refused(path)
        if path.is_symlink() and not path.exists():
            raise RunError(f"{path} is a link to {os.readlink(path)}, which does not exist: make that folder, or "
                           "remove the link")
        if name in FILES and path.is_dir():
            raise RunError(f"{path} is a folder where the run writes a file: move it away, or choose another run.dir")
        if name in FOLDERS and path.exists() and not path.is_dir():
            raise RunError(f"{path} is a file where the run keeps a folder: move it away, or choose another run.dir")
    check_best_link(run_dir)


def check_best_link(run_dir: Path, new_best: str | None = None) -> None:
    """checkpoints/best is the run's link or nothing; a folder or file planted there is left as it is."""
    best = Path(run_dir) / CHECKPOINTS / BEST
    if best.exists() and not best.is_symlink():
        raise RunError(f"{best} is not the link a run keeps to its best checkpoint; move it away (it is left as it "
                       "is) and resume" + (f": the new best is {new_best}" if new_best else ""))
