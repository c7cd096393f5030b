"""The generator average: its decay follows the half-life, and its BatchNorm statistics are its own."""

import copy

import pytest
import torch

from train.networks.dcgan import DCGANGenerator
from train.networks.seed import SeedGenerator
from train.ema import STATISTICS_CHUNK, GeneratorEMA

NUMERIC_TOLERANCE = 1e-5  # float32 sums over a few thousand values


def average_of(generator: torch.nn.Module, half_life: float, statistics_images: int = 256) -> GeneratorEMA:
    return GeneratorEMA(copy.deepcopy(generator), generator, half_life, rampup=0,
                        statistics_images=statistics_images, seed=3)


def trained_away(generator: torch.nn.Module) -> torch.nn.Module:
    """A copy whose weights have moved: what G is after some training, against an older average."""
    moved = copy.deepcopy(generator)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return moved


def test_each_update_moves_the_average_by_the_half_life():
    torch.manual_seed(0)
    start = DCGANGenerator()
    ema = average_of(start, half_life=128)
    target = trained_away(start)
    for images_seen in (64, 128, 192):  # three steps of 64 images: 1.5 half-lives
        ema.set_weight(images_seen, batch=64)
        ema.update(target)
    remaining = 0.5 ** 1.5
    for averaged, begun, goal in zip(ema.network.parameters(), start.parameters(), target.parameters()):
        torch.testing.assert_close(averaged, goal + (begun - goal) * remaining, rtol=NUMERIC_TOLERANCE, atol=1e-6)


def test_rampup_shortens_the_half_life_early():
    ema = GeneratorEMA(DCGANGenerator(), DCGANGenerator(), 10_000, rampup=0.05, statistics_images=1)
    ema.set_weight(images_seen=1280, batch=64)  # half-life min(10,000, 0.05 * 1,280) = 64 images
    assert ema.weight.item() == pytest.approx(0.5)


@pytest.mark.parametrize("images", [STATISTICS_CHUNK // 2, 2 * STATISTICS_CHUNK])
def test_the_average_samples_with_the_batchnorm_statistics_of_its_own_weights(images):
    torch.manual_seed(0)
    generator = DCGANGenerator()
    ema = average_of(generator, half_life=64, statistics_images=images)
    ema.set_weight(64, 64)
    ema.update(trained_away(generator))  # the average is no longer G: G's statistics would not fit it
    ema.measure_statistics()

    first_norm = ema.network.net[1]
    pre_norm = ema.network.net[0](ema.statistics_latents[:, :, None, None])
    torch.testing.assert_close(first_norm.running_mean, pre_norm.mean((0, 2, 3)), rtol=NUMERIC_TOLERANCE, atol=1e-6)
    # Equal chunks: the mean of the chunks' unbiased variances; with one chunk, the variance itself.
    chunk_variances = torch.stack([chunk.var((0, 2, 3)) for chunk in pre_norm.tensor_split(max(1, images // STATISTICS_CHUNK))])
    torch.testing.assert_close(first_norm.running_var, chunk_variances.mean(0), rtol=NUMERIC_TOLERANCE, atol=1e-6)
    assert first_norm.momentum == 0.1  # restored for anything that trains the network later
    assert not ema.network.training

    with torch.no_grad():  # eval mode now normalises as batch statistics over the same latents do
        sampled = ema.network(ema.statistics_latents)
        in_batch_mode = copy.deepcopy(ema.network).train()(ema.statistics_latents)
        with_generators_statistics = copy.deepcopy(ema.network)
        with_generators_statistics.load_state_dict(generator.state_dict() | {
            k: v for k, v in ema.network.state_dict().items() if "running_" not in k})
        stale = with_generators_statistics.eval()(ema.statistics_latents)
    if images <= STATISTICS_CHUNK:
        torch.testing.assert_close(sampled, in_batch_mode, rtol=0, atol=2e-3)  # unbiased vs biased variance only
    assert (stale - in_batch_mode).abs().max() > 10 * (sampled - in_batch_mode).abs().max()


def test_statistics_are_measured_once_per_step():
    torch.manual_seed(0)
    generator = DCGANGenerator()
    ema = average_of(generator, half_life=64)
    ema.set_weight(64, 64)
    ema.measure_statistics()
    measured = ema.network.net[1].running_mean.clone()
    ema.measure_statistics()  # nothing changed: the same statistics, not measured again
    assert ema.network.net[1].num_batches_tracked.item() == 1
    ema.set_weight(128, 64)
    ema.update(trained_away(generator))
    ema.measure_statistics()
    assert not torch.equal(ema.network.net[1].running_mean, measured)
    assert ema.network.net[1].num_batches_tracked.item() == 1


def test_measuring_is_deterministic():
    torch.manual_seed(0)
    generator = SeedGenerator()
    first, second = average_of(generator, 64), average_of(generator, 64)
    for ema in (first, second):
        ema.measure_statistics()
    for a, b in zip(first.network.buffers(), second.network.buffers()):
        assert torch.equal(a, b)
