"""Image data read from its source (IDX files, Hugging Face `datasets`, torchvision, an image folder), and the
test split held out of data without one.

Every source ends as one uint8 tensor [N, C, H, W] (and, for class-conditional training, int64
labels [N]), which train/data/sharding.py deals to the ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.config import SHIPPED_MNIST, DataConfig
from train.data import pictures
from train.data.images import MNIST, MNIST_DATASET, ImageSpec
from train.errors import DataError

IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dimension, images: 3 dimensions
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
CHECKSUM_FILE = "SHA256SUMS"
IDX_CLASSES = 10  # every data set of the MNIST family (MNIST, Fashion-MNIST, KMNIST) has ten
HOLDOUT_SEED = 20261206  # draws the held-out test split of data without one (data.holdout)


@dataclass
class ImageSet:
    """A split of the data as the run uses it: the images, their labels (when asked for) and their description."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N] in 0..spec.num_classes - 1; None where not asked for
    spec: ImageSpec


def load(cfg: DataConfig, split: str = "train", labelled: bool = False) -> ImageSet:
    """`split` of the configured source, on the CPU, described by the source; with its labels where `labelled`
    (class-conditional training), which the source must then have. Labelled data without a test split is split
    here: `data.holdout` of its training images are its test split, and the rest its training split (except MNIST's
    images, which MNIST's shipped test set scores)."""
    if cfg.holdout == 0 or _has_test_split(cfg):
        return _read(cfg, split, labelled)
    training = _read(cfg, "train", labelled)
    if holds_out(cfg, training.spec):
        return _held_out(training, cfg.holdout, split)
    return training if split == "train" else _read(cfg, split, labelled)


def recorded_config(recorded: dict) -> DataConfig:
    """The data config a state.json or generator.json records (keys this code does not know are dropped)."""
    known = {key: value for key, value in recorded.items() if key in DataConfig.__dataclass_fields__}
    return DataConfig(**{"holdout": 0.0} | known)  # recorded before data.holdout: nothing was held out


def holds_out(cfg: DataConfig, images: ImageSpec) -> bool:
    """Whether the test split of the data `cfg` reads, `images`, is a held-out part of its training images: labelled
    data other than MNIST's, from a source without a test split of its own, with data.holdout above 0."""
    return (cfg.holdout > 0 and images.num_classes > 0 and images.dataset != MNIST_DATASET
            and not _has_test_split(cfg))


def _has_test_split(cfg: DataConfig) -> bool:
    """Whether the source holds a test split beside the training one (a Hugging Face Hub dataset: taken to, as its
    loader then says where it does not)."""
    path = Path(cfg.path)
    if cfg.source == "idx":
        return any((path / f"{IDX_FILES['test']}{suffix}").is_file() for suffix in (".gz", ""))
    if cfg.source == "folder":
        return (path / "test").is_dir()
    if cfg.source == "hf":
        if path.is_file() or (path / "dataset_info.json").is_file():  # one parquet file; one saved Dataset
            return False
        if path.is_dir() and any(path.glob("*.parquet")):
            return any(path.glob("test[.-]*parquet"))
    return True


def _held_out(training: ImageSet, share: float, split: str) -> ImageSet:
    """The test split (`share` of `training`'s images, drawn by a fixed seed: the same on every rank, run and tool)
    or the training split (the others, in their order). Data too small for `share` to hold out an image is all
    training split, and has no test split."""
    count, held = len(training.images), round(share * len(training.images))
    if held == count or (held == 0 and split == "test"):
        raise DataError(f"data.holdout={share} of {count} training images leaves {held} to test and {count - held} "
                        "to train on; this data has no test split of its own, so give it one (a test split beside the "
                        "training one) or set data.holdout to leave some of each")
    test = torch.zeros(count, dtype=torch.bool)
    test[torch.randperm(count, generator=torch.Generator().manual_seed(HOLDOUT_SEED))[:held]] = True
    chosen = test if split == "test" else ~test
    images = training.images[chosen]
    return ImageSet(images, None if training.labels is None else training.labels[chosen],
                    dataclasses.replace(training.spec, dataset=identify(images)))


