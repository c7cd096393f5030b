"""A generator and discriminator pair built for the data (the architectures are train/networks/), and sampling
from a generator: latents drawn on the CPU, so the images are the same on any device; pixels rounded as a PNG's."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from train import networks
from train.data.images import MNIST, ImageSpec
from train.networks._layers import GroupBatchNorm2d

GENERATION_CHUNK = 1000  # latents per forward pass when generating samples


def balanced_labels(count: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor | None:
    """0, 1, ..., num_classes - 1, 0, 1, ...: `count` labels with every class equally often, for the samples a
    conditional generator is measured and shown with; None for an unconditional one (num_classes 0)."""
    return torch.arange(count, device=device) % num_classes if num_classes else None


def split_like(labels: Tensor | None, latents: tuple[Tensor, ...]) -> list[Tensor | None]:
    """`labels` cut into the sizes of the latent chunks they go with, or a None for each chunk (unconditional)."""
    return [None] * len(latents) if labels is None else list(labels.split([len(chunk) for chunk in latents]))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to uint8 pixels, rounding exactly as torchvision's save_image does for PNGs."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


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


def set_batchnorm_group(network: nn.Module, group: int | None) -> None:
    """Normalise every GroupBatchNorm2d of `network` over groups of `group` samples during training."""
    for module in network.modules():
        if isinstance(module, GroupBatchNorm2d):
            module.group = group


def build_generator(arch: str, z_dim: int, conditional: bool = False, images: ImageSpec = MNIST,
                    options: networks.NetworkOptions = networks.NetworkOptions()) -> nn.Module:
    """The generator of `model.arch` for `images`, as `options` (the model.* keys networks read) say; a conditional
    one draws the images' classes."""
    return networks.load(arch).build_generator(z_dim, images.num_classes if conditional else 0, images, options)


def build(arch: str, z_dim: int, conditional: bool = False, images: ImageSpec = MNIST,
          options: networks.NetworkOptions = networks.NetworkOptions()) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for `model.arch` and `images`, as `options` say, built in that order (the order
    their weights are drawn in)."""
    network = networks.load(arch)
    num_classes = images.num_classes if conditional else 0
    generator = network.build_generator(z_dim, num_classes, images, options)
    return generator, network.build_discriminator(num_classes, images, options)
