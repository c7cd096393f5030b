"""`python -m benchmarks.feature_network_time`: seconds to train the self-supervised feature network of unlabelled
data (train/quality/contrastive.py) on the 60,000 colour digits (3x32x32), on the CPU; with `--inception`, the
seconds Inception-v3 (train/quality/inception.py) takes per picture, per FD of its 2048 features and per bootstrap
resample of that FD instead (docs/performance.md). Inception's time does not depend on its weights' values: it runs
on random ones."""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from train import colour_digits
from train.data.images import ImageSpec
from train.quality import contrastive, inception, metrics

COLOUR_DIGITS = ImageSpec(3, 32, 32, 0, "colour digits")
EVALUATION_SET = 10_000
RESAMPLES = 5


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def self_supervised() -> None:
    pictures = torch.from_numpy(colour_digits.coloured("train")[0]).permute(0, 3, 1, 2).contiguous()
    started = time.perf_counter()
    contrastive.train(pictures, COLOUR_DIGITS, "cpu")
    print(f"{len(pictures)} pictures: {time.perf_counter() - started:.1f} s ({machine()})")


def inception_features(count: int = 200) -> None:
    with tempfile.TemporaryDirectory() as folder:
        network = inception.load(inception.write_random_weights(Path(folder) / "random.pth"), COLOUR_DIGITS)[0]
    pictures = torch.from_numpy(colour_digits.coloured("test", count)[0]).permute(0, 3, 1, 2).contiguous()
    metrics.extract(network, pictures[:inception.BATCH])  # the first pass allocates
    started = time.perf_counter()
    features = metrics.extract(network, pictures).features
    per_picture = (time.perf_counter() - started) / count
    # An evaluation's sets: 10,000 samples against 10,000 test pictures (the features repeated, with noise).
    real, fake = (features.repeat(EVALUATION_SET // count, 1) + torch.randn(EVALUATION_SET, inception.FEATURE_DIM)
                  for _ in range(2))
    started = time.perf_counter()
    metrics.frechet_distance(real, fake)
    fd_seconds = time.perf_counter() - started
    test_set = metrics.Features(real)
    test_set.gaussian().root  # computed once per test set, as an evaluation keeps it
    started = time.perf_counter()
    metrics.fd_interval(test_set, metrics.Features(fake), RESAMPLES)
    resample_seconds = (time.perf_counter() - started) / (RESAMPLES + 1)
    print(f"Inception-v3: {per_picture:.3f} s a picture; an FD of {inception.FEATURE_DIM} features of "
          f"{EVALUATION_SET:,} samples against {EVALUATION_SET:,} pictures {fd_seconds:.1f} s, each further one "
          f"against the same pictures (eval.fd_resamples) {resample_seconds:.1f} s ({machine()})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feature_network_time",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--inception", action="store_true", help="time Inception-v3's features and FD instead")
    if parser.parse_args().inception:
        inception_features()
    else:
        self_supervised()


if __name__ == "__main__":
    main()
