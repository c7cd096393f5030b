"""`torchvision`: one of torchvision's data sets (`data.torchvision_name`) under the root `data.path`, found there
(no download without network access)."""

from __future__ import annotations

import torch

from train.config import DataConfig
from train.data.readers._base import Read, Reader
from train.errors import DataError


class Torchvision(Reader):
    def read(self, cfg: DataConfig, split: str, labelled: bool) -> Read:
        dataset = _torchvision_dataset(cfg.path, cfg.torchvision_name, train=split == "train")
        labels = torch.as_tensor(dataset.targets).long() if labelled else None
        return Read(_torchvision_images(dataset), len(getattr(dataset, "classes", ())), labels)

    def has_test_split(self, cfg: DataConfig) -> bool:
        return True  # every data set torchvision ships has train=False

    def identity(self, data: dict) -> tuple[str, str, str | None]:
        return data["torchvision_name"], data["torchvision_name"].lower(), None


READER = Torchvision()


def _torchvision_images(dataset) -> torch.Tensor:
    """A VisionDataset's `data` as uint8 [N, C, H, W]: [N, H, W] (the MNIST family) or [N, H, W, 3] (CIFAR)."""
    images = torch.as_tensor(dataset.data)
    return images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()


def _torchvision_dataset(root: str, name: str, train: bool):
    import torchvision

    dataset_class = getattr(torchvision.datasets, name)
    try:
        dataset = dataset_class(root=root, train=train, download=True)
    except Exception as error:  # URLError, RuntimeError, ...: the download failed
        raise DataError(
            f"torchvision could not find or download {name} under {root!r}: {error}. Without network access, "
            f"place the IDX files in {root}/{name}/raw, or use data.source=idx with the files shipped in data/mnist"
        ) from None
    return dataset
