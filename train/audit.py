"""`python -m train.audit --checkpoint RUN`: does the generator copy its training images?

For `--num` generated samples, the distance of each to its nearest training image, on the data's
feature network (the one the quality metrics use) and in pixels, set against the same distance for
the data's held-out test images, which no generator saw. The copy rate is the share of samples
nearer a training image than the 1st percentile (metrics.COPY_PERCENTILE) of the test images' distances: about 1% for a
generator that copies nothing (as for the test images themselves, by construction), near 100% for
one that reproduces its training set. The distances are exact (chunked matrix products: samples x
training images x feature size, about 1 TFLOP in pixels for 10,000 samples against MNIST's 60,000
training images, seconds on a CPU; it grows with both counts and the image size). Prints JSON;
`--grid` writes the closest sample/training-image pairs as a PNG (each sample beside its nearest
training image).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import save_image

from train.arguments import (
    add_feature_network, available_device, check_feature_network, check_fits_in_memory, seed)
from train.config import EvalConfig
from train.data import sources
from train.errors import EXIT_BAD_INPUT, DataError, RunError
from train.models import balanced_labels, generate, to_uint8
from train.quality.evaluator import Evaluator, bytes_per_sample
from train.quality.metrics import copy_threshold, extract, nearest
from train.sharing.export import load_generator, scored_with, training_data

REPORTED_PERCENTILES = (1, 5, 25, 50)
GRID_PAIRS = 32


def copy_statistics(sample_distances: Tensor, held_out_distances: Tensor) -> dict:
    """The copy rate of samples whose nearest training image lies at `sample_distances`, with the threshold set by
    the held-out images' `held_out_distances` (the same space: features or pixels), and the percentiles of both."""
    threshold = copy_threshold(held_out_distances)
    return {
        "copy_rate": (sample_distances < threshold).double().mean().item(),
        "threshold": threshold,
        "samples": _percentiles(sample_distances),
        "held_out": _percentiles(held_out_distances),
    }


def _percentiles(distances: Tensor) -> dict[str, float]:
    values = np.percentile(distances.cpu().numpy(), REPORTED_PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(REPORTED_PERCENTILES, values)}


def audit(evaluator: Evaluator, samples: Tensor, training: Tensor) -> tuple[dict, Tensor]:
    """The copy statistics of uint8 `samples` [N, C, H, W] against the uint8 `training` images, on the evaluator's
    features and in pixels, with its test images as the held-out set; and the GRID_PAIRS samples nearest a training
    image in pixels, each followed by that image (uint8 [2 GRID_PAIRS, C, H, W])."""
    features = {"samples": extract(evaluator.network, samples).features, "held_out": evaluator.real.features,
                "training": extract(evaluator.network, training).features}
    pixels = {name: images.flatten(1).float().div(255)
              for name, images in (("samples", samples), ("held_out", evaluator.test_images), ("training", training))}
    report = {"features": _in_space(features)[0]}
    report["pixels"], distances, indices = _in_space(pixels)
    closest = distances.argsort()[:GRID_PAIRS].cpu()
    pairs = torch.stack([samples[closest], training[indices.cpu()[closest]]], dim=1).flatten(0, 1)
    return report, pairs


def _in_space(points: dict[str, Tensor]) -> tuple[dict, Tensor, Tensor]:
    """`copy_statistics` of points["samples"] and points["held_out"] against points["training"], with each sample's
    distance to its nearest training point and that point's index."""
    distances, indices = nearest(points["samples"], points["training"])
    return copy_statistics(distances, nearest(points["held_out"], points["training"])[0]), distances, indices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, run directory or exported generator")
    parser.add_argument("--num", type=int, default=10000, help="generated samples to audit")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--grid", help="write the closest sample/training-image pairs to this PNG")
    parser.add_argument("--cache-dir", default=EvalConfig.cache_dir)
    add_feature_network(parser)
    parser.add_argument("--data-path", help="where the generator's training data is now, if not where it was "
                        "recorded")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_feature_network(parser, args.features, args.inception_weights)  # as given: before anything is read
    if args.num < 1:
        parser.error("--num must be at least 1")
    if args.grid is not None and Path(args.grid).suffix.lower() != ".png":
        parser.error(f"--grid {args.grid} must name a .png file")
    try:  # the generator, its data and the feature network, before any sample is drawn
        generator = load_generator(args.checkpoint, args.device)
        features = args.features or scored_with(args.checkpoint)
        check_feature_network(parser, features, args.inception_weights)
        check_fits_in_memory(parser, args.num, bytes_per_sample(generator.images, features))
        data_cfg = training_data(args.checkpoint, args.data_path)
        training = sources.load(data_cfg)
        if training.spec.dataset != generator.images.dataset:
            raise DataError(f"data.source={data_cfg.source} data.path={data_cfg.path!r} is not the data the generator "
                            f"was trained on ({generator.images.describe()}): an audit against other images says "
                            "nothing of copying; give --data-path of the training data")
        evaluator = Evaluator.for_data(data_cfg, generator.images, Path(args.cache_dir), args.device, features,
                                       args.inception_weights)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    samples = to_uint8(generate(generator, args.num, args.seed, balanced_labels(args.num, generator.num_classes)))
    report, pairs = audit(evaluator, samples, training.images)
    if args.grid is not None:
        save_image(pairs.float().div(255), args.grid, nrow=8, padding=2, pad_value=0.5)
    print(json.dumps({"checkpoint": args.checkpoint, "num_samples": args.num, "seed": args.seed,
                      "training_images": len(training.images), "held_out": evaluator.against,
                      "feature_network": evaluator.feature_network, **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
