"""An exponential moving average of the generator's weights, the network samples are drawn from.

The decay is set by a half-life in images (StyleGAN2-ADA's ema_kimg) with a ramp-up that keeps the
average short early in training, when the generator changes fastest. Every rank updates its copy
from identical parameters, so the copies stay identical; buffers (BatchNorm statistics) are copied
from the generator whenever the average is used or saved, after rank 0's have been synced.
"""

from __future__ import annotations

import torch
from torch import nn


class GeneratorEMA:
    def __init__(self, network: nn.Module, generator: nn.Module, half_life_images: float, rampup: float):
        """`network`: a fresh generator of the same architecture, which starts as a copy of `generator`."""
        network.load_state_dict(generator.state_dict())
        self.network = network.eval().requires_grad_(False)
        self.averaged = list(self.network.parameters())
        self.half_life_images = half_life_images
        self.rampup = rampup
        # How far this step moves the average towards G (1 - decay), kept on the device so that the
        # update reads it there: the same kernels whatever its value, as a CUDA graph needs.
        self.weight = torch.zeros((), device=self.averaged[0].device)

    def set_weight(self, images_seen: int, batch: int) -> None:
        """The decay for the step that brings the run to `images_seen`: half-life in images, ramped up."""
        half_life = self.half_life_images
        if self.rampup > 0:
            half_life = min(half_life, images_seen * self.rampup)
        self.weight.fill_(1.0 - 0.5 ** (batch / max(half_life, 1e-8)))

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        """average += weight * (G - average), with the weight set by `set_weight`."""
        steps = torch._foreach_sub(list(generator.parameters()), self.averaged)
        torch._foreach_mul_(steps, self.weight)
        torch._foreach_add_(self.averaged, steps)

    @torch.no_grad()
    def copy_buffers(self, generator: nn.Module) -> None:
        for mine, theirs in zip(self.network.buffers(), generator.buffers()):
            mine.copy_(theirs)
