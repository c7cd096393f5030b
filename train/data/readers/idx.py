"""`idx`: a folder of IDX files (the MNIST family: `train-images-idx3-ubyte[.gz]` and friends, `t10k-*` for the
test split), checked against a SHA256SUMS file beside them where there is one."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
from pathlib import Path

import numpy as np
import torch

from train.config import DataConfig
from train.data.readers._base import Read, Reader
from train.errors import DataError

IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dimension, images: 3 dimensions
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
CHECKSUM_FILE = "SHA256SUMS"
IDX_CLASSES = 10  # every data set of the MNIST family (MNIST, Fashion-MNIST, KMNIST) has ten


class IDX(Reader):
    def read(self, cfg: DataConfig, split: str, labelled: bool) -> Read:
        images = read_idx_images(Path(cfg.path), split)[:, None]
        return Read(images, IDX_CLASSES, read_idx_labels(Path(cfg.path), split).long() if labelled else None)

    def has_test_split(self, cfg: DataConfig) -> bool:
        return any((Path(cfg.path) / f"{IDX_FILES['test']}{suffix}").is_file() for suffix in (".gz", ""))

    def identity(self, data: dict) -> tuple[str, str, str | None]:
        return Path(data["path"]).name, "idx", None


READER = IDX()


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


