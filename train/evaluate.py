"""`python -m train.evaluate --checkpoint <checkpoint, run dir or exported dir>`: quality as JSON.

Scores `--num` samples (latents from `--seed`; the EMA generator unless --no-ema) against the test
split of the data the generator was trained on (MNIST's 10,000 test images for MNIST), with that
data's feature network (`--features`: train/quality/evaluator.py), overall and per class; the data is read where the
checkpoint or export records it, or from `--data-path`. `--floor` adds
the same metrics for as many real training images (the values a perfect generator would reach) and
for those images slightly degraded (noise, a 1-pixel shift, a 3x3 blur): how far visible defects
are from the floor. `--bootstrap N` adds how much the FD of this many samples varies from one draw
to another (a 95% interval from N resamples), for the floor too. A conditional generator is asked
for the ten digits in equal numbers, and scored also per asked digit with the classifier's agreement.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from train.arguments import (
    add_feature_network, available_device, check_feature_network, check_fits_in_memory, seed)
from train.config import MIN_EVAL_SAMPLES, DataConfig, EvalConfig
from train.data.images import MNIST
from train.errors import EXIT_BAD_INPUT, RunError
from train.models import balanced_labels, generate, to_uint8
from train.quality.evaluator import Evaluator, bytes_per_sample
from train.sharing.export import load_generator, scored_with, training_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder, run directory or exported generator")
    parser.add_argument("--num", type=int, default=10000)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--no-ema", action="store_true", help="score the trained generator, not its EMA")
    parser.add_argument("--floor", action="store_true",
                        help="also score real training images: as they are (the floor) and slightly degraded")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="add a 95%% interval of the FD from N bootstrap resamples of the generated samples")
    parser.add_argument("--cache-dir", default=EvalConfig.cache_dir)
    add_feature_network(parser)
    parser.add_argument("--data-path", help="where the generator's training data is now, if not where it was "
                        "recorded (MNIST's generators are scored against the shipped MNIST test set)")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_feature_network(parser, args.features, args.inception_weights)  # as given: before anything is read
    if args.checkpoint is None and not args.floor:
        parser.error("give --checkpoint, --floor, or both")
    if args.num < MIN_EVAL_SAMPLES:
        parser.error(f"--num must be at least {MIN_EVAL_SAMPLES}")
    if args.bootstrap < 0 or 0 < args.bootstrap < 20:
        parser.error("--bootstrap needs at least 20 resamples (1000 for a stable 95% interval), or 0 for none")
    try:  # before the test set's features: a wrong path, or a generator without its data, costs no work
        generator = load_generator(args.checkpoint, args.device, use_ema=not args.no_ema) if args.checkpoint else None
        features = args.features or (scored_with(args.checkpoint) if generator else EvalConfig.features)
        check_feature_network(parser, features, args.inception_weights)
        check_fits_in_memory(parser, args.num, bytes_per_sample(generator.images if generator else MNIST, features))
        data_cfg = training_data(args.checkpoint, args.data_path) if generator else DataConfig()  # --floor: MNIST
        evaluator = Evaluator.for_data(data_cfg, generator.images if generator else MNIST, Path(args.cache_dir),
                                       args.device, features, args.inception_weights)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = {"num_samples": args.num, "seed": args.seed, "against": evaluator.against,
              "feature_network": evaluator.feature_network}
    if generator is not None:
        report["checkpoint"] = args.checkpoint
        asked = balanced_labels(args.num, generator.num_classes)
        images = to_uint8(generate(generator, args.num, args.seed, asked))
        report |= evaluator.report(images, asked, bootstrap=args.bootstrap, seed=args.seed)
    if args.floor:
        report["training_set_floor"] = evaluator.training_set_floor(args.num, args.seed)
        if args.bootstrap:
            report["training_set_floor_fd_interval"] = evaluator.fd_interval(
                evaluator.training_images(args.num, args.seed), args.bootstrap, seed=args.seed)
        report["degraded_training_images"] = evaluator.degraded_training_sets(args.num, args.seed)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
