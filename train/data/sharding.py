"""Dealing the data to the ranks: training keeps the images on the device and draws batches by indexing them with
an epoch permutation, so a step costs no host-to-device copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.data.memory import free_on, gib
from train.errors import DataError


def derived_seed(*entropy: int) -> int:
    """A well-mixed 63-bit seed from several integers (run seed, epoch, rank, ...), the same everywhere."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class DataPosition:
    """Where the run is in the data stream: enough to continue mid-epoch exactly."""

    epoch: int = 0
    step_in_epoch: int = 0


class ShardedBatches:
    """Deals each epoch's permutation of the data set to the ranks, batch by batch, on the device.

    The epoch order is a function of (seed, epoch) alone and the global batch is cut from it in
    rank order, so ranks see disjoint samples, every rank runs the same number of steps, and the
    samples a step trains on do not depend on how many processes share the global batch. The
    tail of each epoch that does not fill a global batch is left out of that epoch (a different
    tail each epoch).
    """

    def __init__(self, images: torch.Tensor, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, *, position: DataPosition | None = None, channels_last: bool = False,
                 labels: torch.Tensor | None = None):
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = len(images) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the data set has {len(images)} images, fewer than one global batch of {self.global_batch} "
                f"(data.batch_size={batch_size} x {world_size} processes); lower data.batch_size or use fewer processes"
            )
        if labels is not None and len(labels) != len(images):
            raise DataError(f"the data set has {len(images)} images but {len(labels)} labels; give one label per image")
        needed = images.nbytes + (labels.nbytes if labels is not None else 0)
        if device.type != "cpu" and needed > (free := free_on(device)):  # on the CPU it is already in memory
            raise DataError(f"the data set takes {gib(needed)} and is kept on {device} whole, which has {gib(free)} "
                            "free: lower data.resolution, use fewer images, or a device with more memory")
        self.images = images.to(device)
        self.labels = labels.to(device) if labels is not None else None  # drawn with the images, by the same indices
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.position = position or DataPosition()
        self.epoch_indices = self._indices_for(self.position.epoch)  # this rank's shard: [steps, batch]

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of the whole data set for `epoch`, identical on every rank and device."""
        return torch.randperm(len(self.images), generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))

    def _indices_for(self, epoch: int) -> torch.Tensor:
        used = self.epoch_order(epoch)[: self.steps_per_epoch * self.global_batch]
        per_step = used.view(self.steps_per_epoch, self.world_size, self.batch_size)
        return per_step[:, self.rank].contiguous().to(self.images.device, non_blocking=True)

    def seek(self, position: DataPosition) -> None:
        """Continue from `position` (e.g. restored from a checkpoint); updates self.position in place."""
        self.position.epoch, self.position.step_in_epoch = position.epoch, position.step_in_epoch
        self.epoch_indices = self._indices_for(self.position.epoch)

    def empty_batch(self) -> torch.Tensor:
        """An uninitialised tensor shaped and laid out like the batches `next` returns."""
        return torch.empty(self.batch_size, *self.images.shape[1:], device=self.images.device,
                           memory_format=self.memory_format)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's next batch as float [B, C, H, W] in [0, 1], and its labels [B] (None without labels)."""
        if self.position.step_in_epoch == self.steps_per_epoch:
            self.position.epoch, self.position.step_in_epoch = self.position.epoch + 1, 0
            self.epoch_indices = self._indices_for(self.position.epoch)
        indices = self.epoch_indices[self.position.step_in_epoch]
        self.position.step_in_epoch += 1
        images = self.images[indices].float().div_(255).contiguous(memory_format=self.memory_format)
        return images, self.labels[indices] if self.labels is not None else None
