"""`model.arch: dcgan`: DCGAN (Radford et al. 2016), built for the data's size and channels; `model.g_width` and
`model.d_width` set G's last and D's first width, `model.class_norm` gives a conditional G class-conditional
BatchNorms."""

from __future__ import annotations

import functools

from torch import Tensor, nn

from train.data.images import MNIST, ImageSpec
from train.errors import DataError
from train.networks import NetworkOptions
from train.networks._layers import (
    LABEL_EMBEDDING_DIM, ClassBatchNorm2d, GroupBatchNorm2d, LabelledLatent, Projection)

MAX_BASE = 8  # DCGAN's smallest map is at most this wide


def build_generator(z_dim: int, num_classes: int, images: ImageSpec, options: NetworkOptions) -> nn.Module:
    return DCGANGenerator(z_dim, options.g_width, num_classes, images, options.class_norm)


def build_discriminator(num_classes: int, images: ImageSpec, options: NetworkOptions) -> nn.Module:
    return DCGANDiscriminator(options.d_width, num_classes, images)


class LatentToMap(nn.ConvTranspose2d):
    """DCGAN's first layer, a transposed convolution of a 1x1 input to a k x k map, computed as the matrix
    product it is: oneDNN's deconvolution takes about ten times as long for it on a CPU (docs/performance.md).
    The weight keeps ConvTranspose2d's layout, so checkpoints and exports read the same."""

    def forward(self, z: Tensor) -> Tensor:
        return (z.flatten(1) @ self.weight.flatten(1)).view(len(z), self.out_channels, *self.kernel_size)


def dcgan_stages(images: ImageSpec) -> tuple[int, int]:
    """(base, doublings): DCGAN's G starts from a base x base map and doubles it `doublings` times to the data's
    size (D halves it as often): the fewest doublings that bring the size to MAX_BASE or below, e.g. 28 = 7 x 2^2,
    32 = 8 x 2^2, 64 = 8 x 2^3. Refused by name for sizes that halving cannot bring there."""
    base, doublings = images.height, 0
    while base > MAX_BASE and base % 2 == 0:
        base, doublings = base // 2, doublings + 1
    if images.height != images.width or base > MAX_BASE or doublings == 0:
        raise DataError(f"model.arch=dcgan builds square images of a size that halves to at most {MAX_BASE} (e.g. 28, "
                        f"32, 48, 64); these are {images.height}x{images.width}: set data.resolution to such a size")
    return base, doublings


class DCGANGenerator(nn.Module):
    """DCGAN (Radford et al. 2016): a projection to a small map, then transposed convolutions with BN+ReLU, each
    doubling the size and halving the channels, to the data's size and channels."""

    def __init__(self, z_dim: int = 100, width: int = 64, num_classes: int = 0, images: ImageSpec = MNIST,
                 class_norm: bool = False):
        """`class_norm`: a conditional G's BatchNorms are ClassBatchNorm2d (model.class_norm)."""
        super().__init__()
        self.z_dim, self.num_classes, self.images = z_dim, num_classes, images
        base, doublings = dcgan_stages(images)
        channels = [width * 2 ** i for i in reversed(range(doublings))]  # e.g. 128, 64 for 28x28
        norm = functools.partial(ClassBatchNorm2d, num_classes=num_classes) if class_norm else GroupBatchNorm2d
        layers = [LatentToMap(z_dim + (LABEL_EMBEDDING_DIM if num_classes else 0), channels[0], base, bias=False),
                  norm(channels[0]), nn.ReLU()]
        for wider, narrower in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(wider, narrower, 4, 2, 1, bias=False), norm(narrower), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(width, images.channels, 4, 2, 1), nn.Sigmoid())
        self.label = LabelledLatent(num_classes) if num_classes else None

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.label is not None:
            z = self.label(z, labels)
        for layer in self.net:
            z = layer(z, labels) if isinstance(layer, ClassBatchNorm2d) else layer(z)
        return z


class DCGANDiscriminator(nn.Module):
    """DCGAN's discriminator: strided convolutions with LeakyReLU (BN after all but the first), each halving the
    size, down to G's base map, then one convolution over the whole map: one logit."""

    def __init__(self, width: int = 64, num_classes: int = 0, images: ImageSpec = MNIST):
        super().__init__()
        base, doublings = dcgan_stages(images)
        channels = [width * 2 ** i for i in range(doublings)]  # e.g. 64, 128 for 28x28
        layers = [nn.Conv2d(images.channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        for narrower, wider in zip(channels, channels[1:]):
            layers += [nn.Conv2d(narrower, wider, 4, 2, 1, bias=False), GroupBatchNorm2d(wider),
                       nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Conv2d(channels[-1], 1, base, 1, 0))
        self.projection = Projection(num_classes, channels[-1] * base * base) if num_classes else None

    def forward(self, image: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.projection is None:
            return self.net(image).flatten()
        features = self.net[:-1](image)
        return self.net[-1](features).flatten() + self.projection(features, labels)
