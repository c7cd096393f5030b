"""Class-conditional training (`model.conditional`) and the best checkpoint, on one tiny conditional run."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY, logged_metrics, run_train, snapshot_files
from train.quality import classifier
from train.storage.manifest import complete_checkpoints

# Chance is 0.1. Measured at step 60 with seeds 0, 1 and 2: 0.52, 0.315 and 0.665 (the run below uses seed 0).
AGREEMENT_FLOOR = 0.25
STEPS, EVAL_EVERY = 60, 20
CONDITIONAL = ["model.arch=dcgan", "model.conditional=true", "data.batch_size=16", f"train.steps={STEPS}",
               "checkpoint.every=0", "checkpoint.keep_last=1", f"eval.every={EVAL_EVERY}", "eval.num_samples=200",
               "logging.every=20", "logging.samples_every=0", "logging.wandb=disabled", "logging.curves=false",
               "train.cpu=true", "ema.statistics_images=64"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, eval_cache):
    run_dir = tmp_path_factory.mktemp("conditional")
    result = run_train(CONDITIONAL + [f"run.dir={run_dir}", f"eval.cache_dir={eval_cache}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_tiny_conditional_run_draws_the_asked_digit_better_than_chance(conditional_run, tmp_path, tool_here):
    final = logged_metrics(conditional_run)[-1]
    assert final["eval/label_agreement"] >= AGREEMENT_FLOOR
    assert {f"asked/agreement_{digit}" for digit in range(10)} <= set(final)
    assert np.isclose(np.mean([final[f"asked/agreement_{digit}"] for digit in range(10)]),
                      final["eval/label_agreement"])  # 20 samples asked of each digit
    # The label reaches the generator through `train.sample --label` as well.
    network, agreements = classifier.load(), []
    for digit in range(10):
        out = tmp_path / f"{digit}.npy"
        result = tool_here("sample", "--checkpoint", conditional_run, "--label", digit, "--num", 20, "--out", out,
                           "--device", "cpu")
        assert result.returncode == 0, result.stderr
        agreements.append(classifier.accuracy(network, torch.from_numpy(np.load(out)), torch.full((20,), digit)))
    assert np.mean(agreements) >= AGREEMENT_FLOOR


def test_best_is_the_checkpoint_with_the_lowest_fd_and_keep_last_never_deletes_it(conditional_run, eval_cache,
                                                                                   tool_here):
    evaluations = {line["step"]: line for line in logged_metrics(conditional_run) if "eval/fd" in line}
    assert sorted(evaluations) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    best_step = min(evaluations, key=lambda step: evaluations[step]["eval/fd"])
    best = conditional_run / "checkpoints" / "best"
    assert os.readlink(best) == f"step_{best_step:08d}"
    state = json.loads((best / "state.json").read_text())
    assert state["progress"]["step"] == best_step
    assert state["progress"]["best_fd"] == evaluations[best_step]["eval/fd"]
    # keep_last=1: the newest checkpoint, and the best one wherever it is.
    assert {p.name for p in complete_checkpoints(conditional_run)} == {f"step_{STEPS:08d}", f"step_{best_step:08d}"}
    # The tools take RUN/best; evaluate asks for the digits as training did and gives the logged numbers (on one
    # thread, as the run had: OMP_NUM_THREADS=1; KID's sums on two threads differ in their last bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = tool_here("evaluate", "--checkpoint", best, "--num", 200, "--cache-dir", eval_cache, "--device", "cpu")
    finally:
        torch.set_num_threads(threads)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    logged = evaluations[best_step]
    assert {f"eval/{key}": value for key, value in report["metrics"].items()} == \
        {key: value for key, value in logged.items() if key.startswith("eval/") and key != "eval/seconds"}
    assert {f"asked/{key}_{digit}": value for digit, values in report["per_asked_digit"].items()
            for key, value in values.items()} == {key: value for key, value in logged.items() if key.startswith("asked/")}


def test_resuming_a_conditional_checkpoint_unconditionally_is_refused_before_any_work(conditional_run, tmp_path):
    run_dir = shutil.copytree(conditional_run, tmp_path / "run", symlinks=True)
    before = snapshot_files(run_dir)
    result = run_train(CONDITIONAL + [f"run.dir={run_dir}", f"train.steps={STEPS + 10}", "model.conditional=false"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("error: model.conditional is false, the checkpoint's networks were made with true: set "
            "model.conditional=true to resume, or start a new run.dir") in result.stderr
    assert snapshot_files(run_dir) == before


def test_a_generator_with_class_norm_exports_draws_the_same_and_resumes_only_with_it(tiny_mnist, tmp_path, tool_here):
    run_dir = tmp_path / "run"
    args = TINY + ["model.conditional=true", "model.class_norm=true", f"data.path={tiny_mnist}", f"run.dir={run_dir}"]
    assert (result := run_train(args)).returncode == 0, result.stderr[-3000:]
    exported = tmp_path / "export"
    assert tool_here("export", "--checkpoint", run_dir, "--out", exported).returncode == 0
    assert json.loads((exported / "generator.json").read_text())["class_norm"] is True
    for source, out in ((run_dir, tmp_path / "run.npy"), (exported, tmp_path / "export.npy")):
        assert tool_here("sample", "--checkpoint", source, "--label", 9, "--num", 8, "--out", out).returncode == 0
    assert np.array_equal(np.load(tmp_path / "run.npy"), np.load(tmp_path / "export.npy"))
    before = snapshot_files(run_dir)
    result = run_train(args + ["train.steps=9", "model.class_norm=false"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("error: model.class_norm is false, the checkpoint's generator was made with true: set "
            "model.class_norm=true to resume, or start a new run.dir") in result.stderr
    assert snapshot_files(run_dir) == before


@pytest.mark.parametrize("label, message", [
    ("10", "error: --label 10: the generator of {run} draws classes 0-9; give one of those"),
    ("seven", "error: argument --label: 'seven' is not a class number (0, 1, ...; for MNIST the digit)"),
])
def test_a_label_the_generator_does_not_draw_is_refused_before_any_output(conditional_run, tmp_path, tool_here,
                                                                           label, message):
    result = tool_here("sample", "--checkpoint", conditional_run, "--label", label, "--out", tmp_path / "x.png")
    assert result.returncode == 2
    assert message.format(run=conditional_run) in result.stderr
    assert list(tmp_path.iterdir()) == []
