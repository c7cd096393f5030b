"""`python -m benchmarks.bench`: what it writes, on custom variants short enough for the CPU."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from benchmarks import bench
from conftest import REPO, logged_metrics, run_env
from train import config, setup


@pytest.mark.slow
def test_bench_times_the_blogs_loop_against_the_project_custom_variants_and_the_scaling_table(tmp_path):
    """(a) and (b) of the benchmark and its table under `accelerate launch`, for a few steps on the CPU, with a
    custom variant and one that cannot run, which is recorded while the others are still measured."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--variants", "blog,project", "--steps", "4",
                             "--warmup", "2", "--processes", "1,2",
                             "--custom", "refused=configs/smoke.yaml:train.cuda_graph=true,train.on_nonfinite=skip",
                             "--custom", "tiny=configs/smoke.yaml:data.batch_size=8,model.z_dim=16", "--out", str(out)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]  # a variant failed
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m benchmarks.bench --variants")
    assert report["hardware"]["device"].startswith("CPU")
    blog, project = report["throughput"]["blog"], report["throughput"]["project"]
    assert blog["global_batch"] == project["global_batch"] == 64
    assert blog["images_per_second"] == pytest.approx(blog["steps_per_second"] * 64)
    assert project["ratio_to_blog"] == pytest.approx(project["images_per_second"] / blog["images_per_second"])
    assert "needs train.on_nonfinite=stop or rollback" in report["throughput"]["refused"]["failed"]
    tiny = report["throughput"]["tiny"]
    assert tiny["global_batch"] == 8  # the override reached the run
    assert tiny["images_per_second"] == pytest.approx(tiny["steps_per_second"] * 8)
    one, two = report["scaling"]["1"], report["scaling"]["2"]
    assert one["global_batch"] == 64 and two["global_batch"] == 128  # the two ranks formed one group
    assert two["per_process_images_per_second"] == pytest.approx(two["images_per_second"] / 2)
    assert "vs blog" in result.stdout and "2 processes:" in result.stdout
    assert "refused  FAILED" in result.stdout and "failed: refused" in result.stdout
    assert "tiny" in result.stdout and "images/s" in result.stdout


def step_flops_of_default(setting: str) -> float:
    """bench.step_flops of default.yaml with one override, in a process of its own (Accelerate's state is one per
    process, and other tests in this one made theirs)."""
    probe = f"from benchmarks import bench; print(bench.step_flops('configs/default.yaml', [{setting!r}])[0])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.split()[-1])


