"""What a run records: W&B (offline, read back from W&B's own file) and the local JSONL/PNG copy agree."""

import json

import pytest
import yaml

from conftest import TINY, run_env, run_train

pytest.importorskip("wandb")
from wandb_records import offline_run  # noqa: E402  (needs wandb)

FAKE_KEY = "local-0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wandb_run")
    args = TINY + [f"run.dir={run_dir}", "logging.wandb=offline", "logging.samples_every=3"]
    result = run_train(args, env=run_env(WANDB_API_KEY=FAKE_KEY, WANDB_SILENT="false"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_wandb_history_holds_the_metrics_of_the_jsonl_log_at_their_steps(wandb_run):
    run_dir, _ = wandb_run
    recorded = offline_run(run_dir)
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(recorded["history"]) == [line["step"] for line in local] == [3, 6]
    for line in local:
        row = recorded["history"][line["step"]]
        for key in ("loss/d", "loss/g", "d/real", "d/fake", "lr/g", "lr/d", "images_per_second", "global_batch"):
            assert row[key] == line[key], key


def test_wandb_holds_the_sample_grids_and_the_resolved_config(wandb_run):
    run_dir, _ = wandb_run
    recorded = offline_run(run_dir)
    for step in (3, 6):
        (filename,) = recorded["history"][step]["samples/filenames"]
        assert (recorded["path"].parent / "files" / filename).stat().st_size > 0
        assert (run_dir / "samples" / f"step_{step:08d}.png").is_file()
    assert recorded["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["config"]["model"]["arch"] == "dcgan"


def test_no_api_key_is_written_anywhere(wandb_run):
    run_dir, result = wandb_run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in result.stdout + result.stderr


def test_disabled_wandb_writes_only_the_local_log(tmp_path):
    result = run_train(TINY + [f"run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "wandb").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
