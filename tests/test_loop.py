"""`python -m train` as a user runs it: reproducible, finite, and refusing bad input before any work."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from conftest import REPO, TINY, all_state, assert_bitwise_equal, final_weights, logged_metrics, run_env, run_train
from train import config, losses, setup
from train.tracking import TrainingWindow

TIMINGS = ("images_per_second", "train_seconds")


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory) -> dict:
    """Three finished TINY runs: "a" and "b" with seed 0, "other" with seed 1."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        runs[name] = tmp_path_factory.mktemp(name)
        result = run_train(TINY + [f"run.dir={runs[name]}", f"run.seed={seed}"])
        assert result.returncode == 0, result.stderr[-2000:]
    return runs


def test_same_seed_gives_bitwise_identical_weights_and_another_seed_does_not(seeded_runs):
    a, b, other = (final_weights(seeded_runs[name]) for name in ("a", "b", "other"))
    for network in a:
        assert a[network].keys() == b[network].keys()
        assert all(torch.equal(a[network][key], b[network][key]) for key in a[network])
    assert not all(torch.equal(a["generator"][k], other["generator"][k]) for k in a["generator"])
    timeless = [[{k: v for k, v in line.items() if k not in TIMINGS} for line in logged_metrics(seeded_runs[name])]
                for name in ("a", "b")]
    assert timeless[0] == timeless[1]


@pytest.mark.parametrize("precision, r1_gamma, conditional", [("fp32", 0, False), ("bf16", 0, False),
                                                               ("bf16", 1, True)])
