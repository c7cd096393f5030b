"""One run per run.dir: a second run is refused while the first lives, and a killed run leaves no stale lock."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, run_env, run_train


def test_a_run_dir_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_train(TINY + [f"run.dir={tmp_path / 'file' / 'run'}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: cannot write into run.dir '{tmp_path / 'file' / 'run'}' (Not a directory)" in result.stderr


def test_a_refused_run_leaves_none_of_the_folders_it_made(tmp_path):
    """`a/stray/../b` makes `a/stray` on the way to `a/b`. Before: bad data left an empty `stray/` behind."""
    result = run_train(TINY + [f"run.dir={tmp_path}/a/stray/../b", f"data.path={tmp_path / 'no_data'}"])
    assert result.returncode == 2 and "data.path" in result.stderr, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_link_planted_in_run_dir_is_refused_and_its_target_left_alone(tmp_path, name):
    """Before: a `.lock` link made the run overwrite its target, a `metrics.jsonl` link made it append there."""
    run_dir, victim = tmp_path / "run", tmp_path / "victim"
    run_dir.mkdir()
    victim.write_text("precious\n")
    (run_dir / name).symlink_to(victim)
    result = run_train(TINY + [f"run.dir={run_dir}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (f"error: {run_dir / name} is a symbolic link; a run writes its files in place, never through a link (it "
            "could overwrite a file elsewhere): delete the link, or choose another run.dir") in result.stderr
    assert victim.read_text() == "precious\n"


@pytest.mark.slow
def test_a_second_run_in_a_busy_run_dir_is_refused_and_a_killed_runs_lock_is_not_stale(tmp_path):
    run_dir = tmp_path / "run"
    run = TINY + [f"run.dir={run_dir}", "checkpoint.every=5"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "train", *run, "train.steps=1000000"], cwd=REPO,
                                 env=run_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        second = run_train(run + ["train.steps=20"])
        assert second.returncode == 2, second.stderr[-2000:]
        assert (f"error: run.dir '{run_dir}' is in use by another run (pid {first.pid} on {socket.gethostname()}, "
                "since ") in second.stderr
        assert first.poll() is None  # the first run trains on
    finally:
        first.send_signal(signal.SIGKILL)  # as the OOM killer or a failed node would: no cleanup
        first.wait()
    assert (run_dir / ".lock").exists()
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    third = run_train(run + [f"train.steps={step + 5}"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"at step {step}" in third.stdout + third.stderr and not (run_dir / ".lock").exists()
