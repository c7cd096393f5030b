"""GAN losses on discriminator logits (float32; safe under autocast).

`bce` is the blog's loss: its Sigmoid + BCELoss written as softplus of logits, the same function
without the overflow. The blog labels real 0 and fake 1; here the logit means "real". Flipping
the logit's sign maps one convention onto the other, so the training dynamics are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Sum of the real and fake terms, each a batch mean (as the blog adds two BCELoss means)."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    raise ValueError(f"unknown loss {kind!r}")


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """Non-saturating BCE (the blog's), or the hinge generator loss."""
    fake_logits = fake_logits.float()
    if kind == "bce":
        return F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"unknown loss {kind!r}")


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
