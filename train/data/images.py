"""What the training images are: one description, decided by the data source and handed to the networks, the step,
the metrics, `sample` and `export`, and recorded in every checkpoint and exported generator."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from train.errors import CheckpointError

MNIST_DATASET = "mnist"  # the identity of MNIST's training images, whichever source gave them


@dataclass(frozen=True)
class ImageSpec:
    channels: int  # 1 (grey) or 3 (RGB)
    height: int
    width: int
    num_classes: int  # the classes the source declares (what a conditional run draws); 0: unlabelled
    dataset: str = MNIST_DATASET  # "mnist" for MNIST's images (or some of them), else "sha256:" and their content hash

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def describe(self) -> str:
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        return f"{self.channels}x{self.height}x{self.width} images, {classes} ({self.dataset})"

    def as_dict(self) -> dict:
        return asdict(self)


MNIST = ImageSpec(1, 28, 28, 10)
MAX_SIDE = 4096  # the largest image side a recorded description may claim: larger is a damaged or edited file
MAX_CLASSES = 2 ** 16
SCHEMA = {"channels": int, "height": int, "width": int, "num_classes": int, "dataset": str}  # manifest's form


def recorded(description: dict, where: str = "the description") -> ImageSpec:
    """The images a state.json or a generator.json describes; MNIST's for those written before images were recorded
    (every run could only train on MNIST-shaped data then)."""
    if "images" not in description:
        return MNIST
    spec = ImageSpec(**description["images"])
    if (spec.channels not in (1, 3) or not 1 <= min(spec.height, spec.width) <= max(spec.height, spec.width) <= MAX_SIDE
            or not 0 <= spec.num_classes <= MAX_CLASSES):
        raise CheckpointError(f"{where} records {spec}: not images a network is made for (1 or 3 channels, "
                              f"a size from 1 to {MAX_SIDE}, 0 to {MAX_CLASSES} classes); restore the file")
    return spec
