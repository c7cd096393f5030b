"""Stopping at a quality target: `train.stop_at_fd` and `train.patience` end a run with exit 0, the checkpoint
of that step written, and a resumed run that already met its target does nothing."""

import json
import os

import pytest

from conftest import TINY, logged_metrics, run_train, snapshot_files

EVALUATING = TINY + ["train.steps=40", "eval.every=5", "eval.num_samples=100", "checkpoint.every=0"]


def test_a_run_stops_at_its_fd_target_with_best_and_latest_there_and_a_resume_does_nothing(tmp_path, eval_cache):
    run_dir = tmp_path / "run"
    command = EVALUATING + [f"run.dir={run_dir}", f"eval.cache_dir={eval_cache}", "train.stop_at_fd=1e6"]
    result = run_train(command)
    assert result.returncode == 0, result.stderr[-2000:]
    fd = logged_metrics(run_dir)[-1]["eval/fd"]
    assert [line["step"] for line in logged_metrics(run_dir)] == [3, 5]  # logging.every=3; stopped at step 5
    assert f"step 5: FD {fd:.4g} reached train.stop_at_fd=1e+06: stopping; checkpoints/latest is step_00000005" \
        in result.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000005" == os.readlink(checkpoints / "best")
    assert json.loads((checkpoints / "best" / "state.json").read_text())["progress"]["best_fd"] == fd
    before = snapshot_files(run_dir)
    again = run_train(command)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"nothing to train: {checkpoints / 'step_00000005'} has an FD of {fd:.4g}, at or below "
            "train.stop_at_fd=1e+06") in again.stdout
    assert snapshot_files(run_dir) == before


def test_patience_stops_after_that_many_evaluations_without_a_lower_fd(tmp_path, eval_cache):
    """Learning rates of 1e-30 leave every weight as it is (below float32's resolution), so every evaluation
    scores the first one's FD exactly: a new best at step 5, none at 10 and 15."""
    run_dir = tmp_path / "run"
    command = EVALUATING + [f"run.dir={run_dir}", f"eval.cache_dir={eval_cache}", "train.patience=2",
                            "optim.g_lr=1e-30", "optim.d_lr=1e-30"]
    result = run_train(command)
    assert result.returncode == 0, result.stderr[-2000:]
    fds = [line["eval/fd"] for line in logged_metrics(run_dir) if "eval/fd" in line]
    assert len(fds) == 3 and len(set(fds)) == 1
    assert "step 15: 2 evaluations without a lower FD (train.patience=2): stopping" in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000015"
    assert os.readlink(run_dir / "checkpoints" / "best") == "step_00000005"
    again = run_train(command)
    assert again.returncode == 0 and "ended 2 evaluations without a lower FD (train.patience=2)" in again.stdout


@pytest.mark.parametrize("overrides, message", [
    (["train.stop_at_fd=12", "eval.num_samples=0"], "train.stop_at_fd=12.0 needs evaluations during training: set "
                                                    "eval.every"),
    (["train.patience=3"], "train.patience=3 needs evaluations during training"),  # eval.every=0: only at the end
    (["train.stop_at_fd=-1", "eval.every=5"], "config key 'train.stop_at_fd' is -1.0; it must be greater than 0"),
    (["train.stop_at_fd=nan", "eval.every=5"], "config key 'train.stop_at_fd' is nan; it must be a finite number"),
    (["train.patience=0", "eval.every=5"], "config key 'train.patience' is 0; it must be 1 or more"),
])
def test_an_impossible_quality_target_is_refused_before_any_work(tmp_path, overrides, message):
    from train.config import load
    from train.errors import ConfigError
    with pytest.raises(ConfigError) as error:
        load("configs/smoke.yaml", [f"run.dir={tmp_path / 'run'}", *overrides])
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()
