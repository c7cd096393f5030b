"""`python -m train.bench`: what it writes, on custom variants short enough for the CPU."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_env


@pytest.mark.slow
def test_bench_times_custom_variants_and_records_one_that_cannot_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "train.bench", "--variants", "", "--steps", "4", "--warmup", "2",
                             "--custom", "refused=configs/smoke.yaml:train.cuda_graph=true,train.on_nonfinite=skip",
                             "--custom", "tiny=configs/smoke.yaml:data.batch_size=8,model.z_dim=16", "--out", str(out)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1  # a variant failed; the others were still measured
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m train.bench --variants")
    assert "needs train.on_nonfinite=stop or rollback" in report["throughput"]["refused"]["failed"]
    tiny = report["throughput"]["tiny"]
    assert tiny["global_batch"] == 8  # the override reached the run
    assert tiny["images_per_second"] == pytest.approx(tiny["steps_per_second"] * 8)
    assert "refused  FAILED" in result.stdout and "failed: refused" in result.stdout
    assert "tiny" in result.stdout and "images/s" in result.stdout
