"""Inception-v3's features, for the FID the field reports: torch-fidelity's port of TensorFlow's 2015-12-05 network
(the weights of `train.config.INCEPTION_WEIGHTS_URL`), its 2048 pool features of each picture scaled to 299x299 the
way TensorFlow scaled them; grey pictures are given as three equal channels. Read from a file already on the machine
(`train.config.inception_weights`), never downloaded; FD, KID, precision/recall, density/coverage and the copy rate
are computed on its features as on the data's own networks'.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from train.config import INCEPTION_WEIGHTS_URL
from train.data.images import ImageSpec

FEATURE_DIM, BATCH = 2048, 50  # pictures per forward pass: 299x299 activations are large
STANDARD = "pt_inception-2015-12-05"  # torch-fidelity's and clean-fid's name for these weights
STANDARD_SHA256_PREFIX = INCEPTION_WEIGHTS_URL.rsplit("-", 1)[1].removesuffix(".pth")


class InceptionFeatures(nn.Module):
    """Inception-v3 for pictures `images` describes: (2048 features, None) of float pictures in [0, 1]."""

    classifies = False  # ImageNet's classes, not the data's: no class metrics

    def __init__(self, images: ImageSpec, weights: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # imports in seconds

        self.images = images
        self.inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(weights))

    def forward(self, images: Tensor) -> tuple[Tensor, None]:
        pixels = images.mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # grey: three equal channels
        return torch.cat([self.inception(chunk)[0] for chunk in pixels.split(BATCH)]), None


def load(weights: Path, images: ImageSpec, device: torch.device | str = "cpu") -> tuple[InceptionFeatures, str, str]:
    """(Inception-v3 from the file `weights` for pictures like `images`, the file's SHA-256, its name in reports:
    the standard weights by name, any other file as not comparable with published FIDs)."""
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    named = (f"Inception-v3 ({STANDARD})" if digest.startswith(STANDARD_SHA256_PREFIX) else
             f"Inception-v3 weights {weights} (sha256:{digest[:12]}), not the standard {STANDARD}: its FID is not "
             "comparable with published ones")
    return InceptionFeatures(images, weights).to(device).eval(), digest, named


def write_random_weights(path: Path, seed: int = 0) -> Path:
    """A weights file of torch-fidelity's Inception-v3 with random weights, saved as the standard file is (a state
    dict): for timing the network and testing its plumbing where the real file cannot be had. He-initialised, so
    that features neither vanish nor explode through its 94 convolutions; named as not the standard by `load`."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            """Keeps the random initialisation: there are no weights to load yet."""

    with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nothing = Path(folder) / "nothing.pth"
        torch.save({}, nothing)
        network = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(nothing))
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return Path(path)
