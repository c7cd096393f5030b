"""The R1 penalty on D and its lazy schedule."""

from __future__ import annotations

import torch
from torch import Tensor


def r1_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """E ||grad_x D(x)||^2 over the real batch (Mescheder et al. 2018, "Which training methods for GANs
    actually converge?"): it flattens D on the data, which damps the oscillation around the equilibrium.
    `real` must require grad; the result is differentiable in D's parameters (a double backward)."""
    gradient, = torch.autograd.grad(real_logits.float().sum(), real, create_graph=True)
    return gradient.float().square().flatten(1).sum(1).mean()


def r1_weight(gamma: float, every: int, step: int) -> float:
    """The R1 penalty's weight at `step` (counted from 1): gamma * every on every `every`-th step, else 0.

    Lazy regularisation (Karras et al. 2020, StyleGAN2): the same mean weight per step for 1/every
    of the second backward's cost. The schedule follows the global step, so a resumed run keeps it.
    """
    return gamma * every if gamma and step % every == 0 else 0.0
