"""`python -m benchmarks.feature_network_time`: seconds to train the self-supervised feature network of unlabelled
data (train/quality/contrastive.py) on the 60,000 colour digits (3x32x32), on the CPU (docs/performance.md)."""

import platform
import time

import torch

from train import colour_digits
from train.data.images import ImageSpec
from train.quality import contrastive


def main() -> None:
    pictures = torch.from_numpy(colour_digits.coloured("train")[0]).permute(0, 3, 1, 2).contiguous()
    started = time.perf_counter()
    contrastive.train(pictures, ImageSpec(3, 32, 32, 0, "colour digits"), "cpu")
    print(f"{len(pictures)} pictures: {time.perf_counter() - started:.1f} s ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
