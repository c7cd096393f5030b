"""The MNIST feature network behind the quality metrics, and the script that trains it.

`python -m train.classifier` trains it on the MNIST training set, prints its test accuracy and
writes `train/assets/mnist_classifier.safetensors`; the SHA-256 below pins the committed weights,
so every evaluation uses exactly the same features. No weights are ever downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from train.data import read_idx_images, read_idx_labels
from train.images import MNIST

WEIGHTS = Path(__file__).resolve().parent / "assets" / "mnist_classifier.safetensors"
WEIGHTS_SHA256 = "dcae5711397f827fdeaae79fcf73c7433363aab82b61a4559c5e2428755c28e3"
FEATURE_DIM = 128
IMAGES = MNIST  # what it was trained on, and so the only images its features describe


class MnistClassifier(nn.Module):
    """Two conv blocks and a 128-unit hidden layer: the hidden layer is the feature space."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(IMAGES.channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (IMAGES.height // 4) * (IMAGES.width // 4), FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, IMAGES.num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(penultimate features, class logits) for float images [N, 1, 28, 28] (IMAGES) in [0, 1]."""
        features = self.features(images)
        return features, self.head(features)


def load(device: torch.device | str = "cpu") -> MnistClassifier:
    """The committed feature network, after checking its SHA-256."""
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RuntimeError(f"{WEIGHTS} has SHA-256 {digest}, expected {WEIGHTS_SHA256}: restore it from git "
                           "(`git checkout -- train/assets`) or retrain it with `python -m train.classifier`")
    network = MnistClassifier()
    network.load_state_dict(load_file(WEIGHTS))
    return network.to(device).eval()


@torch.no_grad()
def accuracy(network: MnistClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    device = next(network.parameters()).device
    correct = 0
    for chunk, truth in zip(images.split(batch_size), labels.split(batch_size)):
        _, logits = network(chunk.to(device).unsqueeze(1).float().div(255))
        correct += (logits.argmax(1).cpu() == truth).sum().item()
    return correct / len(labels)


def train(data_dir: Path, epochs: int, seed: int, device: str) -> MnistClassifier:
    torch.manual_seed(seed)
    images, labels = read_idx_images(data_dir, "train"), read_idx_labels(data_dir, "train")
    network = MnistClassifier().to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * (len(images) // 128))
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for batch in order[: len(order) // 128 * 128].view(-1, 128):
            x = images[batch].to(device).unsqueeze(1).float().div(255)
            shift = torch.randint(-2, 3, (2,)).tolist()  # small random translations: more robust features
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            _, logits = network(x)
            loss = F.cross_entropy(logits, labels[batch].to(device).long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.4f}", flush=True)
    return network.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.classifier", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "data" / "mnist"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    network = train(Path(args.data), args.epochs, args.seed, args.device)
    test_accuracy = accuracy(network, read_idx_images(Path(args.data), "test"), read_idx_labels(Path(args.data), "test"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in network.state_dict().items()}, args.out)
    digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()
    print(f"test accuracy {test_accuracy:.4%}; wrote {args.out} (SHA-256 {digest}); "
          "set WEIGHTS_SHA256 in train/classifier.py to that digest")


if __name__ == "__main__":
    main()
