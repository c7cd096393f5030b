"""The feature network of data without labels: trained on the data's own training split by a contrastive objective
(SimCLR, Chen et al. 2020): two random views of each picture are drawn together in the feature space and apart
from the other pictures of the batch.

The views differ only in framing (a crop zoomed in up to 15% and moved up to 3 pixels, and a hidden square), never
in colour, sharpness or noise: the network must stay sensitive to exactly the defects the metrics are there to see
(blur, noise, a colour or a shape a generator leaves out). It has the classifier's body (train/quality/classifier.py)
and is cached the same way, under the data's content hash; its 128 features are what FD, KID, precision/recall,
density/coverage and the copy rate are computed on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from train.data.images import ImageSpec
from train.data.sources import ImageSet
from train.quality.classifier import FeatureNetwork, fit, trained_once

EPOCHS, MIN_STEPS, SEED, BATCH, TEMPERATURE, PROJECTION = 4, 150, 0, 128, 0.2, 64
RECIPE = (f"SimCLR, {EPOCHS} epochs and at least {MIN_STEPS} steps, seed {SEED}, batch {BATCH} pictures (two views "
          f"each), temperature {TEMPERATURE}, a linear projection to {PROJECTION}, Adam with a one-cycle rate to 3e-3; "
          "views: crops zoomed up to 15% and moved up to 3 pixels, a hidden square of a quarter of the side")
MAX_ZOOM, MAX_SHIFT_PIXELS, HIDDEN_SHARE, GREY_SHARE = 0.15, 3, 0.25, 0.5


def for_data(training: ImageSet, cache_dir: Path, device: torch.device | str = "cpu") -> tuple[FeatureNetwork, str]:
    """(the self-supervised feature network of `training`'s pictures, the SHA-256 of its weights), trained once for
    this very data and cached: the same network whether the pictures come with classes or not."""
    training = ImageSet(training.images, None, dataclasses.replace(training.spec, num_classes=0))
    return trained_once(training, cache_dir, device, what="self-supervised feature network",
                        prefix="contrastive_network", recipe=RECIPE,
                        build=lambda: FeatureNetwork(training.spec, outputs=PROJECTION, classifies=False),
                        train_now=lambda: train(training.images, training.spec, device))


def views(images: Tensor, generator: torch.Generator) -> Tensor:
    """A random framing of each float image [N, C, H, W]: zoomed in by up to MAX_ZOOM, moved by up to
    MAX_SHIFT_PIXELS, with a square of HIDDEN_SHARE of the side set to 0."""
    n, c, h, w = images.shape
    uniform = torch.rand(n, 6, generator=generator).to(images.device)
    if c == 3:  # half the views in grey: matching a grey view to a coloured one takes the shape, not the colour
        grey = (uniform[:, 5] < GREY_SHARE)[:, None, None, None]
        images = torch.where(grey, images.mean(1, keepdim=True).expand_as(images), images)
    scale = 1 - MAX_ZOOM * uniform[:, 0]
    shift = (uniform[:, 1:3] * 2 - 1) * 2 * MAX_SHIFT_PIXELS / torch.tensor([w, h], device=images.device)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    framed = F.grid_sample(images, F.affine_grid(theta, list(images.shape), align_corners=False),
                           align_corners=False, padding_mode="zeros")
    side = max(1, round(HIDDEN_SHARE * min(h, w)))
    top = (uniform[:, 3] * (h - side + 1)).long().clamp(max=h - side)
    left = (uniform[:, 4] * (w - side + 1)).long().clamp(max=w - side)
    rows, columns = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    hidden = (((rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side))[:, :, None]
              & ((columns[None] >= left[:, None]) & (columns[None] < left[:, None] + side))[:, None, :])
    return framed.masked_fill(hidden[:, None], 0.0)


def contrastive_loss(first: Tensor, second: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """NT-Xent: each view's partner among the 2N - 1 other views of the batch, by cosine similarity / temperature."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = len(first)
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, partners)


def train(images: Tensor, spec: ImageSpec, device: torch.device | str) -> FeatureNetwork:
    """A self-supervised feature network for uint8 `images` [N, C, H, W], trained by RECIPE from the seed SEED (the
    caller's random state is left as it was)."""
    framing = torch.Generator().manual_seed(SEED)

    def loss(network: FeatureNetwork, chosen: Tensor, x: Tensor) -> Tensor:
        _, first = network(views(x, framing))
        _, second = network(views(x, framing))
        return contrastive_loss(first, second)

    return fit(lambda: FeatureNetwork(spec, outputs=PROJECTION, classifies=False), images, loss, device=device,
               seed=SEED, what="self-supervised feature network", epochs=EPOCHS, min_steps=MIN_STEPS,
               batch=min(BATCH, len(images)))
