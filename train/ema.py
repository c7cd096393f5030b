"""An exponential moving average of the generator's weights, the network samples are drawn from.

The decay is set by a half-life in images (StyleGAN2-ADA's ema_kimg) with a ramp-up that keeps the
average short early in training, when the generator changes fastest. Every rank updates its copy
from identical parameters, so the copies stay identical.

The average's BatchNorm statistics are its own, measured whenever it is used or saved: the
generator's running statistics describe the generator's activations, not the average's, and
with a long half-life the two differ enough to cost sample quality (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import nn

from train.models import balanced_labels, split_like

STATISTICS_CHUNK = 512  # latents per forward pass when measuring statistics: bounded memory, same chunks everywhere


class GeneratorEMA:
    def __init__(self, network: nn.Module, generator: nn.Module, half_life_images: float, rampup: float,
                 statistics_images: int, seed: int = 0):
        """`network`: a fresh generator of the same architecture, which starts as a copy of `generator`.

        `statistics_images` latents, drawn once from `seed`, measure the average's BatchNorm statistics (with
        the digits in turn as labels, for a conditional generator).
        """
        network.load_state_dict(generator.state_dict())
        self.network = network.eval().requires_grad_(False)
        self.averaged = list(self.network.parameters())
        self.half_life_images = half_life_images
        self.rampup = rampup
        device = self.averaged[0].device
        # How far this step moves the average towards G (1 - decay), kept on the device so that the
        # update reads it there: the same kernels whatever its value, as a CUDA graph needs.
        self.weight = torch.zeros((), device=device)
        latents = torch.randn(statistics_images, network.z_dim, generator=torch.Generator().manual_seed(seed))
        self.statistics_latents = latents.to(device)
        self.statistics_labels = balanced_labels(statistics_images, network.num_classes, device)
        self.norms = [m for m in self.network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.statistics_current = False

    def set_weight(self, images_seen: int, batch: int) -> None:
        """The decay for the step that brings the run to `images_seen`: half-life in images, ramped up.

        Called before every update (outside a CUDA graph), so it also marks the statistics out of date.
        """
        half_life = self.half_life_images
        if self.rampup > 0:
            half_life = min(half_life, images_seen * self.rampup)
        self.weight.fill_(1.0 - 0.5 ** (batch / max(half_life, 1e-8)))
        self.statistics_current = False

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        """average += weight * (G - average), with the weight set by `set_weight`."""
        steps = torch._foreach_sub(list(generator.parameters()), self.averaged)
        torch._foreach_mul_(steps, self.weight)
        torch._foreach_add_(self.averaged, steps)

    @torch.no_grad()
    def measure_statistics(self) -> None:
        """The average's own BatchNorm statistics over the fixed latents ("precise BN"), unless current.

        Each chunk's batch statistics weigh equally (cumulative average, momentum None); the chunks
        are of equal size. Deterministic for given weights, so a resumed run measures the same.
        """
        if self.statistics_current or not self.norms:
            return
        momenta = [norm.momentum for norm in self.norms]
        for norm in self.norms:
            norm.reset_running_stats()
            norm.momentum = None
        self.network.train()
        chunks = -(-len(self.statistics_latents) // STATISTICS_CHUNK)
        latents = self.statistics_latents.tensor_split(chunks)
        for chunk, labels in zip(latents, split_like(self.statistics_labels, latents)):
            self.network(chunk, labels)
        self.network.eval()
        for norm, momentum in zip(self.norms, momenta):
            norm.momentum = momentum
        self.statistics_current = True
