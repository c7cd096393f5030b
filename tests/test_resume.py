"""Preempted at any step, a run resumes to bitwise the same weights and optimizer states."""

import json
import os

import pytest

from conftest import all_state, assert_bitwise_equal, logged_metrics, run_train, run_with_fault
from train.errors import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
STEPS = 30
CONDITIONAL = "model.conditional=true"


def tiny_run(tiny_mnist, run_dir, *extra):
    # 96 images at global batch 8 (1 process) or 16 (2 processes): epochs of 12 or 6 steps. Lazy R1 on
    # every 3rd step: the preemptions fall between, so the schedule must follow the global step.
    return ["model.arch=seed", "data.batch_size=8", f"data.path={tiny_mnist}", f"train.steps={STEPS}",
            "loss.r1_gamma=1", "loss.r1_every=3",
            "checkpoint.every=10", "train.check_every=1", "logging.every=4", "logging.samples_every=0",
            "logging.wandb=disabled", "logging.curves=false", "train.cpu=true", "eval.num_samples=0",
            "ema.statistics_images=64", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_mnist, tmp_path_factory):
    """The final state of an uninterrupted run on 1 or 2 processes, with the extra overrides given; each run once."""
    runs = {}

    def final_state(processes: int, *extra: str) -> dict:
        if (processes, extra) not in runs:
            run_dir = tmp_path_factory.mktemp(f"straight{processes}")
            result = run_with_fault("none", 0, 0, tiny_run(tiny_mnist, run_dir, *extra), processes)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[processes, extra] = all_state(run_dir)
        return runs[processes, extra]
    return final_state


def preempt(tiny_mnist, run_dir, fault, step, rank, processes, *extra, resumed_at=0):
    """One run that gets `fault` on `rank` at absolute step `step` and must leave a checkpoint of that step.

    tests/helpers/interrupt.py counts the steps of its own process, so a run resumed at `resumed_at` is told
    `step - resumed_at`.
    """
    result = run_with_fault(fault, step - resumed_at, rank, tiny_run(tiny_mnist, run_dir, *extra), processes)
    assert result.returncode == (EXIT_PREEMPTED if processes == 1 else 1), result.stderr[-3000:]
    assert "s after the signal" in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    return result


def assert_resumed_from(result, run_dir, step):
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'}" in result.stdout + result.stderr


