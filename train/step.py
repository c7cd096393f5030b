"""One training step on the device: update D on real and fake images, update G through the new D,
average G.

The step reads only tensors that stay at the same addresses (the batch, label and latent buffers
that `sample` refills, the EMA weight, the networks and their optimizers' states) and leaves its
statistics in tensors that do too (the training window, the fault record), with no host
synchronisation and no host-side decision inside it: on one GPU it runs as one replayed CUDA graph
(train/cuda_graph.py). Each phase turns on gradients for its own network only; during the G phase
D's gradients are neither computed nor all-reduced.

Class-conditional (batches with labels): D sees each real image with its label, each fake with the
label G was asked for; those are drawn uniformly from the noise stream, after the latents, so a
resumed run draws the same ones.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from train import losses
from train.data import ShardedBatches
from train.ema import GeneratorEMA
from train.faults import FaultMonitor
from train.tracking import TrainingWindow


class GANStep:
    """The networks (as prepared by Accelerate), their optimizers, the EMA generator and the step's input buffers."""

    def __init__(self, accelerator: Accelerator, loss_kind: str, generator, discriminator, g_optimizer, d_optimizer,
                 ema: GeneratorEMA, faults: FaultMonitor, window: TrainingWindow, batches: ShardedBatches, z_dim: int,
                 num_classes: int):
        self.accelerator, self.loss_kind = accelerator, loss_kind
        self.generator, self.discriminator = generator, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.ema, self.faults, self.window = ema, faults, window
        self.num_classes = num_classes  # of the labels G is asked for; 0: unconditional
        self.real = batches.empty_batch()
        self.z = torch.empty(batches.batch_size, z_dim, device=self.real.device)
        # The labels of the real batch and the ones G is asked for; None when unconditional.
        self.real_labels, self.fake_labels = (
            (torch.empty(batches.batch_size, dtype=torch.long, device=self.real.device) for _ in range(2))
            if batches.labels is not None else (None, None))

    def sample(self, batches: ShardedBatches, noise: torch.Generator) -> None:
        """This rank's next batch (and its labels) and latents (and the labels G is asked for), into the step's
        buffers (in place: a CUDA graph reads them there)."""
        images, labels = batches.next()
        self.real.copy_(images)
        torch.randn(self.z.shape, device=self.z.device, generator=noise, out=self.z)
        if labels is not None:
            self.real_labels.copy_(labels)
            torch.randint(self.num_classes, self.fake_labels.shape, device=self.z.device, generator=noise,
                          out=self.fake_labels)

    def __call__(self, r1_weight: float) -> None:
        """Update D, update G through the new D, average G; `r1_weight` > 0 adds the R1 penalty to D's loss."""
        fake = self.generator(self.z, self.fake_labels)
        d_loss, real_logits, fake_logits, r1_penalty = self.update_discriminator(fake, r1_weight)
        g_loss = self.update_generator(fake)
        self.ema.update(self.generator)
        self.window.add(d_loss, g_loss, real_logits, fake_logits, r1_penalty)

    def update_discriminator(self, fake: torch.Tensor, r1_weight: float):
        """Update D on the real batch and on `fake` detached (G's graph is not touched). Returns D's loss, its
        logits and, where `r1_weight` > 0, the R1 penalty before weighting (else None)."""
        self.discriminator.requires_grad_(True)
        real = self.real.detach().requires_grad_(True) if r1_weight else self.real  # a view: the buffer stays plain
        real_logits = self.discriminator(real, self.real_labels)
        fake_logits = self.discriminator(fake.detach(), self.fake_labels)
        d_loss = losses.discriminator_loss(self.loss_kind, real_logits, fake_logits)
        r1_penalty = None
        if r1_weight:
            r1_penalty = losses.r1_penalty(real_logits, real)
            d_loss = d_loss + r1_weight / 2 * r1_penalty
            r1_penalty = r1_penalty.detach()
        self.d_optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(d_loss)
        if self.faults.allows_update("discriminator", d_loss, self.d_optimizer):
            self.d_optimizer.step()
        return d_loss.detach(), real_logits.detach(), fake_logits.detach(), r1_penalty

    def update_generator(self, fake: torch.Tensor) -> torch.Tensor:
        """Update G through the just-updated D; D gets no gradients and DDP syncs none of its."""
        self.discriminator.requires_grad_(False)
        with self.accelerator.no_sync(self.discriminator):
            fake_logits = self.discriminator(fake, self.fake_labels)
        g_loss = losses.generator_loss(self.loss_kind, fake_logits)
        self.g_optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(g_loss)
        if self.faults.allows_update("generator", g_loss, self.g_optimizer):
            self.g_optimizer.step()
        return g_loss.detach()