def _read(cfg: DataConfig, split: str, labelled: bool) -> ImageSet:
    """`split` as the source holds it."""
    where = f"data.source={cfg.source} data.path={cfg.path!r}"
    dataset = None  # where the labels come from, for the hf, torchvision and folder sources
    if cfg.source == "idx":
        images, num_classes = read_idx_images(Path(cfg.path), split)[:, None], IDX_CLASSES
    elif cfg.source == "hf":
        dataset = _hf_dataset(cfg.path, cfg.split if split == "train" else split, training=split == "train")
        images = _hf_images(cfg.path, dataset, cfg.resolution, cfg.channels, Path(cfg.cache_dir))
        num_classes = _hf_num_classes(cfg.path, dataset, labelled)
    elif cfg.source == "torchvision":
        dataset = _torchvision_dataset(cfg.path, cfg.torchvision_name, train=split == "train")
        images, num_classes = _torchvision_images(dataset), len(getattr(dataset, "classes", ()))
    else:
        dataset = pictures.read_folder(Path(cfg.path), split, cfg.resolution, cfg.channels, Path(cfg.cache_dir))
        images, num_classes = dataset.images, len(dataset.classes)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{where} gave {images.dtype} data of shape {tuple(images.shape)} (as [N, channels, height, "
                        "width]); the networks need uint8 grey or RGB images (e.g. MNIST's train-images file, not its "
                        "labels)")
    images = pictures.conform(images, cfg.resolution, cfg.channels, where)
    labels = None
    if labelled:
        if not num_classes:
            raise DataError(f"{where} has no labels; model.conditional=true needs a class label per image (or set "
                            "model.conditional=false)")
        labels = _labels(cfg, split, dataset)
        if labels.dim() != 1 or len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            span = f" from {int(labels.min())} to {int(labels.max())}" if labels.numel() else ""
            allowed = "0" if num_classes == 1 else f"0-{num_classes - 1}"
            raise DataError(f"{where} gave labels of shape {tuple(labels.shape)}{span}; model.conditional=true needs "
                            f"one class label ({allowed}) per image")
    return ImageSet(images, labels, ImageSpec(images.shape[1], images.shape[2], images.shape[3], num_classes,
                                              identify(images)))


def identify(images: torch.Tensor) -> str:
    """The data set `images` [N, C, H, W] are: "mnist" where each is one of MNIST's training images (the shipped
    files' content, whatever the source), so that MNIST's feature network and test set describe them; else their
    content hash."""
    if images.shape[1:] == MNIST.shape and _all_in_mnist(images):
        return MNIST_DATASET
    return "sha256:" + hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def _all_in_mnist(images: torch.Tensor) -> bool:
    mnist = read_idx_images(SHIPPED_MNIST, "train")
    if len(images) == len(mnist) and torch.equal(images[:, 0], mnist):
        return True  # the shipped files themselves: no need to look each image up
    known = {image.tobytes() for image in mnist.numpy()}
    return all(image.tobytes() in known for image in images.numpy())


def _labels(cfg: DataConfig, split: str, dataset) -> torch.Tensor:
    if cfg.source == "idx":
        return read_idx_labels(Path(cfg.path), split).long()
    if cfg.source == "hf":
        return torch.tensor(_hf_column(dataset, "label")).long()
    if cfg.source == "folder":
        return dataset.labels
    return torch.as_tensor(dataset.targets).long()


def read_idx_images(folder: Path, split: str) -> torch.Tensor:
    """uint8 images [N, H, W] of `split` (train or test) from an IDX folder (the MNIST family: 28x28)."""
    return _read_idx(folder, IDX_FILES[split])


def read_idx_labels(folder: Path, split: str) -> torch.Tensor:
    """uint8 labels [N] of `split`, for the feature network that the quality metrics use."""
    return _read_idx(folder, IDX_FILES[split].replace("images-idx3", "labels-idx1"))


def _read_idx(folder: Path, name: str) -> torch.Tensor:
    if not folder.is_dir():
        raise DataError(f"data.path {str(folder)!r} is not a folder; point it at a folder holding the MNIST IDX files")
    candidates = [folder / f"{name}.gz", folder / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(
            f"missing data file {candidates[0]} (or its unzipped form); restore it with "
            f"`git checkout -- {candidates[0].name}` in the repository's data folder or copy the MNIST files there"
        )
    raw = path.read_bytes()
    _verify_checksum(path, raw)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:  # BadGzipFile, or a file cut short
            raise DataError(f"{path} is not a readable gzip file ({error}); replace it with a complete copy, "
                            "or add a SHA256SUMS file beside it to have every file checked") from None
    return torch.from_numpy(parse_idx(raw, path))


def parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an IDX file")
    magic, first_dim = struct.unpack(">II", raw[:8])
    if magic not in IDX_MAGIC:
        raise DataError(f"{path} has IDX magic number {magic}, expected 2051 (images) or 2049 (labels): not an IDX file")
    ndim = IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)  # Python's integers: numpy's would wrap to 0 for 2^31 x 2^31 x 4
    if len(raw) - header != expected:
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, its header promises {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _verify_checksum(path: Path, raw: bytes) -> None:
    """Check `path` against the SHA256SUMS file beside it (the repository ships one for MNIST)."""
    sums_file = path.parent / CHECKSUM_FILE
    if not sums_file.is_file():
        return
    expected = read_checksums(sums_file)
    if path.name not in expected:
        raise DataError(f"{path.name} is not listed in {sums_file}; add its SHA-256 there or remove the file")
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected[path.name]:
        raise DataError(
            f"{path} is corrupt: SHA-256 {actual} does not match {expected[path.name]} in {sums_file}; "
            f"restore the file (e.g. `git checkout -- {path.name}` in that folder)"
        )


def read_checksums(sums_file: Path) -> dict[str, str]:
    """{file name: SHA-256} from a `sha256sum` listing: a line per file, the hash, white space, the name."""
    try:
        lines = sums_file.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{sums_file} is not UTF-8 text, so not a sha256sum listing; restore it, or remove it to "
                        "read the data unchecked") from None
    checksums = {}
    for number, line in enumerate(lines, 1):
        if line.strip():
            fields = line.split(maxsplit=1)
            if len(fields) != 2:
                raise DataError(f"{sums_file} line {number} is {line.strip()!r}, not '<SHA-256>  <file name>'; "
                                "restore it, or remove it to read the data unchecked")
            checksums[fields[1].strip().removeprefix("*")] = fields[0]  # `*`: sha256sum's binary mode
    return checksums


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
