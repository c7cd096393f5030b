"""The feature networks behind the quality metrics: classifiers trained on the data's own labelled training split.

MNIST's is committed: `python -m train.quality.classifier` trains it on the MNIST training set, prints its
test accuracy and writes `train/assets/mnist_classifier.safetensors`; the SHA-256 below pins the
committed weights, so every evaluation uses exactly the same features. Any other labelled data set
gets one trained the same way the first time it is evaluated (`for_data`), cached beside the
test-set features under the data's content hash and reused from then on. No weights are ever
downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from train.config import SHIPPED_MNIST
from train.data.images import MNIST, ImageSpec
from train.data.sources import ImageSet
from train.data.readers.idx import read_idx_images, read_idx_labels
from train.storage import tensor_cache

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier.safetensors"  # train/assets
WEIGHTS_SHA256 = "dcae5711397f827fdeaae79fcf73c7433363aab82b61a4559c5e2428755c28e3"
FEATURE_DIM = 128
EPOCHS, MIN_STEPS, SEED, BATCH = 4, 100, 0, 128  # the recipe of every feature network, MNIST's included
RECIPE = (f"{EPOCHS} epochs and at least {MIN_STEPS} steps, seed {SEED}, batch {BATCH}, Adam with a one-cycle rate to "
          "3e-3, shifts of up to 2 pixels")


class FeatureNetwork(nn.Module):
    """Two conv blocks and a 128-unit hidden layer, for the images it is made for: the hidden layer is the feature
    space; the head says the class (`classifies`), or is a contrastive projection of `outputs` (contrastive.py)."""

    def __init__(self, images: ImageSpec = MNIST, outputs: int | None = None, classifies: bool = True):
        super().__init__()
        self.images, self.classifies = images, classifies
        self.features = nn.Sequential(
            nn.Conv2d(images.channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (images.height // 4) * (images.width // 4), FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, images.num_classes if outputs is None else outputs)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(penultimate features, the head's output: class logits where it classifies) for float images
        [N, C, H, W] (as `self.images`) in [0, 1]."""
        features = self.features(images)
        return features, self.head(features)


def load(device: torch.device | str = "cpu") -> FeatureNetwork:
    """MNIST's committed feature network, after checking its SHA-256."""
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RuntimeError(f"{WEIGHTS} has SHA-256 {digest}, expected {WEIGHTS_SHA256}: restore it from git "
                           "(`git checkout -- train/assets`) or retrain it with `python -m train.quality.classifier`")
    network = FeatureNetwork()
    network.load_state_dict(load_file(WEIGHTS))
    return network.to(device).eval()


def for_data(training: ImageSet, cache_dir: Path, device: torch.device | str = "cpu") -> tuple[FeatureNetwork, str]:
    """(the feature network of the labelled `training` split, the SHA-256 of its weights), trained once for this very
    data (seconds for thousands of images, minutes for tens of thousands on a CPU) and cached."""
    return trained_once(training, cache_dir, device, what="feature network", prefix="feature_network", recipe=RECIPE,
                        build=lambda: FeatureNetwork(training.spec),
                        train_now=lambda: train(training.images, training.labels, training.spec, device))


def trained_once(training: ImageSet, cache_dir: Path, device: torch.device | str, *, what: str, prefix: str,
                 recipe: str, build: Callable[[], FeatureNetwork], train_now: Callable[[], FeatureNetwork]
                 ) -> tuple[FeatureNetwork, str]:
    """(a feature network, the SHA-256 of its weights): read from `cache_dir` where `recipe` trained it before for
    this very data (its content hash, `training.spec.dataset`), else trained now by `train_now` and cached; `build`
    makes the network the cached weights load into."""
    spec = training.spec
    path = Path(cache_dir) / f"{prefix}_{spec.dataset.removeprefix('sha256:')[:16]}.safetensors"
    expected = {"images": json.dumps(spec.as_dict(), sort_keys=True), "recipe": recipe}
    weights = tensor_cache.read(path, what, expected)
    if weights is None:
        print(f"training a {what} for the quality metrics on {len(training.images)} {spec.describe()} ({recipe}); "
              f"cached in {path}", flush=True)
        weights = train_now().state_dict()
        tensor_cache.write(path, weights, what, expected)
    network = build()
    network.load_state_dict(weights)
    return network.to(device).eval(), tensor_cache.tensors_sha256(weights)


@torch.no_grad()
def accuracy(network: FeatureNetwork, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """The share of uint8 `images` [N, C, H, W] (or [N, H, W] of grey ones) the network labels as `labels`."""
    device = next(network.parameters()).device
    images, correct = images.reshape(-1, *network.images.shape), 0
    for chunk, truth in zip(images.split(batch_size), labels.split(batch_size)):
        _, logits = network(chunk.to(device).float().div(255))
        correct += (logits.argmax(1).cpu() == truth).sum().item()
    return correct / len(labels)


def train(images: Tensor, labels: Tensor, spec: ImageSpec, device: torch.device | str) -> FeatureNetwork:
    """A feature network for uint8 `images` [N, C, H, W] with `labels` [N], trained by RECIPE from the seed SEED
    (the caller's random state is left as it was)."""
    def loss(network: FeatureNetwork, chosen: Tensor, x: Tensor) -> Tensor:
        shift = torch.randint(-2, 3, (2,)).tolist()  # small random translations: more robust features
        _, logits = network(torch.roll(x, shifts=shift, dims=(2, 3)))
        return F.cross_entropy(logits, labels[chosen].to(x.device).long())

    return fit(lambda: FeatureNetwork(spec), images, loss, device=device, seed=SEED, what="feature network")


def fit(build: Callable[[], FeatureNetwork], images: Tensor, loss: Callable[[FeatureNetwork, Tensor, Tensor], Tensor],
        *, device: torch.device | str, seed: int, what: str, epochs: int = EPOCHS, min_steps: int = MIN_STEPS,
        batch: int = BATCH) -> FeatureNetwork:
    """`build()`'s network trained from `seed` on `loss(network, indices, float images in [0, 1])` over batches of
    `images` in a fresh order each epoch, for `epochs` and at least `min_steps` (small data sets: more epochs, enough
    steps to learn), by Adam with a one-cycle rate to 3e-3; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build().to(device)
        batches_per_epoch = max(len(images) // batch, 1)
        steps = max(epochs * batches_per_epoch, min_steps)
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
        bar = tqdm(total=steps, desc=what, mininterval=0.1 if sys.stderr.isatty() else 30)
        while schedule.last_epoch < steps:
            order = torch.randperm(len(images))
            for chosen in order[: batches_per_epoch * batch].view(batches_per_epoch, -1):
                if schedule.last_epoch == steps:
                    break
                bar.update()
                value = loss(network, chosen, images[chosen].to(device).float().div(255))
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
        bar.close()
    return network.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.quality.classifier", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHIPPED_MNIST))
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    data = Path(args.data)
    network = train(read_idx_images(data, "train")[:, None], read_idx_labels(data, "train"), MNIST, args.device)
    test_accuracy = accuracy(network, read_idx_images(data, "test")[:, None], read_idx_labels(data, "test"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in network.state_dict().items()}, args.out)
    digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()
    print(f"test accuracy {test_accuracy:.4%}; wrote {args.out} (SHA-256 {digest}); "
          "set WEIGHTS_SHA256 in train/quality/classifier.py to that digest")


if __name__ == "__main__":
    main()
