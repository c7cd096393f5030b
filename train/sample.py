"""`python -m train.sample --checkpoint <path> --num N --seed S --out FILE`: images from a generator.

FILE ending in .png gets a grid; .npy gets the N samples as uint8 [N, H, W] (grey) or [N, H, W, 3]
(RGB), rounded exactly as the PNG is. The checkpoint may be a checkpoint folder, a run directory or an
exported generator. A conditional generator draws the class `--label K` (a digit, for MNIST), or without
it every class, one row each.
"""

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from train.arguments import available_device, check_fits_in_memory, seed
from train.errors import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, CheckpointError
from train.models import generate, to_uint8
from train.sharing.export import load_generator
from train.storage.files import write_atomically
from train.storage.manifest import write_failure_fix


def class_label(text: str) -> int:
    """`--label`'s type: a class number from 0 (the generator's classes are known once it is loaded)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a class number (0, 1, ...; for MNIST the digit)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, run directory or exported generator")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--out", required=True, help="a .png (grid) or .npy (uint8 [N, H, W] or [N, H, W, 3]) file")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-ema", action="store_true", help="sample the trained generator, not its EMA")
    parser.add_argument("--label", type=class_label,
                        help="the class (for MNIST the digit) a conditional generator draws (default: each in turn)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        parser.error(f"--out {out} must end in .png or .npy")
    if out.is_dir():
        parser.error(f"--out {out} is a folder; give the file to write, e.g. {out / ('samples' + out.suffix)}")
    if args.num < 1:
        parser.error("--num must be at least 1")
    try:
        generator = load_generator(args.checkpoint, args.device, use_ema=not args.no_ema)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # The samples in float32 and uint8, and as much again for the PNG's grid or the .npy's buffer.
    check_fits_in_memory(parser, args.num, 2 * (4 + 1) * math.prod(generator.images.shape))
    if args.label is not None and not generator.num_classes:
        print(f"error: --label {args.label}: the generator of {args.checkpoint} is not conditional (trained without "
              "model.conditional=true), so it cannot be asked for a class; leave --label out", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.label is not None and args.label >= generator.num_classes:
        print(f"error: --label {args.label}: the generator of {args.checkpoint} draws classes 0-"
              f"{generator.num_classes - 1}; give one of those", file=sys.stderr)
        return EXIT_BAD_INPUT
    columns = int(np.ceil(np.sqrt(args.num)))
    if not generator.num_classes:
        labels = None
    elif args.label is not None:
        labels = torch.full((args.num,), args.label)
    else:  # one row per class
        columns = -(-args.num // generator.num_classes)
        labels = torch.arange(args.num) // columns
    images = generate(generator, args.num, args.seed, labels)
    encoded = io.BytesIO()
    if out.suffix == ".png":
        save_image(make_grid(images, nrow=columns, padding=2, pad_value=1.0), encoded, format="png")
    else:
        pixels = to_uint8(images)  # [N, C, H, W]: stored as images are, [N, H, W] or [N, H, W, 3]
        np.save(encoded, (pixels[:, 0] if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1)).numpy())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, encoded.getvalue())  # whole or not at all: a file already there stays until then
    except OSError as error:
        print(f"error: writing {out} failed ({error}); {write_failure_fix(error)} and run the same command again",
              file=sys.stderr)
        return EXIT_WRITE_FAILED
    print(f"wrote {args.num} samples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
