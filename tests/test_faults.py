"""Non-finite numbers on one rank and dead ranks: every rank reacts the same way, nobody hangs."""

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, free_port, run_env, run_with_fault
from train.errors import EXIT_NONFINITE
from train.storage import manifest

pytestmark = pytest.mark.slow


def tiny_run(tiny_mnist, run_dir, *extra):
    return ["model.arch=dcgan", "data.batch_size=8", f"data.path={tiny_mnist}", "train.steps=16",
            "checkpoint.every=5", "train.check_every=1", "logging.every=4", "logging.samples_every=0",
            "logging.wandb=disabled", "logging.curves=false", "train.cpu=true", "eval.num_samples=0",
            "ema.statistics_images=64", f"run.dir={run_dir}", *extra]


def test_nan_on_one_rank_stops_every_rank_at_that_step(tiny_mnist, tmp_path):
    # Checks every 3 steps: the NaN of step 8 is found at the check of step 9 and named by its own step.
    result = run_with_fault("nan", 8, 1, tiny_run(tiny_mnist, tmp_path, "train.check_every=3"), processes=2)
    assert result.returncode != 0
    assert "non-finite discriminator loss or gradient at step 8 on rank 1 (loss nan)" in result.stderr
    kept = tmp_path / "checkpoints" / "step_00000005"
    assert f"stopping (train.on_nonfinite=stop): {kept} is intact and resumable" in result.stderr
    assert f"exitcode  : {EXIT_NONFINITE}" in result.stderr  # torchrun's summary of the ranks' exits
    assert [p.name for p in manifest.complete_checkpoints(tmp_path)] == ["step_00000005"]
    manifest.verify(tmp_path / "checkpoints" / "step_00000005")


def test_skip_drops_the_bad_update_everywhere_and_training_goes_on(tiny_mnist, tmp_path):
    result = run_with_fault("nan", 8, 1, tiny_run(tiny_mnist, tmp_path, "train.on_nonfinite=skip"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    final = manifest.complete_checkpoints(tmp_path)[-1]
    assert final.name == "step_00000016"
    from safetensors.torch import load_file
    for name in ("generator", "discriminator", "optimizers"):
        assert all(torch.isfinite(t.float()).all() for t in load_file(final / f"{name}.safetensors").values())


def test_rollback_returns_to_the_last_checkpoint_with_fresh_noise(tiny_mnist, tmp_path):
    result = run_with_fault("nan", 8, 1, tiny_run(tiny_mnist, tmp_path, "train.on_nonfinite=rollback"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rolled back to step_00000005 (train.on_nonfinite=rollback, seed offset 1)" in result.stderr
    state = json.loads((tmp_path / "checkpoints" / "step_00000016" / "state.json").read_text())
    assert state["progress"]["seed_offset"] == 1 and state["progress"]["step"] == 16


def test_rollback_without_a_checkpoint_stops_as_stop_does_and_says_there_is_none(tiny_mnist, tmp_path):
    result = run_with_fault("nan", 3, 0, tiny_run(tiny_mnist, tmp_path, "train.on_nonfinite=rollback"))
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]  # not 2: that says nothing was written
    assert ("non-finite discriminator loss or gradient at step 3 on rank 0 (loss nan); stopping (train.on_nonfinite="
            "rollback): no valid checkpoint to resume from yet (checkpoint.every=5)") in result.stderr
    assert "Traceback" not in result.stderr and not manifest.complete_checkpoints(tmp_path)


def test_a_dead_rank_ends_the_launch(tiny_mnist, tmp_path):
    started = time.monotonic()
    result = run_with_fault("die", 6, 1, tiny_run(tiny_mnist, tmp_path, "train.steps=400"), processes=2)
    assert result.returncode != 0
    assert "exitcode  : -9" in result.stderr
    assert time.monotonic() - started < 120


def start_ranks_directly(tiny_mnist, run_dir, fault: str) -> list[subprocess.Popen]:
    """Two ranks started directly (as srun does, one process each), with `fault` (FAULT STEP RANK) on rank 1."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = run_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, str(REPO / "tests" / "helpers" / "interrupt.py"), *fault.split(),
                   *tiny_run(tiny_mnist, run_dir, "train.steps=400", "train.timeout_s=10")]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


def survivor_errors(processes: list[subprocess.Popen]) -> tuple[str, float]:
    """Rank 0's stderr and the seconds until it exited; the other rank is killed then, if it has not exited."""
    survivor = processes[0]
    started = time.monotonic()
    try:
        _, errors = survivor.communicate(timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return errors, time.monotonic() - started


def test_without_a_supervising_launcher_the_survivor_times_out(tiny_mnist, tmp_path):
    """Rank 0 must not wait forever for a rank that died."""
    processes = start_ranks_directly(tiny_mnist, tmp_path, "die 6 1")
    errors, seconds = survivor_errors(processes)
    assert processes[1].wait() == -9
    assert processes[0].returncode != 0
    assert seconds < 90
    assert "Traceback" in errors  # a collective raised instead of blocking


def test_a_rank_stopped_in_the_fault_check_fails_the_other_after_train_timeout_s(tiny_mnist, tmp_path):
    """Before: the fault check's own gloo group had torch's 30-minute default, not train.timeout_s (10 s here)."""
    processes = start_ranks_directly(tiny_mnist, tmp_path, "stop-in-check 6 1")
    errors, seconds = survivor_errors(processes)
    assert processes[0].returncode != 0
    assert seconds < 90, errors[-3000:]
    assert "Traceback" in errors and "all_gather" in errors  # the check's collective raised


def test_a_skipped_step_leaves_no_nan_in_the_batchnorm_statistics(tiny_mnist, tmp_path):
    """One process, the NaN batch on rank 0 (whose statistics every checkpoint keeps). Before: D's running
    statistics kept the NaN of the skipped batch, so every later evaluation of D was NaN."""
    result = run_with_fault("nan", 8, 0, tiny_run(tiny_mnist, tmp_path, "train.on_nonfinite=skip"))
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file
    final = manifest.complete_checkpoints(tmp_path)[-1]
    for name in ("generator", "discriminator", "generator_ema"):
        tensors = load_file(final / f"{name}.safetensors")
        assert all(torch.isfinite(t.float()).all() for t in tensors.values()), name


def test_a_rollback_leaves_one_metrics_line_per_step(tiny_mnist, tmp_path):
    result = run_with_fault("nan", 8, 0, tiny_run(tiny_mnist, tmp_path, "train.on_nonfinite=rollback",
                                                  "logging.every=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # the undone steps 6-8 were logged, then dropped and logged again
