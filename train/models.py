"""Generators and discriminators: the blog's (28x28 grey only) and DCGAN's (built for the data's size and channels).

Generators map z ~ N(0, I) to images in [0, 1]; discriminators return one logit per image (the
loss applies the sigmoid, which keeps it correct under autocast). Nothing here knows about
processes, devices or precision.

With `num_classes` > 0 both are class-conditional and take the labels as their second argument:
the generator reads a learned embedding of the label beside z, the discriminator adds a
projection of the label onto its features to its logit (Miyato & Koyama 2018).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.data.images import MNIST, ImageSpec
from train.errors import DataError


LABEL_EMBEDDING_DIM = 32  # the size of the label code a conditional generator reads beside z
MAX_BASE = 8  # DCGAN's smallest map is at most this wide
GENERATION_CHUNK = 1000  # latents per forward pass when generating samples


def balanced_labels(count: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor | None:
    """0, 1, ..., num_classes - 1, 0, 1, ...: `count` labels with every class equally often, for the samples a
    conditional generator is measured and shown with; None for an unconditional one (num_classes 0)."""
    return torch.arange(count, device=device) % num_classes if num_classes else None


def split_like(labels: Tensor | None, latents: tuple[Tensor, ...]) -> list[Tensor | None]:
    """`labels` cut into the sizes of the latent chunks they go with, or a None for each chunk (unconditional)."""
    return [None] * len(latents) if labels is None else list(labels.split([len(chunk) for chunk in latents]))


@torch.no_grad()
def generate(generator: torch.nn.Module, num: int, seed: int, labels: torch.Tensor | None = None,
             batch_size: int = GENERATION_CHUNK) -> torch.Tensor:
    """`num` images in [0, 1] from z drawn on the CPU with `seed` (and `labels` for a conditional generator):
    the same on any device."""
    z = torch.randn(num, generator.z_dim, generator=torch.Generator().manual_seed(seed))
    device = next(generator.parameters()).device
    chunks = z.split(batch_size)
    label_chunks = split_like(labels.to(device) if labels is not None else None, chunks)
    return torch.cat([generator(chunk.to(device), chunk_labels).float().cpu()
                      for chunk, chunk_labels in zip(chunks, label_chunks)])


class LabelledLatent(nn.Module):
    """z with a learned embedding of each label beside it: how a conditional generator is told the digit."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, LABEL_EMBEDDING_DIM)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        return torch.cat([z, self.embedding(labels)], dim=1)


class Projection(nn.Module):
    """The projection discriminator's class term: <embedding(label), features>, added to the logit."""

    def __init__(self, num_classes: int, features: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, features)
        nn.init.xavier_uniform_(self.embedding.weight)  # as Miyato & Koyama's code: N(0, 1) would swamp the logit

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return (self.embedding(labels) * features.flatten(1)).sum(1)


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are over fixed groups of `group` consecutive samples (ghost BatchNorm;
    None: over the whole batch, as nn.BatchNorm2d). A sample's output then depends on its group only, not on how
    the batch is cut between processes or accumulation steps, as long as every cut falls between groups: each
    group goes through BatchNorm's own kernel, as it would alone. The running statistics follow the first group,
    as those of a run whose processes each normalise one group follow rank 0's (the ones saved)."""

    group: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.group is None or len(x) <= self.group:
            return super().forward(x)
        first, *rest = x.split(self.group)
        return torch.cat([super().forward(first)] + [
            F.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps) for part in rest])


class ClassBatchNorm2d(GroupBatchNorm2d):
    """Conditional BatchNorm (de Vries et al. 2017; the generator Miyato & Koyama pair with the projection
    discriminator): the normalised map's gain and bias also move with the class, by learned per-class offsets that
    start at zero, so the class shapes every stage of G, not only its first."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__(channels)
        self.class_gain, self.class_bias = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
        nn.init.zeros_(self.class_gain.weight)
        nn.init.zeros_(self.class_bias.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        gain, bias = (offsets(labels)[:, :, None, None] for offsets in (self.class_gain, self.class_bias))
        return super().forward(x) * (1 + gain) + bias


def set_batchnorm_group(network: nn.Module, group: int | None) -> None:
    """Normalise every GroupBatchNorm2d of `network` over groups of `group` samples during training."""
    for module in network.modules():
        if isinstance(module, GroupBatchNorm2d):
            module.group = group


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


def check_seed_images(images: ImageSpec) -> None:
    """The blog's networks draw MNIST's shape only."""
    if images.shape != MNIST.shape:
        raise DataError(f"model.arch=seed (the blog's networks) draws {'x'.join(map(str, MNIST.shape))} images; these "
                        f"are {'x'.join(map(str, images.shape))}: use model.arch=dcgan")


def build_generator(arch: str, z_dim: int, upsample: str = "fused", conditional: bool = False,
                    images: ImageSpec = MNIST, class_norm: bool = False) -> nn.Module:
    """The generator of `model.arch` for `images`; `upsample` picks the seed generator's implementation. A
    conditional one draws the images' classes; with `class_norm` (DCGAN) through every BatchNorm too."""
    num_classes = images.num_classes if conditional else 0
    if arch == "seed":
        check_seed_images(images)
        return SeedGenerator(z_dim, upsample, num_classes)
    if arch == "dcgan":
        return DCGANGenerator(z_dim, num_classes=num_classes, images=images, class_norm=class_norm)
    raise ValueError(f"unknown model.arch {arch!r}")


def build(arch: str, z_dim: int, upsample: str = "fused", conditional: bool = False, images: ImageSpec = MNIST, *,
          class_norm: bool = False, d_width: int = 64) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for `model.arch` and `images`, built in that order (the order their weights are
    drawn in); `d_width`: DCGAN's D's first width (model.d_width)."""
    generator = build_generator(arch, z_dim, upsample, conditional, images, class_norm)
    num_classes = images.num_classes if conditional else 0
    discriminator = (SeedDiscriminator(num_classes) if arch == "seed" else
                     DCGANDiscriminator(d_width, num_classes, images))
    return generator, discriminator
