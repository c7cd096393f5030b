"""`python -m train.colour_digits --out data/colour_digits`: the shipped MNIST as an image folder of another shape.

Each digit padded by 2 pixels to 32x32 and drawn in one of eight colours on black, saved as a PNG in
`OUT/train/<digit>/` or `OUT/test/<digit>/`: the layout of your own images (one folder per class),
made offline, so that `configs/colour_digits.yaml` shows a run on RGB pictures end to end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.config import SHIPPED_MNIST
from train.data.readers.idx import read_idx_images, read_idx_labels
from train.errors import EXIT_BAD_INPUT

COLOURS = torch.tensor([[255, 64, 64], [64, 255, 64], [64, 64, 255], [255, 255, 64], [255, 64, 255],
                        [64, 255, 255], [255, 160, 32], [255, 255, 255]], dtype=torch.float32) / 255
PADDING = 2  # 28 + 2 x 2 = 32


def coloured(split: str, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` (all: None) MNIST digits of `split` as uint8 RGB pictures [N, 32, 32, 3], the n-th in colour
    n mod 8, and their labels [N]."""
    grey = read_idx_images(SHIPPED_MNIST, split)[:count]
    padded = torch.nn.functional.pad(grey, (PADDING,) * 4).float()[:, None]  # [N, 1, 32, 32]
    colour = COLOURS[torch.arange(len(grey)) % len(COLOURS)][:, :, None, None]  # [N, 3, 1, 1]
    rgb = (padded * colour).round().to(torch.uint8).permute(0, 2, 3, 1)
    return rgb.numpy(), read_idx_labels(SHIPPED_MNIST, split)[:count].numpy()


def write(out: Path, counts: dict[str, int | None]) -> dict[str, int]:
    """The folder: `counts[split]` pictures of each split (all: None); returns how many were written. Every split
    has a folder for each digit the training split holds (a training class without pictures would be refused)."""
    written = {}
    digits = sorted(set(coloured("train", counts.get("train"))[1].tolist())) if "train" in counts else range(10)
    for split, count in counts.items():
        pictures, labels = coloured(split, count)
        for digit in digits:
            (out / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for index, (picture, label) in enumerate(zip(pictures, labels)):
            Image.fromarray(picture).save(out / split / str(label) / f"{index:05d}.png")
        written[split] = len(pictures)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.colour_digits", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to create (it must not exist yet)")
    parser.add_argument("--train", type=int, default=None, help="training pictures (default: all 60,000)")
    parser.add_argument("--test", type=int, default=None, help="test pictures (default: all 10,000)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; choose a new --out (nothing is written into an existing folder)", file=sys.stderr)
        return EXIT_BAD_INPUT
    written = write(out, {"train": args.train, "test": args.test})
    print(f"wrote {written['train']} training and {written['test']} test pictures (3x32x32, one folder per digit) "
          f"to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
