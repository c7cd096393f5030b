"""Image data read from its source (IDX files, Hugging Face `datasets`, torchvision, an image folder), and the
test split held out of data without one.

Every source ends as one uint8 tensor [N, C, H, W] (and, for class-conditional training, int64
labels [N]), which train/data/sharding.py deals to the ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from train.config import SHIPPED_MNIST, DataConfig
from train.data import pictures, readers
from train.data.images import MNIST, MNIST_DATASET, ImageSpec
from train.data.readers.idx import read_idx_images
from train.errors import DataError

HOLDOUT_SEED = 20261206  # draws the held-out test split of data without one (data.holdout)


@dataclass
class ImageSet:
    """A split of the data as the run uses it: the images, their labels (when asked for) and their description."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N] in 0..spec.num_classes - 1; None where not asked for
    spec: ImageSpec


def load(cfg: DataConfig, split: str = "train", labelled: bool = False) -> ImageSet:
    """`split` of the configured source, on the CPU, described by the source; with its labels where `labelled`
    (class-conditional training), which the source must then have. Data without a test split is split here:
    `data.holdout` of its training images are its test split, and the rest its training split (except MNIST's
    images, which MNIST's shipped test set scores)."""
    if cfg.holdout == 0 or _has_test_split(cfg):
        return _read(cfg, split, labelled)
    training = _read(cfg, "train", labelled)
    if holds_out(cfg, training.spec):
        return _held_out(training, cfg.holdout, split)
    return training if split == "train" else _read(cfg, split, labelled)


def recorded_config(recorded: dict) -> DataConfig:
    """The data config a state.json or generator.json records (keys this code does not know are dropped)."""
    known = {key: value for key, value in recorded.items() if key in DataConfig.__dataclass_fields__}
    return DataConfig(**{"holdout": 0.0} | known)  # recorded before data.holdout: nothing was held out


def holds_out(cfg: DataConfig, images: ImageSpec) -> bool:
    """Whether the test split of the data `cfg` reads, `images`, is a held-out part of its training images: data
    other than MNIST's, labelled or not, from a source without a test split of its own, with data.holdout above 0."""
    return cfg.holdout > 0 and images.dataset != MNIST_DATASET and not _has_test_split(cfg)


def _has_test_split(cfg: DataConfig) -> bool:
    """Whether the source holds a test split beside the training one."""
    return readers.load(cfg.source).has_test_split(cfg)


def _held_out(training: ImageSet, share: float, split: str) -> ImageSet:
    """The test split (`share` of `training`'s images, drawn by a fixed seed: the same on every rank, run and tool)
    or the training split (the others, in their order). Data too small for `share` to hold out an image is all
    training split, and has no test split."""
    count, held = len(training.images), round(share * len(training.images))
    if held == count or (held == 0 and split == "test"):
        raise DataError(f"data.holdout={share} of {count} training images leaves {held} to test and {count - held} "
                        "to train on; this data has no test split of its own, so give it one (a test split beside the "
                        "training one) or set data.holdout to leave some of each")
    test = torch.zeros(count, dtype=torch.bool)
    test[torch.randperm(count, generator=torch.Generator().manual_seed(HOLDOUT_SEED))[:held]] = True
    chosen = test if split == "test" else ~test
    images = training.images[chosen]
    return ImageSet(images, None if training.labels is None else training.labels[chosen],
                    dataclasses.replace(training.spec, dataset=identify(images)))


def _read(cfg: DataConfig, split: str, labelled: bool) -> ImageSet:
    """`split` as the source holds it, checked and converted as `data.resolution` and `data.channels` ask."""
    where = f"data.source={cfg.source} data.path={cfg.path!r}"
    read = readers.load(cfg.source).read(cfg, split, labelled)
    images, num_classes, labels = read.images, read.num_classes, read.labels
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{where} gave {images.dtype} data of shape {tuple(images.shape)} (as [N, channels, height, "
                        "width]); the networks need uint8 grey or RGB images (e.g. MNIST's train-images file, not its "
                        "labels)")
    images = pictures.conform(images, cfg.resolution, cfg.channels, where)
    if labelled:
        if not num_classes or labels is None:
            raise DataError(f"{where} has no labels; model.conditional=true needs a class label per image (or set "
                            "model.conditional=false)")
        if labels.dim() != 1 or len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            span = f" from {int(labels.min())} to {int(labels.max())}" if labels.numel() else ""
            allowed = "0" if num_classes == 1 else f"0-{num_classes - 1}"
            raise DataError(f"{where} gave labels of shape {tuple(labels.shape)}{span}; model.conditional=true needs "
                            f"one class label ({allowed}) per image")
    return ImageSet(images, labels, ImageSpec(images.shape[1], images.shape[2], images.shape[3], num_classes,
                                              identify(images)))


def identify(images: torch.Tensor) -> str:
    """The data set `images` [N, C, H, W] are: "mnist" where each is one of MNIST's training images (the shipped
    files' content, whatever the source), so that MNIST's feature network and test set describe them; else their
    content hash."""
    if images.shape[1:] == MNIST.shape and _all_in_mnist(images):
        return MNIST_DATASET
    return "sha256:" + hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def _all_in_mnist(images: torch.Tensor) -> bool:
    mnist = read_idx_images(SHIPPED_MNIST, "train")
    if len(images) == len(mnist) and torch.equal(images[:, 0], mnist):
        return True  # the shipped files themselves: no need to look each image up
    known = {image.tobytes() for image in mnist.numpy()}
    return all(image.tobytes() in known for image in images.numpy())
