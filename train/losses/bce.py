"""`bce`, the blog's loss: its Sigmoid + BCELoss written as softplus of logits, the same function without the
overflow, and G's non-saturating form. The blog labels real 0 and fake 1; here the logit means "real". Flipping
the logit's sign maps one convention onto the other, so the training dynamics are the same. D's outputs are logged
as its probabilities that a batch is real.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from train.losses._base import GANLoss


class BCE(GANLoss):
    def discriminator(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Sum of the real and fake terms, each a batch mean (as the blog adds two BCELoss means)."""
        return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()

    def generator(self, fake_logits: Tensor) -> Tensor:
        return F.softplus(-fake_logits.float()).mean()

    def summary(self, real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
        return real_logits.float().sigmoid().mean(), fake_logits.float().sigmoid().mean()


LOSS = BCE()
