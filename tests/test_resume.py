"""Preempted at any step, a run resumes to bitwise the same weights and optimizer states."""

import json

import pytest

from conftest import all_state, assert_bitwise_equal, run_train, run_with_fault, run_env
from train.faults import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
STEPS = 30


def tiny_run(tiny_mnist, run_dir, *extra):
    # 96 images at global batch 8 (1 process) or 16 (2 processes): epochs of 12 or 6 steps.
    return ["model.arch=seed", "data.batch_size=8", f"data.path={tiny_mnist}", f"train.steps={STEPS}",
            "checkpoint.every=10", "train.check_every=1", "logging.every=4", "logging.samples_every=0",
            "logging.wandb=disabled", "train.cpu=true", "eval.num_samples=0", "ema.statistics_images=64",
            f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_mnist, tmp_path_factory):
    runs = {}
    for processes in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"straight{processes}")
        result = run_with_fault("none", 0, 0, tiny_run(tiny_mnist, run_dir), processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = all_state(run_dir)
    return runs


def preempt_then_resume(tiny_mnist, run_dir, fault, step, rank, processes, *extra):
    first = run_with_fault(fault, step, rank, tiny_run(tiny_mnist, run_dir, *extra), processes)
    assert first.returncode == (EXIT_PREEMPTED if processes == 1 else 1), first.stderr[-3000:]
    assert "s after the signal" in first.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    second = run_with_fault("none", 0, 0, tiny_run(tiny_mnist, run_dir, *extra), processes)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'}" in second.stdout + second.stderr
    return second


@pytest.mark.parametrize("step, signal", [(7, "TERM"), (17, "USR1")])
def test_one_process_resumes_bitwise(tiny_mnist, tmp_path, uninterrupted, step, signal):
    preempt_then_resume(tiny_mnist, tmp_path, f"signal:{signal}", step, 0, 1)
    assert_bitwise_equal(all_state(tmp_path), uninterrupted[1])
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no duplicated or lost lines


@pytest.mark.parametrize("step, rank, signal", [(5, 1, "USR1"), (14, 0, "TERM")])
def test_two_processes_resume_bitwise(tiny_mnist, tmp_path, uninterrupted, step, rank, signal):
    preempt_then_resume(tiny_mnist, tmp_path, f"signal:{signal}", step, rank, 2)
    assert_bitwise_equal(all_state(tmp_path), uninterrupted[2])


def test_a_second_signal_during_the_save_does_not_corrupt_it(tiny_mnist, tmp_path, uninterrupted):
    preempt_then_resume(tiny_mnist, tmp_path, "double-signal", 13, 0, 1)
    assert_bitwise_equal(all_state(tmp_path), uninterrupted[1])


def test_a_crash_while_saving_leaves_the_previous_checkpoint_to_resume_from(tiny_mnist, tmp_path, uninterrupted):
    first = run_with_fault("kill-in-save", 12, 0, tiny_run(tiny_mnist, tmp_path))
    assert first.returncode == -9
    assert (tmp_path / "checkpoints" / ".incomplete_step_00000020").is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    second = run_train(tiny_run(tiny_mnist, tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert_bitwise_equal(all_state(tmp_path), uninterrupted[1])


def test_resumed_run_continues_the_same_wandb_run(tiny_mnist, tmp_path):
    pytest.importorskip("wandb")
    from wandb_records import records
    preempt_then_resume(tiny_mnist, tmp_path, "signal:TERM", 9, 0, 1, "logging.wandb=offline")
    run_files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    ids = {record.run.run_id for path in run_files for record in records(path)
           if record.WhichOneof("record_type") == "run"}
    assert len(ids) == 1
    state = json.loads((tmp_path / "checkpoints" / "step_00000030" / "state.json").read_text())
    assert ids == {state["progress"]["wandb_run_id"]}


def test_resuming_on_another_number_of_processes_keeps_the_global_batch(tiny_mnist, tmp_path):
    first = run_with_fault("signal:TERM", 8, 0, tiny_run(tiny_mnist, tmp_path, "data.batch_size=16"))
    assert first.returncode == EXIT_PREEMPTED
    refused = run_with_fault("none", 0, 0, tiny_run(tiny_mnist, tmp_path), 2)  # 8 x 2 = 16: fine
    assert refused.returncode == 0, refused.stderr[-3000:]
    assert "written by another number of processes" in refused.stdout + refused.stderr


def test_another_global_batch_is_refused_with_the_fix(tiny_mnist, tmp_path):
    first = run_with_fault("signal:TERM", 8, 0, tiny_run(tiny_mnist, tmp_path))
    assert first.returncode == EXIT_PREEMPTED
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run_train(tiny_run(tiny_mnist, tmp_path, "data.batch_size=4"), env=run_env())
    assert result.returncode == 2
    assert "global batch of 8; this launch has data.batch_size=4 x 1 processes = 4: set data.batch_size=8" in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
