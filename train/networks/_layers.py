"""The parts the networks share: how a conditional generator reads its label, how a conditional discriminator scores
it, and BatchNorm whose statistics do not depend on how a batch is cut between processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LABEL_EMBEDDING_DIM = 32  # the size of the label code a conditional generator reads beside z


class LabelledLatent(nn.Module):
    """z with a learned embedding of each label beside it: how a conditional generator is told the digit."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, LABEL_EMBEDDING_DIM)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        return torch.cat([z, self.embedding(labels)], dim=1)


class Projection(nn.Module):
    """The projection discriminator's class term: <embedding(label), features>, added to the logit."""

    def __init__(self, num_classes: int, features: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, features)
        nn.init.xavier_uniform_(self.embedding.weight)  # as Miyato & Koyama's code: N(0, 1) would swamp the logit

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return (self.embedding(labels) * features.flatten(1)).sum(1)


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are over fixed groups of `group` consecutive samples (ghost BatchNorm;
    None: over the whole batch, as nn.BatchNorm2d). A sample's output then depends on its group only, not on how
    the batch is cut between processes or accumulation steps, as long as every cut falls between groups: each
    group goes through BatchNorm's own kernel, as it would alone. The running statistics follow the first group,
    as those of a run whose processes each normalise one group follow rank 0's (the ones saved)."""

    group: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.group is None or len(x) <= self.group:
            return super().forward(x)
        first, *rest = x.split(self.group)
        return torch.cat([super().forward(first)] + [
            F.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps) for part in rest])


class ClassBatchNorm2d(GroupBatchNorm2d):
    """Conditional BatchNorm (de Vries et al. 2017; the generator Miyato & Koyama pair with the projection
    discriminator): the normalised map's gain and bias also move with the class, by learned per-class offsets that
    start at zero, so the class shapes every stage of G, not only its first."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__(channels)
        self.class_gain, self.class_bias = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
        nn.init.zeros_(self.class_gain.weight)
        nn.init.zeros_(self.class_bias.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        gain, bias = (offsets(labels)[:, :, None, None] for offsets in (self.class_gain, self.class_bias))
        return super().forward(x) * (1 + gain) + bias
