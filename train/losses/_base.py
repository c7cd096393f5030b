"""What a GAN loss is: D's loss on real and fake logits, G's loss on the fake logits, and how D's outputs are
summarised for the logs (`d/real`, `d/fake`), each on logits that mean "real" (float32; safe under autocast)."""

from __future__ import annotations

from torch import Tensor


class GANLoss:
    """A loss of `loss.kind`; `summary` names what its D outputs mean (a probability for BCE, a score for hinge)."""

    def discriminator(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        raise NotImplementedError

    def generator(self, fake_logits: Tensor) -> Tensor:
        raise NotImplementedError

    def summary(self, real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
        """(d/real, d/fake): device work only (it runs inside the training step, which may be a CUDA graph)."""
        raise NotImplementedError
