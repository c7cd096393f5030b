"""`train.compile=true` end to end on the CPU: what inductor compiles trains, saves and resumes as the eager loop."""

import pytest

from conftest import TINY, all_state, assert_bitwise_equal, logged_metrics, run_env, run_train

pytestmark = pytest.mark.slow


# Inductor's fused kernels sum in another order than eager's: float32 rounding, before any update.
COMPILED_LOSS_RTOL = 1e-5


def test_compiled_networks_compute_the_eager_losses_save_plain_checkpoints_and_resume_exactly(tmp_path):
    """train.compile=true (about 30 s of cold compilation on 2 cores, then inductor's cache under tmp_path)."""
    run = TINY + ["logging.every=1"]
    env = run_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    eager, compiled, resumed = tmp_path / "eager", tmp_path / "compiled", tmp_path / "resumed"
    assert run_train(run + [f"run.dir={eager}"]).returncode == 0
    result = run_train(run + [f"run.dir={compiled}", "train.compile=true"], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    first_eager, first_compiled = logged_metrics(eager)[0], logged_metrics(compiled)[0]
    for key in ("loss/d", "loss/g", "d/real", "d/fake"):
        assert first_compiled[key] == pytest.approx(first_eager[key], rel=COMPILED_LOSS_RTOL), key
    # What is saved are the plain networks, as an eager run saves them (sample and export read them).
    layout = {run_dir: {key: (tensor.shape, tensor.dtype) for key, tensor in all_state(run_dir).items()}
              for run_dir in (eager, compiled)}
    assert layout[compiled] == layout[eager]
    for steps in (3, 6):
        result = run_train(run + [f"run.dir={resumed}", "train.compile=true", f"train.steps={steps}"], env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout + result.stderr
    assert_bitwise_equal(all_state(resumed), all_state(compiled))