@pytest.mark.slow
def test_bench_reports_the_default_configs_flops_as_a_share_of_a_matrix_products(tmp_path):
    """FLOP per step are counted on the real step (R1's double backward included): a step with the penalty costs
    more than one without, and the mean over default.yaml's lazy period lies between them."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--variants", "default", "--steps", "4",
                             "--warmup", "2", "--out", str(out)], cwd=REPO, env=run_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    used, measured = (json.loads(out.read_text())[key] for key in ("utilisation", "throughput"))
    assert used["config"] == "configs/default.yaml"
    assert used["precision"] == setup._precision(config.load(str(REPO / "configs" / "default.yaml"), []), cpu=True)
    assert used["achieved_flop_per_second"] == pytest.approx(used["flop_per_step"] *
                                                              measured["default"]["steps_per_second"])
    assert used["share_of_matmul"] == pytest.approx(used["achieved_flop_per_second"] / used["matmul_flop_per_second"])
    assert 0 < used["share_of_matmul"] < 1.5  # a fused step could beat a 2048^2 product, a counting slip would not
    plain, penalised = (step_flops_of_default(setting) for setting in ("loss.r1_gamma=0", "loss.r1_every=1"))
    assert plain < used["flop_per_step"] < penalised
    assert "% of a 2048x2048 matrix product's" in result.stdout


@pytest.mark.slow
def test_time_to_quality_reads_each_runs_evaluations_and_records_one_that_fails(tmp_path, eval_cache):
    """A quality run cut by the time limit stops cleanly; one that cannot run is `failed` with its error, not
    'not reached' (on a GPU, a capture that fails must not read as a slow recipe)."""
    out, runs = tmp_path / "bench.json", tmp_path / "runs"
    cut = "cut=configs/smoke.yaml:train.steps=100000,data.batch_size=8,eval.every=10,eval.num_samples=100"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--variants", "", "--ttq-seconds", "30",
                             "--ttq-custom", "refused=configs/smoke.yaml:train.cuda_graph=true", "--ttq-custom", cut,
                             "--runs-dir", str(runs), "--eval-cache-dir", str(eval_cache), "--out", str(out)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(out.read_text())["time_to_quality"]
    assert "exit code 2" in report["refused"]["failed"] and "needs a CUDA GPU" in report["refused"]["failed"]
    assert report["refused"]["seconds_to_10x_floor"] == "not reached" and "refused FAILED" in result.stdout

    cut = report["cut"]
    assert "failed" not in cut, cut["failed"]  # stopped by the limit's SIGTERM: a checkpoint, exit 75
    assert (runs / "cut" / "checkpoints" / "latest").is_file()
    logged = logged_metrics(runs / "cut")
    evaluations = [{key: line[key] for key in ("step", "train_seconds", "eval/fd")} for line in logged
                   if "eval/fd" in line]
    assert len(evaluations) >= 2 and cut["evaluations"] == evaluations and cut["final"] == evaluations[-1]
    assert cut["floor_fd"] == report["training_set_floor"]["fd"]
    # Floors chosen from the run's own numbers: 3x lies just above its best FD, 10x just below it.
    fds = [line["eval/fd"] for line in evaluations]
    best = min(fds)
    assert bench.milestones(evaluations, best / 3 * (1 + 1e-9))["seconds_to_3x_floor"] == \
        evaluations[fds.index(best)]["train_seconds"]
    assert bench.milestones(evaluations, best / 10 * (1 - 1e-9))["seconds_to_10x_floor"] == "not reached"


def test_every_variant_of_the_gpu_suite_is_a_valid_config():
    """A typo in benchmarks/gpu_suite.sh would cost a session's scarce GPU time; the CPU finds it first."""
    script = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    variables = dict(re.findall(r'local (\w+)="([^"]*)"', script))
    specs = [re.sub(r"\$(\w+)", lambda variable: variables[variable[1]], spec)
             for spec in re.findall(r'--(?:ttq-)?custom "([^"]+)"', script)]
    assert len(specs) >= 10 and any(spec.startswith("seed_r1=") for spec in specs)
    for spec in specs:
        _, config_path, overrides = bench.custom_variant(spec)
        config.load(str(REPO / config_path), overrides)  # raises ConfigError naming the bad key or value


def test_every_config_of_the_cuda_graph_check_is_valid(monkeypatch):
    """The same for benchmarks/check_cuda_graph.py, which the suite's `graph` part runs first."""
    spec = importlib.util.spec_from_file_location("check_cuda_graph", REPO / "benchmarks" / "check_cuda_graph.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.chdir(REPO)
    assert any("train.deterministic=true" in args for args in check.CONFIGS.values())
    for args in check.CONFIGS.values():
        config.parse_args([*args, *bench.QUIET, "train.cuda_graph=true"])  # the graph run's command line


@pytest.mark.parametrize("args, message", [
    (["--variants", "blog,fastset"], "--variants: no variant fastset; choose from blog, project, default, fastest, dcgan"),
    (["--processes", "1,0"], "--processes 1,0: give process counts of 1 or more"),
    (["--ttq-custom", "r1=configs/seed-r1.yaml"], "--custom/--ttq-custom r1=configs/seed-r1.yaml: give NAME=CONFIG"),
])
def test_bench_refuses_a_mistaken_command_line_before_its_first_measurement(tmp_path, args, message):
    """A typo used to surface minutes in (a KeyError after the variants before it, or a failed run)."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench", *args, "--out", str(out)], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"error: {message}" in result.stderr, result.stderr[-2000:]
    assert not out.exists()
