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

from train.data.memory import available_memory
from train.errors import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, CheckpointError
from train.models import generate
from train.quality.metrics import to_uint8
from train.sharing.export import load_generator
from train.storage.files import write_atomically
from train.storage.manifest import write_failure_fix


def available_device(name: str) -> str:
    """`--device`'s type: the CPU or an accelerator this machine has, refused by argparse before any work."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cpu":
        return name
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if accelerator is None or device.type != accelerator.type or (device.index or 0) >= count:
        seen = f"{count} {accelerator.type} device(s)" if accelerator is not None else "no accelerator"
        raise argparse.ArgumentTypeError(f"{name} is not a device this machine can generate on: it has the CPU and "
                                         f"{seen}; use --device cpu")
    return name


def seed(text: str) -> int:
    """`--seed`'s type: a whole number that a random generator takes (0 to 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 to 2**63 - 1")
    return value


def check_fits_in_memory(parser: argparse.ArgumentParser, count: int, bytes_each: int) -> None:
    """Refuse `--num count` (through argparse: exit 2) where its `bytes_each` per sample exceed the memory this
    machine has available now, before any of it is allocated."""
    available = available_memory()
    if count * bytes_each > available:
        parser.error(f"--num {count} needs about {count * bytes_each / 2 ** 30:.3g} GiB of memory, and this machine "
                     f"has {available / 2 ** 30:.3g} GiB available: ask for at most {available // bytes_each}")


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
