"""`model.arch: seed`: the blog's networks, for 28x28 grey images only. The generator's bilinear upsampling and
3x3 convolution run fused (`model.upsample: fused`, the same function with a third of the arithmetic) or as the
blog's modules (`native`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.data.images import MNIST, ImageSpec
from train.errors import DataError
from train.networks import NetworkOptions
from train.networks._layers import LABEL_EMBEDDING_DIM, GroupBatchNorm2d, LabelledLatent, Projection


def build_generator(z_dim: int, num_classes: int, images: ImageSpec, options: NetworkOptions) -> nn.Module:
    check_images(images)
    return SeedGenerator(z_dim, options.upsample, num_classes)


def build_discriminator(num_classes: int, images: ImageSpec, options: NetworkOptions) -> nn.Module:
    check_images(images)
    return SeedDiscriminator(num_classes)


def check_images(images: ImageSpec) -> None:
    """The blog's networks draw MNIST's shape only."""
    if images.shape != MNIST.shape:
        raise DataError(f"model.arch=seed (the blog's networks) draws {'x'.join(map(str, MNIST.shape))} images; these "
                        f"are {'x'.join(map(str, images.shape))}: use model.arch=dcgan")


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1) -> nn.Sequential:
    """The seed's `Conv` block: convolution without bias (BatchNorm supplies it), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
        GroupBatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _interpolation_matrix(size: int) -> Tensor:
    """[2 size, size]: linear interpolation x2 with align_corners=True, as one matrix."""
    source = torch.arange(2 * size, dtype=torch.float64) * (size - 1) / (2 * size - 1)
    lower = source.floor().long().clamp(max=size - 1)
    upper = (lower + 1).clamp(max=size - 1)
    weight = source - lower
    matrix = torch.zeros(2 * size, size, dtype=torch.float64)
    rows = torch.arange(2 * size)
    matrix.index_put_((rows, lower), 1 - weight, accumulate=True)
    matrix.index_put_((rows, upper), weight, accumulate=True)
    return matrix.float()


def shifted_interpolation(size: int) -> Tensor:
    """[2 size, 3 size]: the interpolation matrix shifted by each 3x3 tap offset (-1, 0, +1), zero-padded."""
    padded = F.pad(_interpolation_matrix(size), (0, 0, 1, 1))
    return torch.cat([padded[offset:offset + 2 * size] for offset in range(3)], dim=1)


def upsample_conv3x3(x: Tensor, weight: Tensor, interpolation: Tensor) -> Tensor:
    """conv2d(UpsamplingBilinear2d(2)(x), weight, padding=1, no bias), with one copy of an intermediate.

    Both operators are linear: mixing channels first, at the low resolution, for each of the 9 taps
    (a 1x1 convolution), then interpolating and shifting each tap's map with fixed matrices (columns,
    then rows) gives the same function with about a third of the arithmetic, and a backward made of
    matrix products. The layouts are chosen so that each product reads its operands as they lie: the
    only copy is of the taps, to put each tap's column offset next to its columns.
    `interpolation` is `shifted_interpolation(size)` for square [n, c, size, size] inputs, on x's device.
    """
    n, c, h, w = x.shape
    o = weight.shape[0]
    taps = F.conv2d(x, weight.permute(0, 2, 3, 1).reshape(9 * o, c, 1, 1))  # [n, (o, dy, dx), h, w]
    taps = taps.view(n, o, 3, 3, h, w).transpose(3, 4).reshape(n * o * 3 * h, 3 * w)  # [(n, o, dy, h), (dx, w)]
    columns_done = taps @ interpolation.T  # [(n, o, dy, h), 2w]
    # The same rows matrix for every (n, o): expanded, not copied.
    rows_done = torch.bmm(interpolation.expand(n * o, 2 * h, 3 * h), columns_done.view(n * o, 3 * h, 2 * w))
    return rows_done.view(n, o, 2 * h, 2 * w)


class SeedGenerator(nn.Module):
    """The blog's generator: Linear -> 256x7x7 -> (bilinear x2, conv) x2 -> 1x1 conv -> sigmoid."""

    def __init__(self, z_dim: int = 100, upsample: str = "fused", num_classes: int = 0):
        super().__init__()
        self.z_dim, self.num_classes, self.images = z_dim, num_classes, MNIST
        self.fused = upsample == "fused"  # else the blog's modules, op by op
        self.fc = nn.Linear(z_dim + (LABEL_EMBEDDING_DIM if num_classes else 0), 7 * 7 * 256)
        self.conv1 = conv_bn_relu(256, 128)
        self.conv2 = conv_bn_relu(128, 64)
        self.to_image = nn.Conv2d(64, 1, kernel_size=1, bias=True)
        if self.fused:
            # Constants moved with the module (computing them in forward would be a host-to-device
            # copy every step), not saved: they are no learned state.
            self.register_buffer("interpolate_7", shifted_interpolation(7), persistent=False)
            self.register_buffer("interpolate_14", shifted_interpolation(14), persistent=False)
        else:
            self.upsample = nn.UpsamplingBilinear2d(scale_factor=2)  # align_corners=True, as in the blog
        self.label = LabelledLatent(num_classes) if num_classes else None

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.label is not None:
            z = self.label(z, labels)
        x = self.fc(z).reshape(-1, 256, 7, 7)
        for block, size in ((self.conv1, 7), (self.conv2, 14)):
            convolution, batch_norm_relu = block[0], block[1:]
            x = (upsample_conv3x3(x, convolution.weight, getattr(self, f"interpolate_{size}")) if self.fused
                 else convolution(self.upsample(x)))
            x = batch_norm_relu(x)
        return self.to_image(x).sigmoid()


class SeedDiscriminator(nn.Module):
    """The blog's discriminator without its final sigmoid: three conv blocks, two max-pools, Linear."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16), nn.MaxPool2d(2),
            conv_bn_relu(16, 32), nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
        )
        self.fc = nn.Linear(7 * 7 * 64, 1)
        self.projection = Projection(num_classes, 7 * 7 * 64) if num_classes else None

    def forward(self, image: Tensor, labels: Tensor | None = None) -> Tensor:
        features = self.features(image).flatten(1)
        logits = self.fc(features).squeeze(1)
        return logits if self.projection is None else logits + self.projection(features, labels)
