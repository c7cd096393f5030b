"""Things planted in a run directory, where the run writes: refused by name before any work (exit 2, nothing
written), or, for links among the checkpoints, never followed and never deleted through."""


import pytest

from conftest import TINY, run_train, snapshot_files
from train import errors
from train.storage import manifest

LINK_MESSAGE = "is a symbolic link; a run writes its files in place, never through a link"


def plant(run_dir, name, kind, outside):
    """`kind` at run_dir/name: a folder, a file, or a link to the folder `outside`."""
    path = run_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        path.mkdir()
    elif kind == "file":
        path.write_text("planted\n")
    else:
        path.symlink_to(outside if kind == "link" else outside / "gone", target_is_directory=True)
    return path


@pytest.mark.parametrize("name, kind, message", [
    ("samples", "link", LINK_MESSAGE),
    ("checkpoints", "dangling link", "is a link to "),
    ("wandb", "link", LINK_MESSAGE),
    ("samples", "file", "is a file where the run keeps a folder"),
    ("checkpoints", "file", "is a file where the run keeps a folder"),
    ("metrics.jsonl", "folder", "is a folder where the run writes a file"),
    ("config.yaml", "folder", "is a folder where the run writes a file"),
    ("checkpoints/latest", "folder", "is a folder where the run writes a file"),
    ("checkpoints/best", "folder", "is not the link a run keeps to its best checkpoint"),
])
def test_something_planted_where_the_run_writes_is_refused_by_name_before_any_work(tmp_path, name, kind, message):
    """Before: a samples/ link was followed (grids written outside run.dir); a file or folder of the wrong kind
    ended in a traceback, or in exit 74 "make room" after the first steps."""
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    planted = plant(run_dir, name, kind, outside)
    before = snapshot_files(tmp_path)
    result = run_train(TINY + [f"run.dir={run_dir}", "logging.samples_every=2"])
    assert result.returncode == errors.EXIT_BAD_INPUT, result.stderr[-2000:]
    assert f"error: {planted} {message}" in result.stderr
    assert snapshot_files(tmp_path) == before and list(outside.iterdir()) == []
    assert sorted(p.name for p in run_dir.iterdir()) == [name.split("/")[0]]  # not even the lock is left


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """A finished run whose checkpoints are planted as links in another run's folder."""
    run_dir = tmp_path_factory.mktemp("other") / "run"
    result = run_train(TINY + [f"run.dir={run_dir}", "checkpoint.every=2", "checkpoint.keep_last=0"])
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_a_checkpoint_link_is_never_resumed_from_pruned_or_deleted_through(other_run, tmp_path):
    """A link named like a checkpoint, to another run's valid checkpoint. Before: it counted as a checkpoint of
    this run, and pruning it crashed ("Cannot call rmtree on a symbolic link")."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    target = other_run / "checkpoints" / "step_00000002"
    link = run_dir / "checkpoints" / "step_00000001"
    link.symlink_to(target, target_is_directory=True)
    before = snapshot_files(other_run)
    result = run_train(TINY + [f"run.dir={run_dir}", "checkpoint.every=2", "checkpoint.keep_last=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" not in result.stdout + result.stderr  # a fresh run: the link is none of its own
    assert link.is_symlink() and snapshot_files(other_run) == before
    assert [p.name for p in manifest.complete_checkpoints(run_dir)] == ["step_00000006"]


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_staging_name_taken_by_a_link_or_file_is_cleared_without_following_it(tmp_path, kind):
    """`.incomplete_step_N` is the run's own staging name, never valid. Before: a link there was a FileExistsError."""
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's\n")
    planted = plant(run_dir, "checkpoints/.incomplete_step_00000006", kind, outside)
    result = run_train(TINY + [f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not planted.is_symlink() and not planted.exists()
    assert (outside / "keep.txt").read_text() == "not the run's\n"
    manifest.verify(run_dir / "checkpoints" / "step_00000006")


def test_checkpoints_may_be_a_link_to_another_file_system(tmp_path):
    """The one link a run writes through, made on purpose: its checkpoints kept on a scratch space."""
    run_dir, scratch = tmp_path / "run", tmp_path / "scratch"
    scratch.mkdir()
    plant(run_dir, "checkpoints", "link", scratch)
    result = run_train(TINY + [f"run.dir={run_dir}", "checkpoint.every=2", "checkpoint.keep_last=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in scratch.iterdir()) == ["latest", "step_00000006"]
    manifest.verify(scratch / "step_00000006")
