"""`hf`: a Hugging Face dataset (a Hub id, a folder or file of parquet, a `save_to_disk` folder) with an `image`
column and, for labels, a `label` column; its pictures decoded once into `data.cache_dir` (train/data/pictures.py)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import torch
from PIL import Image

from train.config import DataConfig
from train.data import pictures
from train.data.readers._base import Read, Reader
from train.errors import DataError


class HuggingFace(Reader):
    def read(self, cfg: DataConfig, split: str, labelled: bool) -> Read:
        dataset = _hf_dataset(cfg.path, cfg.split if split == "train" else split, training=split == "train")
        images = _hf_images(cfg.path, dataset, cfg.resolution, cfg.channels, Path(cfg.cache_dir))
        num_classes = _hf_num_classes(cfg.path, dataset, labelled)
        labels = torch.tensor(_hf_column(dataset, "label")).long() if labelled and num_classes else None
        return Read(images, num_classes, labels)

    def has_test_split(self, cfg: DataConfig) -> bool:
        """A Hub dataset is taken to have one (its loader says where it has not); local files say by their names."""
        path = Path(cfg.path)
        if path.is_file() or (path / "dataset_info.json").is_file():  # one parquet file; one saved Dataset
            return False
        if path.is_dir() and any(path.glob("*.parquet")):
            return any(path.glob("test[.-]*parquet"))
        return True

    def identity(self, data: dict) -> tuple[str, str, str | None]:
        if not Path(data["path"]).exists():  # a Hub id
            return data["path"], data["path"], data["path"]
        return Path(data["path"]).name, "parquet", None


READER = HuggingFace()


def _hf_images(source: str, dataset, resolution: int | None, channels: int | None, cache_dir: Path) -> torch.Tensor:
    """The `image` column as uint8 [N, C, H, W], converted by train/data/pictures.py's rule; decoded once into
    `cache_dir`, keyed by the column's encoded pictures (so a training run's evaluation reads them again at once)."""
    if "image" not in dataset.column_names:
        raise DataError(f"Hugging Face dataset {source!r} has columns {dataset.column_names}; it needs an 'image' column")
    import datasets
    if not isinstance(dataset.features["image"], datasets.Image):
        raise DataError(f"Hugging Face dataset {source!r} has an 'image' column of {dataset.features['image']}, not "
                        "of images (datasets.Image): give the pictures themselves in that column")
    encoded = [_hf_bytes(picture, row, source) for row, picture in enumerate(_hf_column(dataset, "image"))]
    digest = pictures.conversion_digest(resolution, channels)
    for raw in encoded:
        digest.update(len(raw).to_bytes(8, "little") + raw)
    return pictures.decoded_once("hf", digest, cache_dir, ("images",), lambda: {"images": pictures.to_tensor(
        [(f"row {row}", functools.partial(_hf_picture, raw)) for row, raw in enumerate(encoded)], resolution, channels,
        f"Hugging Face dataset {source!r}")})["images"]


def _hf_column(dataset, name: str) -> list:
    """A column's values as Arrow holds them (an image column's encoded pictures, {"bytes": ..., "path": ...}), read
    at once: datasets 4 and later return columns that read row by row (20 s for 60,000 labels here)."""
    return dataset.with_format("arrow")[name].to_pylist()


def _hf_bytes(encoded: dict | None, row: int, source: str) -> bytes:
    """A picture of a `datasets.Image` column read without decoding ({"bytes": ..., "path": ...}): its file's bytes."""
    try:
        if encoded is None or encoded.get("bytes") is None and encoded.get("path") is None:
            raise ValueError("the row holds no picture")
        return encoded["bytes"] if encoded.get("bytes") is not None else Path(encoded["path"]).read_bytes()
    except (OSError, ValueError) as error:
        raise DataError(f"row {row} in Hugging Face dataset {source!r} is not a readable picture "
                        f"({type(error).__name__}: {error}); replace or remove it") from None


def _hf_picture(raw: bytes) -> Image.Image:
    return Image.open(io.BytesIO(raw))


def _hf_num_classes(source: str, dataset, labelled: bool) -> int:
    """The classes of the `label` column: a ClassLabel's names, else the largest whole-number label + 1; 0 without
    a `label` column, or where the run reads no labels and the column holds no class numbers."""
    if "label" not in dataset.column_names:
        return 0
    import datasets
    column = dataset.features["label"]
    if isinstance(column, datasets.ClassLabel):
        return column.num_classes
    if not str(getattr(column, "dtype", "")).startswith(("int", "uint")):  # int8..uint64
        if not labelled:
            return 0
        raise DataError(f"Hugging Face dataset {source!r} has a 'label' column of {column}; class labels are whole "
                        "numbers from 0 (int or ClassLabel)")
    labels = _hf_column(dataset, "label")
    return max(labels) + 1 if labels else 0


def _hf_dataset(source: str, split: str, training: bool):
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hf needs the `datasets` package: pip install datasets") from None
    local = Path(source)
    parquet = local.suffix == ".parquet" or (local.is_dir() and any(local.glob("*.parquet")))
    files = _parquet_files(local, split, training) if parquet else None
    try:
        if files:
            dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        elif local.is_dir() and (local / "dataset_info.json").is_file():
            if not training:
                raise DataError(f"{local} is one saved dataset (save_to_disk), read as the training split; it holds "
                                f"no {split} split")
            dataset = datasets.load_from_disk(str(local))
        else:
            dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # datasets raises many types for "not reachable" and "not found"
        raise DataError(
            f"could not load Hugging Face dataset {source!r} (split {split!r}): {type(error).__name__}: {error}. "
            "Without network access, set data.path to a local folder or parquet file(s) with 'image' and 'label' "
            "columns, or use data.source=idx with the MNIST files shipped in data/mnist"
        ) from None
    return dataset


def _parquet_files(local: Path, split: str, training: bool) -> list[str]:
    """The parquet files of `split`: `local` itself if a file (the training split); in a folder those named for the
    split (`test.parquet`, `train-00000-of-00002.parquet`, as the Hub names them), or, where no file is named for a
    split, every one of them as the training split."""
    if local.is_file():
        if not training:
            raise DataError(f"{local} is one parquet file, read as the training split; for the {split} split put it "
                            f"in a folder beside a {split}.parquet")
        return [str(local)]
    named = sorted(str(p) for p in local.glob(f"{split}[.-]*parquet"))
    if named or any(next(local.glob(f"{other}[.-]*parquet"), None) for other in ("train", "test", "validation")):
        if not named:
            raise DataError(f"{local} holds no parquet file of the split {split!r} ({split}.parquet or "
                            f"{split}-*.parquet)")
        return named
    if not training:
        raise DataError(f"{local} holds parquet files without split names, read as the training split; name the "
                        f"{split} split's files {split}.parquet (or {split}-*.parquet)")
    return sorted(str(p) for p in local.glob("*.parquet"))


