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

The noise stream is one for the whole global batch: every process draws the global batch's latents
(and asked labels) and takes its slice, so a sample's latent does not depend on the number of
processes. Where a process's share exceeds data.batch_size, the step accumulates micro-batches
(`accumulation` > 1): the same update up to the order of floating-point sums, given BatchNorm groups
that no micro-batch splits (networks/_layers.GroupBatchNorm2d).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from train import regularisation
from train.data.sharding import ShardedBatches
from train.ema import GeneratorEMA
from train.faults import FaultMonitor
from train.losses._base import GANLoss
from train.tracking import TrainingWindow


@dataclass
class Players:
    """The two networks (as prepared by Accelerate) and their optimizers."""

    generator: nn.Module
    discriminator: nn.Module
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer


class GANStep:
    """The players, their loss, the EMA generator and the step's input buffers; it records into the fault monitor
    and the training window."""

    def __init__(self, accelerator: Accelerator, players: Players, loss: GANLoss, ema: GeneratorEMA,
                 batches: ShardedBatches, *, faults: FaultMonitor, window: TrainingWindow, z_dim: int, num_classes: int,
                 accumulation: int = 1):
        self.accelerator, self.loss, self.accumulation = accelerator, loss, accumulation
        self.generator, self.discriminator = players.generator, players.discriminator
        self.g_optimizer, self.d_optimizer = players.g_optimizer, players.d_optimizer
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
        share = slice(batches.rank * batches.batch_size, (batches.rank + 1) * batches.batch_size)
        latents = torch.randn(batches.global_batch, self.z.shape[1], device=self.z.device, generator=noise)
        self.z.copy_(latents[share])
        if labels is not None:
            self.real_labels.copy_(labels)
            asked = torch.randint(self.num_classes, (batches.global_batch,), device=self.z.device, generator=noise)
            self.fake_labels.copy_(asked[share])

    def __call__(self, r1_weight: float) -> None:
        """Update D, update G through the new D, average G; `r1_weight` > 0 adds the R1 penalty to D's loss.
        With `train.on_nonfinite=skip`, a step whose update is skipped leaves both networks' BatchNorm statistics
        as they were before it: the bad batch leaves no trace."""
        with self.faults.statistics_kept_if_skipped(self.generator, self.discriminator):
            self.update(r1_weight)

    def update(self, r1_weight: float) -> None:
        if self.accumulation > 1:
            statistics = self.accumulated_update(r1_weight)
        else:
            fake = self.generator(self.z, self.fake_labels)
            d_loss, real_logits, fake_logits, r1_penalty = self.update_discriminator(fake, r1_weight)
            statistics = d_loss, self.update_generator(fake), real_logits, fake_logits, r1_penalty
        self.ema.update(self.generator)
        self.window.add(*statistics)

    def update_discriminator(self, fake: torch.Tensor, r1_weight: float):
        """Update D on the real batch and on `fake` detached (G's graph is not touched). Returns D's loss, its
        logits and, where `r1_weight` > 0, the R1 penalty before weighting (else None)."""
        self.discriminator.requires_grad_(True)
        d_loss, real_logits, fake_logits, r1_penalty = self.discriminator_loss(self.real, self.real_labels, fake,
                                                                               self.fake_labels, r1_weight)
        self.d_optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(d_loss)
        if self.faults.allows_update("discriminator", d_loss, self.d_optimizer):
            self.d_optimizer.step()
        return d_loss.detach(), real_logits.detach(), fake_logits.detach(), r1_penalty

    def discriminator_loss(self, real: torch.Tensor, real_labels, fake: torch.Tensor, fake_labels, r1_weight: float):
        """D's loss on `real` and on `fake` detached, with the R1 penalty on `real` where `r1_weight` > 0. Returns the
        loss, D's logits and the penalty before weighting (detached; None without)."""
        real = real.detach().requires_grad_(True) if r1_weight else real  # a view: the buffer stays plain
        real_logits = self.discriminator(real, real_labels)
        fake_logits = self.discriminator(fake.detach(), fake_labels)
        d_loss = self.loss.discriminator(real_logits, fake_logits)
        r1_penalty = None
        if r1_weight:
            r1_penalty = regularisation.r1_penalty(real_logits, real)
            d_loss = d_loss + r1_weight / 2 * r1_penalty
            r1_penalty = r1_penalty.detach()
        return d_loss, real_logits, fake_logits, r1_penalty

    def update_generator(self, fake: torch.Tensor) -> torch.Tensor:
        """Update G through the just-updated D; D gets no gradients and DDP syncs none of its."""
        self.discriminator.requires_grad_(False)
        with self.accelerator.no_sync(self.discriminator):
            fake_logits = self.discriminator(fake, self.fake_labels)
        g_loss = self.loss.generator(fake_logits)
        self.g_optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(g_loss)
        if self.faults.allows_update("generator", g_loss, self.g_optimizer):
            self.g_optimizer.step()
        return g_loss.detach()

    def accumulated_update(self, r1_weight: float) -> tuple:
        """The update of `__call__` in `accumulation` micro-batches: D's gradients summed over the micro-batches
        (each loss divided by their number, so the mean is over the share), then G's the same way; DDP all-reduces
        each network's gradients once, with its last micro-batch. The fakes D sees are drawn without a graph (and
        without touching G's BatchNorm running statistics); G draws each micro-batch again for its own update,
        the same images from the same weights. Returns the window's statistics over the share."""
        parts = self.accumulation
        reals, latents = self.real.chunk(parts), self.z.chunk(parts)
        real_labels, fake_labels = ((labels.chunk(parts) if labels is not None else (None,) * parts)
                                    for labels in (self.real_labels, self.fake_labels))
        with torch.no_grad(), running_statistics_kept(self.generator):
            fakes = [self.generator(z, labels) for z, labels in zip(latents, fake_labels)]
        self.discriminator.requires_grad_(True)
        self.d_optimizer.zero_grad(set_to_none=True)
        d_losses, real_logits, fake_logits, r1_penalties = [], [], [], []
        for index, (real, fake, real_label, fake_label) in enumerate(zip(reals, fakes, real_labels, fake_labels)):
            with self.synced_on_last(self.discriminator, index):
                d_loss, real_part, fake_part, r1_penalty = self.discriminator_loss(real, real_label, fake, fake_label,
                                                                                   r1_weight)
                self.accelerator.backward(d_loss / parts)
            d_losses.append(d_loss.detach())
            real_logits.append(real_part.detach())
            fake_logits.append(fake_part.detach())
            if r1_penalty is not None:
                r1_penalties.append(r1_penalty)
        d_loss = torch.stack(d_losses).mean()
        if self.faults.allows_update("discriminator", d_loss, self.d_optimizer):
            self.d_optimizer.step()
        self.discriminator.requires_grad_(False)
        self.g_optimizer.zero_grad(set_to_none=True)
        g_losses = []
        for index, (z, fake_label) in enumerate(zip(latents, fake_labels)):
            with self.synced_on_last(self.generator, index), self.accelerator.no_sync(self.discriminator):
                g_loss = self.loss.generator(self.discriminator(self.generator(z, fake_label), fake_label))
                self.accelerator.backward(g_loss / parts)
            g_losses.append(g_loss.detach())
        g_loss = torch.stack(g_losses).mean()
        if self.faults.allows_update("generator", g_loss, self.g_optimizer):
            self.g_optimizer.step()
        r1_penalty = torch.stack(r1_penalties).mean() if r1_penalties else None
        return d_loss, g_loss, torch.cat(real_logits), torch.cat(fake_logits), r1_penalty

    def synced_on_last(self, network, index: int):
        """DDP's all-reduce of `network`'s gradients with the last micro-batch only."""
        return self.accelerator.no_sync(network) if index < self.accumulation - 1 else nullcontext()


@contextmanager
def running_statistics_kept(network: nn.Module):
    """Forward passes that leave BatchNorm's running statistics (and their counter) as they were."""
    norms = [module for module in network.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    saved = [(module.momentum, module.num_batches_tracked.clone()) for module in norms]
    for module in norms:
        module.momentum = 0.0
    try:
        yield
    finally:
        for module, (momentum, tracked) in zip(norms, saved):
            module.momentum = momentum
            module.num_batches_tracked.copy_(tracked)

