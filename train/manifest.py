"""Checkpoint folders on disk, without torch: their layout, the manifest that makes a folder a
checkpoint, verification, durable writes, and which checkpoint a run resumes from.

Kept apart from train/checkpoint.py (the tensors) so that `python -m train` can refuse a bad
`resume=` in a moment, before torch and the training code are imported (~7 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from train.config import ConfigError, RunError
from train.run_lock import LOCK_FILE

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.json"


class CheckpointError(RunError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


EXIT_WRITE_FAILED = 74  # EX_IOERR: a file of the run could not be written; the checkpoints already written are intact


class RunWriteError(OSError):
    """A file of the run could not be written (a full disk, a quota): the run stops, and says where it can resume."""


@contextmanager
def stop_on_write_failure(what: str, run_dir: Path, partial_folder: Path | None = None):
    """Turn a failed write (`what`: "writing <file>") into a RunWriteError that names the newest intact
    checkpoint; `partial_folder`, which the failed write leaves incomplete, is removed to give the space back."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as error:
        if partial_folder is not None:
            shutil.rmtree(partial_folder, ignore_errors=True)
        newest = newest_valid(run_dir, report=lambda _: None)
        raise RunWriteError(
            f"{what} failed ({error}){'; its partial folder is removed' if partial_folder else ''}. "
            + (f"The newest intact checkpoint is {newest}: " if newest else "There is no checkpoint yet: ")
            + "make room (or raise the quota) and start the same command again") from error


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders by step, oldest first (hidden `.incomplete_*` folders are not checkpoints)."""
    folder = checkpoints_dir(run_dir)
    return sorted(p for p in folder.glob("step_*") if p.is_dir()) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------- writing


def write_manifest(folder: Path) -> None:
    """Seal a fully written folder: the format version and the SHA-256 of every file in it."""
    files = sorted(p.name for p in folder.iterdir())
    write_json(folder / MANIFEST, {"format_version": FORMAT_VERSION,
                                   "sha256": {name: sha256(folder / name) for name in files}})


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1))
    fsync(path)


def write_atomically(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` whole or not at all; a failed write takes its staging file with it."""
    staging = path.with_name(f".{path.name}.incomplete")
    try:
        staging.write_bytes(content.encode() if isinstance(content, str) else content)
        fsync(staging)
        os.replace(staging, path)
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- reading


def verify(path: Path) -> dict:
    """Check that `path` is a complete checkpoint this code can read; return its manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir() or not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {MANIFEST} "
                              "(point at a folder such as <run.dir>/checkpoints/step_00001000)")
    try:
        manifest = json.loads(manifest_path.read_text())
        version, hashes = manifest["format_version"], manifest["sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_path} is damaged: not a checkpoint manifest") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written with checkpoint format version {version}; this code reads up "
                              f"to version {FORMAT_VERSION}: update the code to resume from it")
    for name, expected in hashes.items():
        if Path(name).name != name:
            raise CheckpointError(f"{manifest_path} names {name!r}, which is not a file of the checkpoint")
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing (listed in {MANIFEST})")
        if sha256(path / name) != expected:
            raise CheckpointError(f"{path / name} is damaged: its SHA-256 does not match {MANIFEST}")
    return manifest


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def newest_valid(run_dir: Path, report) -> Path | None:
    """The newest checkpoint in run_dir that verifies; each one skipped is reported with why."""
    for candidate in reversed(complete_checkpoints(run_dir)):
        try:
            verify(candidate)
            return candidate
        except CheckpointError as error:
            report(f"skipping checkpoint {candidate.name}: {error}")
    return None


def resolve(path: Path, report=print) -> Path:
    """A checkpoint folder as given, or the newest valid checkpoint of a run directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        verify(path)
        return path
    if checkpoints_dir(path).is_dir():
        found = newest_valid(path, report)
        if found is None:
            raise CheckpointError(f"{path} holds no valid checkpoint")
        return found
    raise CheckpointError(f"{path} is neither a checkpoint folder (with {MANIFEST}) nor a run directory "
                          f"(with {CHECKPOINTS}/)")


def resume_point(resume: str, run_dir: Path, report) -> Path | None:
    """The checkpoint a run continues from, per `resume`: auto, none, or a path (unless run.dir's newest valid
    checkpoint is further along: a requeued job continues from its own); None starts afresh."""
    run_dir = Path(run_dir)
    if resume == "none":
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise ConfigError(f"run.dir {str(run_dir)!r} is not empty and resume=none; choose another run.dir, "
                              "or resume=auto to continue the run in it")
        return None
    if resume != "auto":
        path = Path(resume)
        verify(path)
        newest = newest_valid(run_dir, report=lambda _: None)
        step = read_state(path)["progress"]["step"]
        newest_step = read_state(newest)["progress"]["step"] if newest is not None else step
        if newest_step <= step:
            return path
        # A requeued job continues from the checkpoint it wrote; going back would train over it.
        report(f"run.dir {str(run_dir)!r} already holds {newest.name} (step {newest_step}), further along than "
               f"resume={resume} (step {step}): continuing from it, as a requeued job must. To start again from "
               f"step {step}, use a new run directory (e.g. run.dir={run_dir}_from_step{step})")
        return newest
    complete = complete_checkpoints(run_dir)
    if not complete:
        return None
    found = newest_valid(run_dir, report)
    if found is None:
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(run_dir)} is valid (see above); nothing was "
                              "changed. Restore them, resume from a path with resume=..., or choose another run.dir")
    latest = complete[-1]
    if found != latest:
        report(f"resuming from {found.name}, the newest valid checkpoint (not {latest.name})")
    return found
