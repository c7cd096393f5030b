"""Resuming on another number of processes continues the run as if it had always had them: the global batch, its
latents and its BatchNorm groups do not depend on how many processes share them (issue 33)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import (PROCESS_COUNT_TOLERANCE, accelerate_launch, all_state, largest_relative_difference,
                      logged_metrics, run_train, weights)
from train.batches import batch_plan, resolve_batches
from train.config import Config
from train.errors import ConfigError
from train.networks._layers import GroupBatchNorm2d
from train.storage import manifest

def plan(global_batch, processes, batch_size, bn_group):
    cfg = Config()
    cfg.data.global_batch, cfg.data.batch_size, cfg.model.bn_group = global_batch, batch_size, bn_group
    return batch_plan(cfg, processes)


def test_ghost_batchnorm_normalises_each_group_as_batchnorm_does_the_group_alone():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 4, 4, requires_grad=True)
    ghost, plain = GroupBatchNorm2d(5), nn.BatchNorm2d(5)
    ghost.group = 4
    with torch.no_grad():
        for norm in (ghost, plain):
            norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
        plain.load_state_dict(ghost.state_dict())
    together = ghost(x)
    alone = torch.cat([plain(part) for part in x.split(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(together)
    (together_grad,) = torch.autograd.grad(together, x, grad)
    (alone_grad,) = torch.autograd.grad(alone, x, grad)
    torch.testing.assert_close(together_grad, alone_grad, rtol=1e-4, atol=1e-5)
    ghost.group = 12  # one group: BatchNorm's own path, bitwise
    assert torch.equal(ghost(x), plain(x))


def test_the_plan_shares_the_global_batch_and_accumulates_where_a_share_exceeds_the_batch_size():
    assert plan(16, 2, 8, 8) == plan(16, 2, 8, 8)
    two = plan(16, 2, 8, 8)
    assert (two.share, two.accumulation) == (8, 1)
    one = plan(16, 1, 8, 8)
    assert (one.share, one.accumulation) == (16, 2)  # two micro-batches of 8: the same update
    assert plan(48, 1, 20, 4).accumulation == 3  # micro-batches of 16: the fewest that fit 20 and divide 48
    with pytest.raises(ConfigError, match=r"cannot be shared by 3 processes: each would take 5\.33333 samples, not a "
                                          r"whole number of groups; process counts that work: 1, 2, 4"):
        plan(16, 3, 8, 4)
    with pytest.raises(ConfigError, match="cannot be shared by 4 processes.*process counts that work: 1, 2;"):
        plan(16, 4, 8, 8)  # a share of 4 would split the BatchNorm groups of 8
    with pytest.raises(ConfigError, match="data.batch_size=4 is smaller than model.bn_group=8, and a forward pass "
                                          "holds at least one"):
        plan(16, 1, 4, 8)


def test_a_new_run_normalises_over_each_process_share_and_a_resumed_one_keeps_its_checkpoints(tmp_path):
    cfg = resolve_batches(Config(), None, processes=2)
    assert (cfg.data.global_batch, cfg.model.bn_group) == (128, 64)  # data.batch_size 64 x 2; each share one group
    run_dir = tmp_path / "run"
    args = ["model.arch=dcgan", "data.batch_size=8", "train.steps=2", "logging.every=1", "logging.samples_every=0",
            "checkpoint.every=0", "logging.wandb=disabled", "logging.curves=false", "train.cpu=true",
            "eval.num_samples=0", "ema.statistics_images=64", "model.bn_group=4", f"run.dir={run_dir}"]
    assert run_train(args).returncode == 0
    refused = run_train(args + ["train.steps=4", "model.bn_group=2"])
    assert refused.returncode == 2 and "model.bn_group=2, and checkpoint" in refused.stderr
    assert "was trained with 4: set model.bn_group=4 (or leave it null) to resume" in refused.stderr


@pytest.mark.slow
def test_a_run_that_goes_from_1_to_2_to_1_processes_ends_where_a_1_process_run_does(tiny_mnist, tmp_path):
    """Steps 1-10 on one process, 11-20 on two (each taking half of every global batch), 21-30 on one again in
    two micro-batches (data.batch_size=4): the global batch of 8, its latents and its BatchNorm groups of 4 are
    those of the uninterrupted run."""
    def args(run_dir, steps, *extra):
        return ["model.arch=dcgan", "model.conditional=true", "data.batch_size=8", f"data.path={tiny_mnist}",
                f"train.steps={steps}", "loss.r1_gamma=1", "loss.r1_every=3", "model.bn_group=4",
                "checkpoint.every=10", "logging.every=5", "logging.samples_every=0", "logging.wandb=disabled",
                "logging.curves=false", "train.cpu=true", "eval.num_samples=0", "ema.statistics_images=64",
                f"run.dir={run_dir}", *extra]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    assert run_train(args(straight, 30)).returncode == 0
    assert run_train(args(moved, 10)).returncode == 0
    two = accelerate_launch(2, ["-m", "train", *args(moved, 20)])
    assert two.returncode == 0, two.stderr[-3000:]
    assert ("step_00000010 was written by 1 process, this launch has 2: the global batch of 8, the data order and "
            "the noise continue, each process taking its share (1 micro-batch(es) of 4)") in two.stdout + two.stderr
    back = run_train(args(moved, 30, "data.batch_size=4"))
    assert back.returncode == 0, back.stderr[-3000:]
    assert "this launch has 1: the global batch of 8" in back.stdout + back.stderr
    assert "(2 micro-batch(es) of 4)" in back.stdout + back.stderr
    difference = largest_relative_difference(weights(all_state(straight)), weights(all_state(moved)))
    assert difference < PROCESS_COUNT_TOLERANCE, difference
    # The losses of the steps on two processes are those of the same steps on one, to float32's sums.
    for line, other in zip(logged_metrics(straight), logged_metrics(moved)):
        assert line["step"] == other["step"] and line["global_batch"] == other["global_batch"] == 8
        if line["step"] <= 10:
            assert line["loss/d"] == other["loss/d"] and line["loss/g"] == other["loss/g"]


@pytest.mark.slow
def test_a_multi_process_checkpoint_from_before_the_global_noise_stream_resumes_and_says_the_noise_restarts(tmp_path):
    """Its ranks drew their own latents: they cannot continue one stream, so the resumed run starts one."""
    run_dir = tmp_path / "run"
    args = ["model.arch=dcgan", "data.batch_size=4", "train.steps=2", "logging.every=1", "logging.samples_every=0",
            "checkpoint.every=0", "logging.wandb=disabled", "logging.curves=false", "train.cpu=true",
            "eval.num_samples=0", "ema.statistics_images=64", f"run.dir={run_dir}"]
    first = accelerate_launch(2, ["-m", "train", *args])
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run_dir / "checkpoints" / "step_00000002"
    state = json.loads((folder / "state.json").read_text())
    del state["noise"], state["config"]["model"]["bn_group"], state["config"]["data"]["global_batch"]
    (folder / "state.json").write_text(json.dumps(state))  # as written before both were recorded
    (folder / manifest.MANIFEST).unlink()
    manifest.write_manifest(folder)
    resumed = accelerate_launch(2, ["-m", "train", *args, "train.steps=3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("step_00000002 was written by 2 processes before the noise stream was one for the global batch: the data "
            "order and global batch continue exactly; the noise stream restarts") in resumed.stdout + resumed.stderr
