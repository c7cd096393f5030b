"""What a run records: W&B (offline, read back from W&B's own file) and the local JSONL/PNG copy agree."""

import importlib.util
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY, logged_metrics, run_env, run_train

pytest.importorskip("wandb")
from helpers.wandb_records import offline_run  # noqa: E402  (needs wandb)

FAKE_KEY = "local-0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, eval_cache):
    run_dir = tmp_path_factory.mktemp("wandb_run")
    args = TINY + [f"run.dir={run_dir}", "logging.wandb=offline", "logging.samples_every=3", "logging.curves=true",
                   "eval.num_samples=200", "eval.every=3", f"eval.cache_dir={eval_cache}"]
    result = run_train(args, env=run_env(WANDB_API_KEY=FAKE_KEY, WANDB_SILENT="false"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_wandb_history_holds_the_metrics_of_the_jsonl_log_at_their_steps(wandb_run):
    run_dir, _ = wandb_run
    recorded = offline_run(run_dir)
    local = logged_metrics(run_dir)
    assert sorted(recorded["history"]) == [line["step"] for line in local] == [3, 6]
    for line in local:
        row = recorded["history"][line["step"]]
        keys = [key for key in line if key != "step" and not isinstance(line[key], str)]  # text: in the config
        assert {"loss/d", "loss/g", "d/real", "d/fake", "lr/g", "lr/d", "images_per_second", "global_batch",
                "eval/fd", "eval/precision", "eval/recall", "eval/density", "eval/coverage", "eval/classes_present",
                "eval/class_kl", "eval/inception_score"} <= set(keys)
        for key in keys:
            assert row[key] == line[key], key


def test_wandb_holds_the_sample_grids_and_the_resolved_config(wandb_run):
    run_dir, _ = wandb_run
    recorded = offline_run(run_dir)
    for step in (3, 6):
        (filename,) = recorded["history"][step]["samples/filenames"]
        assert (recorded["path"].parent / "files" / filename).stat().st_size > 0
        assert (run_dir / "samples" / f"step_{step:08d}.png").is_file()
    feature_network = recorded["config"].pop("feature_network")  # W&B charts numbers: the text of a line is here
    assert feature_network == logged_metrics(run_dir)[-1]["feature_network"] == "MNIST's classifier (sha256:dcae5711397f)"
    assert recorded["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["config"]["model"]["arch"] == "dcgan"


def test_no_api_key_is_written_anywhere(wandb_run):
    run_dir, result = wandb_run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in result.stdout + result.stderr


def test_a_disabled_run_writes_only_the_local_log_and_never_imports_wandb(tmp_path):
    blocker = tmp_path / "blocked" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('wandb is not installed here')\n")
    env = run_env(PYTHONPATH=str(tmp_path / "blocked"))
    run_dir = tmp_path / "run"
    result = run_train(TINY + [f"run.dir={run_dir}"], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (run_dir / "wandb").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (run_dir / "curves.png").exists()  # logging.curves=false (TINY)


def test_the_run_draws_its_curves_and_they_can_be_redrawn(wandb_run):
    run_dir, _ = wandb_run
    curves = run_dir / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves.unlink()
    result = subprocess.run([sys.executable, "-m", "train.plots", "--run", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and curves.stat().st_size > 10_000


def test_every_evaluation_is_logged_with_the_training_time_it_took(tmp_path, eval_cache):
    """Time to quality reads the training seconds off each evaluation, also between logging steps."""
    result = run_train(TINY + [f"run.dir={tmp_path / 'run'}", "logging.every=4", "eval.num_samples=200",
                               "eval.every=3", f"eval.cache_dir={eval_cache}"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = logged_metrics(tmp_path / "run")
    assert [line["step"] for line in lines] == [3, 4, 6]
    assert ["eval/fd" in line for line in lines] == [True, False, True]
    assert all({"train_seconds", "loss/d", "images_per_second"} <= set(line) for line in lines)


def test_asking_for_wandb_without_it_is_refused_before_any_work(monkeypatch):
    from train import config, errors, tracking
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(errors.ConfigError, match="logging.wandb=offline needs the wandb package: `pip install wandb`"):
        tracking.check_available(config.load(None, ["logging.wandb=offline"]))


def train_online(run_dir, home, **wandb_env) -> subprocess.CompletedProcess:
    """`python -m train ... logging.wandb=online` with no W&B settings but `wandb_env`, and no terminal to prompt on."""
    env = {name: value for name, value in run_env(HOME=str(home), **wandb_env).items()
           if not name.startswith("WANDB_") or name == "WANDB_SILENT" or name in wandb_env}
    return subprocess.run([sys.executable, "-m", "train", *TINY, f"run.dir={run_dir}", "logging.wandb=online"],
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def test_online_logging_without_a_login_is_refused_with_the_fix_and_leaves_no_run_dir(tmp_path):
    """A compute node or a laptop where nobody ran `wandb login`: W&B's own refusal, before any file is written.
    (No key anywhere, so W&B stops before it would reach for the network.)"""
    run_dir = tmp_path / "run"
    result = train_online(run_dir, tmp_path / "home")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: W&B refused logging.wandb=online (No API key configured" in result.stderr
    assert "log in with `wandb login`" in result.stderr and "or use logging.wandb=offline" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_online_logging_that_cannot_reach_the_server_is_refused_with_the_fix(tmp_path):
    """A compute node without internet: here a W&B server address on a local port that is bound but never listens
    (every connection refused), and W&B's wait for it cut to 3 s."""
    run_dir = tmp_path / "run"
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        result = train_online(run_dir, tmp_path / "home", WANDB_API_KEY=FAKE_KEY, WANDB_INIT_TIMEOUT="3",
                              WANDB_BASE_URL=f"http://127.0.0.1:{closed_port.getsockname()[1]}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: W&B refused logging.wandb=online (" in result.stderr
    assert f"its server cannot be reached from here (its log of the attempt is in {run_dir / 'wandb'})" in result.stderr
    assert "use logging.wandb=offline and `wandb sync` the run later" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["wandb"]  # W&B's own log; no config, no metrics
