"""What a data source is: a split read as uint8 images with their class count (and labels where asked for),
whether it holds a test split of its own, and how a model card names it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.config import DataConfig


@dataclass
class Read:
    images: torch.Tensor  # uint8 [N, C, H, W] as the source holds them (train/data/sources.py checks and conforms)
    num_classes: int  # the classes the source declares; 0: unlabelled
    labels: torch.Tensor | None  # int64 [N] where asked for and the source has them, else None


class Reader:
    def read(self, cfg: DataConfig, split: str, labelled: bool) -> Read:
        raise NotImplementedError

    def has_test_split(self, cfg: DataConfig) -> bool:
        raise NotImplementedError

    def identity(self, data: dict) -> tuple[str, str, str | None]:
        """(name, type, Hub dataset id or None) of the recorded data config `data` (a generator.json's), for the
        model card; MNIST's images are named MNIST whatever their source (train/sharing/model_card.py)."""
        raise NotImplementedError
