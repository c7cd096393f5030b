"""Two real processes over gloo: the ranks stay in lockstep and only the updated network communicates."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch
from train.data.sharding import ShardedBatches
from train.data.readers.idx import read_idx_images

pytestmark = pytest.mark.slow
PROBE_STEPS = 5
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module", params=[0, 1], ids=["plain", "r1"])
def probe(request, tmp_path_factory):
    """With and without the R1 penalty, whose double backward runs through the DDP-wrapped D."""
    out = tmp_path_factory.mktemp("probe")
    args = [str(REPO / "tests" / "helpers" / "ddp_probe.py"), str(out), "model.arch=seed", "data.batch_size=8",
            f"train.steps={PROBE_STEPS}", "logging.wandb=disabled", "train.cpu=true", "ema.statistics_images=64",
            f"loss.r1_gamma={request.param}", f"run.dir={out / 'run'}"]
    result = accelerate_launch(2, args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_parameters_agree_and_batchnorm_statistics_are_rank_0s_after_sync(probe):
    local = [load_file(probe / f"rank{r}_local.safetensors") for r in (0, 1)]
    synced = [load_file(probe / f"rank{r}_synced.safetensors") for r in (0, 1)]
    parameters = [key for key in local[0] if not key.rsplit(".", 1)[1].startswith(("running_", "num_batches"))]
    assert parameters
    for key in parameters:
        assert torch.equal(local[0][key], local[1][key]), key
    running = [key for key in local[0] if "running_" in key]
    # Each rank tracks statistics of its own shard (no broadcast between the two D forwards) ...
    assert any(not torch.equal(local[0][key], local[1][key]) for key in running)
    # ... and the sync before eval or saving gives every rank rank 0's, as DDP's default would;
    # the EMA generator's are measured from its own weights, the same on both ranks.
    for key in synced[0]:
        assert torch.equal(synced[0][key], synced[1][key]), key
        if key.startswith("generator_ema.") and key.rsplit(".", 1)[1] in BUFFERS:
            if "running_" in key:
                assert not torch.equal(synced[0][key], synced[0][key.replace("generator_ema.", "generator.")]), key
        else:
            assert torch.equal(synced[0][key], local[0][key]), key


def test_the_ema_generator_is_identical_on_both_ranks(probe):
    local = [load_file(probe / f"rank{r}_local.safetensors") for r in (0, 1)]
    ema_parameters = [key for key in local[0] if key.startswith("generator_ema.") and "running_" not in key]
    assert len(ema_parameters) >= 10
    for key in ema_parameters:
        assert torch.equal(local[0][key], local[1][key]), key
    assert not torch.equal(local[0]["generator_ema.fc.weight"], local[0]["generator.fc.weight"])  # it averages


def test_only_the_network_being_updated_all_reduces(probe):
    for rank in (0, 1):
        counts = json.loads((probe / f"rank{rank}_allreduces.json").read_text())
        assert counts["discriminator/g_step"] == 0  # D runs under no_sync with requires_grad off
        assert counts["generator/d_step"] == 0  # the D step sees G's output detached
        assert counts["discriminator/d_step"] >= PROBE_STEPS
        assert counts["generator/g_step"] >= PROBE_STEPS


def test_ranks_hold_disjoint_shards_that_cover_the_epoch(probe):
    shards = [load_file(probe / f"rank{r}_shard.safetensors")["shard"] for r in (0, 1)]
    assert shards[0].shape == shards[1].shape == (60000 // 16, 8)
    together = torch.cat([shards[0].flatten(), shards[1].flatten()])
    assert len(set(together.tolist())) == together.numel() == 60000  # 60000 = 3750 global batches of 16
    images = read_idx_images(REPO / "data" / "mnist", "train")
    expected = ShardedBatches(images, 8, 0, 2, 0, torch.device("cpu")).epoch_order(0)
    assert torch.equal(torch.stack(shards, 1).flatten(), expected)
