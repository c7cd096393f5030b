"""`hinge` (Lim & Ye 2017; SAGAN, BigGAN): D pushes real scores above 1 and fake ones below -1, G raises the fake
scores. D's outputs are logged as its mean scores (a sigmoid of a hinge score means nothing)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from train.losses._base import GANLoss


class Hinge(GANLoss):
    def discriminator(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()

    def generator(self, fake_logits: Tensor) -> Tensor:
        return -fake_logits.float().mean()

    def summary(self, real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
        return real_logits.float().mean(), fake_logits.float().mean()


LOSS = Hinge()
