"""A run's generators as W&B model artifacts: each new best checkpoint (or the final one of a run without
evaluations) exported into a temporary folder and handed to the run's log (train/tracking.py), which knows W&B
but nothing of exports; and `checkpoints/best` sent where the run before this one stopped before W&B had it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from train.storage.layout import BEST, CHECKPOINTS
from train.storage.manifest import read_state, stop_on_write_failure


def log_generator(log, checkpoint: Path, step: int) -> None:
    """The generator of `checkpoint` (at `step`) to W&B as `generator-<run id>`, with its step and the evaluation
    that made it the best as metadata (aliases `best` and `step-N`); once per checkpoint, across resumes."""
    if not log.wants_model(checkpoint.name):
        return
    from train.sharing.export import export_generator  # imports huggingface_hub: not for a run without W&B

    with tempfile.TemporaryDirectory(prefix="generator-") as folder:
        with stop_on_write_failure(f"exporting {checkpoint.name}'s generator for W&B into {folder} (the temporary "
                                   f"folder: TMPDIR, or {tempfile.gettempdir()})", log.run_dir):
            exported, _, evaluation = export_generator(checkpoint, Path(folder) / "generator", name=log.run_dir.name)
        evaluation = evaluation or {}
        metadata = {"step": step, "checkpoint": checkpoint.name} | {
            key: value for key, value in evaluation.items() if key.startswith("eval/")}
        log.model(exported, f"generator-{log.wandb_run_id}", checkpoint.name, metadata,
                  (["best"] if evaluation else []) + [f"step-{step}"])


def log_best(log) -> None:
    """checkpoints/best's generator, where W&B does not have it yet: the best of a run preempted right after finding
    it, or of one whose artifact could not be written (a full disk) or that was killed."""
    best = log.run_dir / CHECKPOINTS / BEST
    if best.is_dir() and log.wants_model(best.resolve().name):
        target = best.resolve()
        log_generator(log, target, read_state(target)["progress"]["step"])