def finish(tiny_mnist, run_dir, processes, *extra):
    result = run_with_fault("none", 0, 0, tiny_run(tiny_mnist, run_dir, *extra), processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_one_process_resumes_bitwise_after_each_preemption_and_keeps_one_wandb_run(tiny_mnist, tmp_path,
                                                                                   uninterrupted):
    """SIGTERM at step 7 with a second SIGTERM while its checkpoint is written, then SIGUSR1 at step 17."""
    pytest.importorskip("wandb")
    from helpers.wandb_records import records
    preempt(tiny_mnist, tmp_path, "double-signal", 7, 0, 1, "logging.wandb=offline")
    second = preempt(tiny_mnist, tmp_path, "signal:USR1", 17, 0, 1, "logging.wandb=offline", resumed_at=7)
    assert_resumed_from(second, tmp_path, 7)
    assert_resumed_from(finish(tiny_mnist, tmp_path, 1, "logging.wandb=offline"), tmp_path, 17)
    assert_bitwise_equal(all_state(tmp_path), uninterrupted(1))
    steps = [line["step"] for line in logged_metrics(tmp_path)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no duplicated or lost lines
    # Three starts, one W&B run: the id saved in the checkpoints is the one every start logged to.
    run_files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 3
    ids = {record.run.run_id for path in run_files for record in records(path)
           if record.WhichOneof("record_type") == "run"}
    state = json.loads((tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "state.json").read_text())
    assert ids == {state["progress"]["wandb_run_id"]}


def test_two_processes_resume_a_conditional_run_bitwise_after_each_preemption(tiny_mnist, tmp_path, uninterrupted):
    """SIGUSR1 reaching only rank 1 at step 5, then SIGTERM reaching only rank 0 at step 14; class-conditional, so
    each rank's labels (of its real images, and those G is asked for) must come back too. (An unconditional run on
    two processes resumes bitwise in tests/test_slurm.py.)"""
    preempt(tiny_mnist, tmp_path, "signal:USR1", 5, 1, 2, CONDITIONAL)
    second = preempt(tiny_mnist, tmp_path, "signal:TERM", 14, 0, 2, CONDITIONAL, resumed_at=5)
    assert_resumed_from(second, tmp_path, 5)
    assert_resumed_from(finish(tiny_mnist, tmp_path, 2, CONDITIONAL), tmp_path, 14)
    resumed = all_state(tmp_path)
    assert {"generator/label.embedding.weight", "discriminator/projection.embedding.weight"} <= set(resumed)
    assert_bitwise_equal(resumed, uninterrupted(2, CONDITIONAL))



def test_a_crash_while_saving_leaves_the_previous_checkpoint_to_resume_from(tiny_mnist, tmp_path, uninterrupted):
    """Class-conditional, on one process."""
    first = run_with_fault("kill-in-save", 12, 0, tiny_run(tiny_mnist, tmp_path, CONDITIONAL))
    assert first.returncode == -9
    assert (tmp_path / "checkpoints" / ".incomplete_step_00000020").is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    second = run_train(tiny_run(tiny_mnist, tmp_path, CONDITIONAL))
    assert second.returncode == 0, second.stderr[-3000:]
    assert_bitwise_equal(all_state(tmp_path), uninterrupted(1, CONDITIONAL))


def test_resuming_on_another_number_of_processes_keeps_the_global_batch(tiny_mnist, tmp_path):
    first = run_with_fault("signal:TERM", 8, 0, tiny_run(tiny_mnist, tmp_path, "data.batch_size=16",
                                                         "model.bn_group=8"))
    assert first.returncode == EXIT_PREEMPTED
    resumed = run_with_fault("none", 0, 0, tiny_run(tiny_mnist, tmp_path), 2)  # a share of 8: one BatchNorm group
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was written by 1 process, this launch has 2: the global batch of 16" in resumed.stdout + resumed.stderr


def test_a_global_batch_another_count_cannot_share_is_refused_with_the_counts_that_work(tiny_mnist, tmp_path):
    """The run normalised over its one process's 8 samples: two processes of 4 would split that group."""
    first = run_with_fault("signal:TERM", 8, 0, tiny_run(tiny_mnist, tmp_path))
    assert first.returncode == EXIT_PREEMPTED
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run_with_fault("none", 0, 0, tiny_run(tiny_mnist, tmp_path), 2)
    assert result.returncode != 0
    assert ("a global batch of 8 (data.global_batch) in BatchNorm groups of 8 (model.bn_group) cannot be shared by 2 "
            "processes: each would take 4 samples, not a whole number of groups; process counts that work: 1"
            in result.stderr)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_preemption_right_after_a_new_best_evaluation_keeps_its_checkpoint_as_best(tiny_mnist, tmp_path,
                                                                                      eval_cache):
    """SIGTERM in step 10, whose evaluation sets the lowest FD so far. Before: the preemption's checkpoint was not
    made `best` while its state.json carried that FD as the best, so no later run could beat it, and a resumed run
    with keep_last=1 deleted it."""
    evaluating = ["eval.every=10", "eval.num_samples=100", f"eval.cache_dir={eval_cache}"]
    first = preempt(tiny_mnist, tmp_path, "signal:TERM", 10, 0, 1, *evaluating)
    assert "preempted: checkpoint step_00000010 (now best) written" in first.stderr
    best = tmp_path / "checkpoints" / "best"
    assert os.readlink(best) == "step_00000010"
    logged_fd = next(line["eval/fd"] for line in logged_metrics(tmp_path) if line["step"] == 10)
    assert json.loads((best / "state.json").read_text())["progress"]["best_fd"] == logged_fd
    finish(tiny_mnist, tmp_path, 1, "eval.num_samples=0", "checkpoint.keep_last=1")
    assert os.readlink(best) == "step_00000010"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best", "latest", "step_00000010", f"step_{STEPS:08d}"]


def test_ctrl_c_checkpoints_and_exits_as_a_preemption_does(tiny_mnist, tmp_path):
    """Before: a KeyboardInterrupt traceback and exit 130, without a checkpoint."""
    result = preempt(tiny_mnist, tmp_path, "signal:INT", 7, 0, 1)
    assert "SIGINT received: checkpointing at the next step boundary (Ctrl-\\ stops at once, without it)" \
        in result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
