"""`python -m train.bench`: what it writes, on custom variants short enough for the CPU."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_env
from train import bench, config


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


def test_every_variant_of_the_gpu_suite_is_a_valid_config():
    """A typo in launch/gpu_suite.sh would cost a session's scarce GPU time; the CPU finds it first."""
    script = (REPO / "launch" / "gpu_suite.sh").read_text()
    variables = dict(re.findall(r'local (\w+)="([^"]*)"', script))
    specs = [re.sub(r"\$(\w+)", lambda variable: variables[variable[1]], spec)
             for spec in re.findall(r'--(?:ttq-)?custom "([^"]+)"', script)]
    assert len(specs) >= 10 and any(spec.startswith("seed_r1=") for spec in specs)
    for spec in specs:
        _, config_path, overrides = bench.custom_variant(spec)
        config.load(str(REPO / config_path), overrides)  # raises ConfigError naming the bad key or value


def test_every_config_of_the_cuda_graph_check_is_valid(monkeypatch):
    """The same for launch/check_cuda_graph.py, which the suite's `graph` part runs first."""
    spec = importlib.util.spec_from_file_location("check_cuda_graph", REPO / "launch" / "check_cuda_graph.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.chdir(REPO)
    assert any("train.deterministic=true" in args for args in check.CONFIGS.values())
    for args in check.CONFIGS.values():
        config.parse_args([*args, *bench.QUIET, "train.cuda_graph=true"])  # the graph run's command line
