"""A full disk or a quota, made real by a per-process file-size limit (RLIMIT_FSIZE: a write past it fails
with EFBIG after writing what fits, as one past a quota fails with EDQUOT): the run stops with exit 74
and a message naming what failed and the checkpoint to resume from; nothing written before is damaged,
and the same command resumes once there is room."""

import json
import re
import resource
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY, logged_metrics, run_env, run_train, snapshot_files
from helpers.mounts import tmpfs
from train import errors

EVERY_STEP_LOGGED = TINY + ["logging.every=1", "checkpoint.every=2", "checkpoint.keep_last=0"]


def run_with_file_size_limit(module_and_args: list, limit_bytes: int) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` with no file written past `limit_bytes`."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", *map(str, module_and_args)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)


@pytest.fixture(scope="module")
def finished_six_steps(tmp_path_factory):
    """A run logged at every step, with checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("six_steps") / "run"
    result = run_train(EVERY_STEP_LOGGED + [f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture
def six_steps(finished_six_steps, tmp_path):
    """A copy of that run, for a test to train on or write beside."""
    return shutil.copytree(finished_six_steps, tmp_path / "run")


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_earlier_ones(six_steps):
    """The logs and the sample grid (200 kB) fit under 400 kB, the weights do not."""
    before = snapshot_files(six_steps / "checkpoints")
    run = EVERY_STEP_LOGGED + [f"run.dir={six_steps}", "train.steps=8"]
    limited = run_with_file_size_limit(["train", *run], 400_000)
    assert limited.returncode == errors.EXIT_WRITE_FAILED, limited.stderr[-2000:]
    assert ("error: writing checkpoint step_00000008 failed ([Errno 27] File too large); its partial folder is "
            f"removed. The newest intact checkpoint is {six_steps / 'checkpoints' / 'step_00000006'}") in limited.stderr
    assert snapshot_files(six_steps / "checkpoints") == before  # no partial folder, nothing overwritten
    result = run_train(run)  # the same command, with room again
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {six_steps / 'checkpoints' / 'step_00000006'} at step 6" in result.stdout + result.stderr


def test_a_metrics_line_that_cannot_be_appended_stops_the_run_and_is_dropped_on_resume(six_steps):
    """The limit lets the run rewrite config.yaml and write part of step 7's line: the torn line a full disk leaves."""
    metrics = six_steps / "metrics.jsonl"
    before = snapshot_files(six_steps / "checkpoints")
    run = EVERY_STEP_LOGGED + [f"run.dir={six_steps}", "train.steps=10"]
    limited = run_with_file_size_limit(["train", *run], metrics.stat().st_size + 100)
    assert limited.returncode == errors.EXIT_WRITE_FAILED, limited.stderr[-2000:]
    assert (f"error: appending to {metrics} failed ([Errno 27] File too large). The newest intact checkpoint is "
            f"{six_steps / 'checkpoints' / 'step_00000006'}: make room") in limited.stderr
    assert snapshot_files(six_steps / "checkpoints") == before
    assert not metrics.read_text().endswith("\n")  # step 7's line, cut short
    result = run_train(run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"dropped 1 unreadable line(s) of {metrics}" in result.stdout + result.stderr
    assert [line["step"] for line in logged_metrics(six_steps)] == list(range(1, 11))


def test_a_sample_grid_that_cannot_be_written_stops_the_run_and_leaves_no_partial_file(tmp_path):
    """The logs fit under 100 kB, the grid (200 kB) does not; no checkpoint has been written yet."""
    run_dir = tmp_path / "run"
    limited = run_with_file_size_limit(["train", *TINY, f"run.dir={run_dir}", "logging.samples_every=2"], 100_000)
    assert limited.returncode == errors.EXIT_WRITE_FAILED, limited.stderr[-2000:]
    grid = run_dir / "samples" / "step_00000002.png"
    assert (f"error: writing {grid} failed ([Errno 27] File too large). There is no checkpoint yet: make room"
            in limited.stderr)
    assert list((run_dir / "samples").iterdir()) == []  # neither the grid nor its staging file


@pytest.mark.parametrize("name", ["export", "sample"])
def test_a_tool_whose_output_does_not_fit_leaves_nothing_and_succeeds_when_run_again(six_steps, tmp_path, name):
    """The exported generator (3 MB) or 2,000 samples (1.5 MB) over a 1 MB limit: a partial export would make the
    retry be refused as an overwrite, a partial .npy would look like samples."""
    out = tmp_path / "out"
    args = {"export": ["--out", out], "sample": ["--num", "2000", "--device", "cpu", "--out", out / "samples.npy"]}
    command = [f"train.{name}", "--checkpoint", six_steps, *args[name]]
    limited = run_with_file_size_limit(command, 1_000_000)
    assert limited.returncode == errors.EXIT_WRITE_FAILED, limited.stderr[-2000:]
    assert "failed ([Errno 27] File too large" in limited.stderr and "Traceback" not in limited.stderr
    assert list(out.iterdir()) == []
    again = subprocess.run([sys.executable, "-m", *map(str, command)], cwd=REPO, env=run_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    exported = ["README.md", "generator.json", "generator.safetensors", "samples.png"]
    assert sorted(p.name for p in out.iterdir()) == (exported if name == "export" else ["samples.npy"])


def test_test_set_features_that_cannot_be_cached_are_only_reported(six_steps, tmp_path):
    """The cache (5 MB) is a saving, not a result: over a 1 MB limit the evaluation still gives its numbers."""
    cache = tmp_path / "cache"
    limited = run_with_file_size_limit(["train.evaluate", "--checkpoint", six_steps, "--num", 100, "--device", "cpu",
                                        "--cache-dir", cache], 1_000_000)
    assert limited.returncode == 0, limited.stderr[-2000:]
    assert "could not cache the test-set features" in limited.stderr and "[Errno 27] File too large" in limited.stderr
    assert json.loads(limited.stdout)["metrics"]["fd"] > 0
    assert [p.name for p in cache.iterdir()] == ["CACHEDIR.TAG"]  # no half-written cache for the next run to trip over


def test_a_profile_that_cannot_be_written_is_reported_and_the_training_goes_on(tmp_path):
    """The profile's trace (500 kB) does not fit under 300 kB (kineto only logs that); the run trains on to
    its final checkpoint, which does not fit either."""
    run_dir = tmp_path / "run"
    limited = run_with_file_size_limit(["train", *TINY, f"run.dir={run_dir}", "profile.steps=2", "profile.after=2"],
                                       300_000)
    assert f"warning: writing the profile into {run_dir / 'profile'} failed" in limited.stderr, limited.stderr[-2000:]
    assert "profile of 2 steps written" not in limited.stdout
    assert list((run_dir / "profile").iterdir()) == []  # no partial trace
    assert limited.returncode == errors.EXIT_WRITE_FAILED
    assert "error: writing checkpoint step_00000006 failed" in limited.stderr  # after the profile's steps 3 and 4


@pytest.mark.parametrize("options, failure, fix", [
    ("nr_inodes=1", "[Errno 28] No space left on device", "make room (or raise the quota)"),
    ("ro", "[Errno 30] Read-only file system", "the file system is mounted read-only: make it writable"),
])
def test_a_checkpoints_folder_without_inodes_or_read_only_stops_the_run_with_what_to_do(tmp_path, options, failure,
                                                                                       fix):
    """Before: the staging folder was made outside the write guard (a traceback), and every failed write said
    "make room" whatever its cause."""
    run_dir = tmp_path / "run"
    with tmpfs(run_dir / "checkpoints", options):
        result = run_train(TINY + [f"run.dir={run_dir}"])
    assert result.returncode == errors.EXIT_WRITE_FAILED, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: writing checkpoint step_00000006 failed ({failure}" in result.stderr
    assert f"There is no checkpoint yet: {fix}" in result.stderr


def test_a_full_wandb_folder_stops_the_run_with_exit_74(tmp_path):
    """W&B copies each sample grid into its run folder in this process; 300 kB hold its logs and the first grid
    only. Before: a traceback, before the first checkpoint."""
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    with tmpfs(run_dir / "wandb", "size=300k"):
        result = run_train(TINY + [f"run.dir={run_dir}", "logging.wandb=offline", "logging.samples_every=2"])
    assert result.returncode == errors.EXIT_WRITE_FAILED, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(rf"error: logging step_0000000[46].png to W&B in {run_dir / 'wandb'} failed \(\[Errno 28\] No "
                     "space left on device", result.stderr), result.stderr[-2000:]
    assert "make room (or raise the quota) and start the same command again" in result.stderr