def test_losses_stay_finite(tmp_path, precision, r1_gamma, conditional):
    result = run_train(TINY + [f"run.dir={tmp_path}", f"train.mixed_precision={precision}", "model.arch=seed",
                               f"loss.r1_gamma={r1_gamma}", f"model.conditional={str(conditional).lower()}"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = logged_metrics(tmp_path)
    assert [line["step"] for line in lines] == [3, 6]
    for line in lines:
        assert all(math.isfinite(line[key]) for key in ("loss/d", "loss/g", "d/real", "d/fake"))
        assert 0 <= line["d/real"] <= 1 and 0 <= line["d/fake"] <= 1
        # The R1 penalty (a double backward, here under bf16 autocast) is logged only when it is on.
        assert ("d/r1_penalty" in line) == bool(r1_gamma)
        assert not r1_gamma or 0 < line["d/r1_penalty"] < math.inf


@pytest.mark.slow
def test_deterministic_algorithms_change_nothing_on_the_cpu(tmp_path, eval_cache):
    """train.deterministic is for GPUs, where cuDNN and atomics otherwise vary; on the CPU it must run the
    same maths (also through R1's double backward and an evaluation) and read no uninitialised memory,
    which the mode fills with NaN."""
    args = TINY + ["model.arch=seed", "loss.r1_gamma=1", "loss.r1_every=2", "eval.num_samples=100",
                   f"eval.cache_dir={eval_cache}"]
    for name, deterministic in (("default", "false"), ("deterministic", "true")):
        result = run_train(args + [f"run.dir={tmp_path / name}", f"train.deterministic={deterministic}"])
        assert result.returncode == 0, result.stderr[-2000:]
    assert_bitwise_equal(all_state(tmp_path / "default"), all_state(tmp_path / "deterministic"))
    untimed = TIMINGS + ("eval/seconds",)
    logged = [[{k: v for k, v in line.items() if k not in untimed} for line in logged_metrics(tmp_path / name)]
              for name in ("default", "deterministic")]
    assert "eval/fd" in logged[0][-1] and logged[0] == logged[1]


def test_deterministic_mode_is_on_before_the_first_kernel(monkeypatch, tmp_path):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = config.load("configs/smoke.yaml", TINY + [f"run.dir={tmp_path}", "train.deterministic=true"])
    try:
        setup.set_up(cfg, resume_from=None)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # what cuBLAS needs to be deterministic
    finally:
        torch.use_deterministic_algorithms(False)
    assert not tmp_path.joinpath("config.yaml").exists()  # set_up writes nothing


def test_the_logged_r1_penalty_is_its_mean_over_the_steps_that_computed_it():
    window = TrainingWindow(torch.device("cpu"), losses.load("bce"), r1_penalty=True)
    logits = torch.zeros(4)
    for step, penalty in enumerate([None, None, 3.0, None, None, 5.0], start=1):  # lazy R1, every 3rd step
        window.add(torch.tensor(float(step)), torch.tensor(1.0), logits, logits,
                   None if penalty is None else torch.tensor(penalty))
        window.count_step(regularised=penalty is not None)
    means = window.read(Accelerator(cpu=True), global_batch=8)
    assert (means["loss/d"], means["loss/g"], means["d/real"], means["d/r1_penalty"]) == (3.5, 1.0, 0.5, 4.0)
    window.add(torch.tensor(1.0), torch.tensor(1.0), logits, logits)
    window.count_step()
    assert "d/r1_penalty" not in window.read(Accelerator(cpu=True), global_batch=8)  # no R1 step in this window


@pytest.mark.slow
def test_smoke_config_writes_a_complete_run(tmp_path, eval_cache):
    result = run_train(["--config", "configs/smoke.yaml", f"run.dir={tmp_path}", f"eval.cache_dir={eval_cache}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line["step"] for line in logged_metrics(tmp_path)] == list(range(25, 201, 25))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000200"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000100", "step_00000200"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_00000100.png", "step_00000200.png"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # logging.curves defaults to true
    recorded = (tmp_path / "config.yaml").read_text()
    assert "arch: dcgan" in recorded
    assert "cuda_graph: false" in recorded  # null (wherever it can run) resolved on the CPU, and recorded
    assert not list(tmp_path.glob("checkpoints/.incomplete*"))


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["data.batch_size=0"], "config key 'data.batch_size' is 0"),
    (["train.mixed_precision=fp16"], "train.mixed_precision=fp16 needs a GPU"),
    (["train.cuda_graph=true"], "train.cuda_graph=true needs a CUDA GPU; set train.cuda_graph=false"),
    (["data.batch_size=70000"], "fewer than one global batch"),
    (["data.path=/nonexistent/mnist"], "data.path '/nonexistent/mnist' is not a folder"),
])
def test_bad_input_stops_with_a_message_and_leaves_no_run_dir(tmp_path, overrides, message):
    result = run_train(TINY + [f"run.dir={tmp_path / 'runs' / 'run'}", *overrides])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # neither the run.dir nor the folder made for it


def test_corrupt_data_file_stops_before_the_run_dir_is_made(tmp_path):
    data = shutil.copytree(REPO / "data" / "mnist", tmp_path / "mnist")
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    result = run_train(TINY + [f"run.dir={tmp_path / 'run'}", f"data.path={data}"])
    assert result.returncode == 2 and "train-images-idx3-ubyte.gz is corrupt" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("steps", [6, 3])
def test_rerunning_a_finished_run_changes_nothing_and_says_so(seeded_runs, tmp_path, steps):
    run_dir = shutil.copytree(seeded_runs["a"], tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # resume=auto at or past train.steps, as a requeued job or `make train` twice; another learning rate
    # must not replace the config.yaml that describes the checkpoints.
    result = run_train(TINY + [f"run.dir={run_dir}", f"train.steps={steps}", "optim.g_lr=5e-4"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"nothing to train: {run_dir / 'checkpoints' / 'step_00000006'} is at step 6 and "
            f"train.steps={steps}; to train on, raise train.steps") in result.stdout
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_profile_writes_a_trace_and_an_operator_table(tmp_path):
    result = run_train(TINY + [f"run.dir={tmp_path}", "profile.steps=2", "profile.after=3"])
    assert result.returncode == 0, result.stderr[-2000:]
    ops = (tmp_path / "profile" / "ops.txt").read_text()
    assert ops.startswith("2 training steps") and "by self host (CPU) time" in ops
    per_step = re.search(r"per step: ([\d.]+) top-level host operators \(([\d.]+) with the nested ones\)", ops)
    assert per_step and 50 < float(per_step[1]) < float(per_step[2]), ops[:300]
    assert "aten::convolution_backward" in ops and "ProfilerStep" in ops
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#3", "ProfilerStep#4"}  # the two steps after the first three


def test_a_config_or_resume_mistake_is_reported_before_torch_is_loaded(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("")
    mistakes = {
        "unknown config key 'train.stepz'": ["train.stepz=3"],
        f"{tmp_path} is not a checkpoint: it has no manifest.json": [f"resume={tmp_path}",
                                                                      f"run.dir={tmp_path / 'new'}"],
        f"run.dir '{used}' is not empty and resume=none": ["resume=none", f"run.dir={used}"],
    }
    for message, arguments in mistakes.items():
        probe = (f"import sys\nfrom train.__main__ import main\ncode = main({arguments!r})\n"
                 "print(code, 'torch' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=run_env(), capture_output=True, text=True)
        assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
        assert message in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.jsonl", "used"]  # nothing written


def test_auto_precision_takes_fp32_where_the_cpu_would_emulate_bf16(tmp_path):
    """`train.mixed_precision=auto` (make train's): bf16 only where the kernels torch runs have it natively. A CPU
    limited to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, as on a CPU without AVX-512) trains default.yaml's bf16
    step 30 to 50 times slower than on AMX (docs/performance.md); config.yaml records what was chosen."""
    run_dir = tmp_path / "run"
    result = run_train(TINY + [f"run.dir={run_dir}", "train.mixed_precision=auto"],
                       env=run_env(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "  mixed_precision: fp32\n" in (run_dir / "config.yaml").read_text()
    given = config.load("configs/smoke.yaml", ["train.mixed_precision=bf16"])
    assert setup._precision(given, cpu=True) == "bf16"  # a value other than auto is used as given
