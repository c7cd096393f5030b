"""Pictures (PNG, JPEG, ...; a folder of them, or a Hugging Face image column) to the uint8 tensor the networks get.

One rule for every source: `data.channels` (1 or 3; null: 1 where every picture is grey, else 3) is
what PIL's `convert` makes of each picture ("L": ITU-R 601 luma; "RGB": grey repeated, alpha
dropped); `data.resolution` (null: the pictures' own size, which must then be one size and square)
scales each picture whose size differs so that its shorter side fits and crops the centre square
(PIL's `ImageOps.fit`, Lanczos). Every conversion is counted, and the counts are printed.

An image folder: `ROOT/<class>/<pictures>` (one folder per class, labels in the sorted order of
the folder names) or `ROOT/<pictures>` (unlabelled), with the test split, where there is one, in
`ROOT/test/` beside the training split in `ROOT/train/`. Pictures are decoded once into a uint8 cache
keyed by their encoded bytes and the conversion (`data.cache_dir`; image folders and Hugging Face
image columns), so the next run, and a run's evaluation, reads them at once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from train import tensor_cache
from train.errors import DataError
from train.memory import available_memory, gib

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes without colour
FORMAT = "1"  # of the decoded cache: a new one when decoding changes


@dataclass
class Decoded:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N]; None for unlabelled pictures
    classes: list[str]  # the class names, in label order; [] unlabelled


def to_tensor(pictures: Sequence[tuple[str, Callable[[], Image.Image]]], resolution: int | None,
              channels: int | None, where: str) -> torch.Tensor:
    """uint8 [N, C, H, W] of (name, opener) pairs, converted by the module's rule; `where` names the data in
    messages. A first pass reads each picture's mode and size (a file's header), a second decodes: the size of the
    result is known, and refused where it would not fit in memory, before any picture is decoded."""
    modes, sizes = Counter(), Counter()
    for name, opener in pictures:
        with _opened(name, opener, where) as picture:
            modes[picture.mode in GREY_MODES] += 1
            sizes[picture.size] += 1
    channels = channels or (1 if not modes[False] else 3)
    mode = "L" if channels == 1 else "RGB"
    if resolution is None:
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
            raise DataError(f"{where} has pictures of {len(sizes)} sizes ({shown}, ...); set data.resolution to the "
                            "size the networks should get (each picture is scaled and centre-cropped to it)")
        (width, height), = sizes
        if width != height:
            raise DataError(f"{where} has {width}x{height} pictures; set data.resolution to the square size the "
                            "networks should get (each picture is scaled and centre-cropped to it)")
        resolution = width
    needed = len(pictures) * channels * resolution * resolution
    if needed > available_memory():
        raise DataError(f"{where}: {len(pictures)} pictures of {channels}x{resolution}x{resolution} take {gib(needed)}, "
                        f"and this machine has {gib(available_memory())} of memory available; lower data.resolution "
                        "or use fewer pictures")
    converted = Counter()
    images = np.empty((len(pictures), resolution, resolution, channels), dtype=np.uint8)
    for index, (name, opener) in enumerate(pictures):
        with _opened(name, opener, where, decode=True) as picture:
            if picture.mode != mode:
                converted[f"from {picture.mode} to {mode}"] += 1
                picture = picture.convert(mode)
            if picture.size != (resolution, resolution):
                converted[f"from {picture.size[0]}x{picture.size[1]} to {resolution}x{resolution}"] += 1
                picture = ImageOps.fit(picture, (resolution, resolution), method=Image.Resampling.LANCZOS)
            images[index] = np.asarray(picture, dtype=np.uint8).reshape(resolution, resolution, channels)
    if converted:
        print(f"{where}: converted " + ", ".join(f"{n} pictures {what}" for what, n in converted.most_common()),
              flush=True)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def conform(images: torch.Tensor, resolution: int | None, channels: int | None, where: str) -> torch.Tensor:
    """uint8 images [N, C, H, W] of any source as `data.resolution` and `data.channels` ask, by the same rule as
    pictures (each through PIL); the images themselves where they are so already."""
    if (resolution in (None, images.shape[2]) and resolution in (None, images.shape[3])
            and channels in (None, images.shape[1])):
        return images
    arrays = images.permute(0, 2, 3, 1).numpy()
    if images.shape[1] == 1:
        arrays = arrays[..., 0]
    return to_tensor([(f"image {index}", functools.partial(Image.fromarray, array))
                      for index, array in enumerate(arrays)], resolution, channels or images.shape[1], where)


@contextlib.contextmanager
def _opened(name: str, opener: Callable[[], Image.Image], where: str, decode: bool = False):
    """The picture `opener` gives (decoded where `decode`), refused by name where it is not a readable picture."""
    try:
        with opener() as picture:
            if decode:
                picture.load()
            yield picture
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{name} in {where} is not a readable picture ({type(error).__name__}: {error}); replace or "
                        "remove it") from None


def read_folder(root: Path, split: str, resolution: int | None, channels: int | None, cache_dir: Path) -> Decoded:
    """`split` of the image folder `root`: ROOT/train (or ROOT itself where it has no train folder) or ROOT/test."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a folder; point it at a folder of pictures (one subfolder per "
                        "class, or the pictures themselves)")
    folder = root / split if (root / "train").is_dir() else root if split == "train" else None
    if folder is None or not folder.is_dir():
        raise DataError(f"{root} has no {split} split: put the training pictures in {root / 'train'} and the test "
                        f"pictures in {root / 'test'}, each with the same class folders")
    files, labels, classes = _list(root, folder)
    if split != "train" and classes != (trained := [p.name for p in _class_folders(root / "train", root)[0]]):
        raise DataError(f"{folder} has the classes {classes}, the training split {trained}: give both the same class "
                        "folders")
    digest = conversion_digest(resolution, channels, classes)
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    decoded = decoded_once("folder", digest, cache_dir, ("images", "labels") if classes else ("images",), lambda: {
        "images": to_tensor([(str(path.relative_to(folder)), functools.partial(Image.open, path)) for path in files],
                            resolution, channels, str(folder))} | ({"labels": torch.tensor(labels)} if classes else {}))
    return Decoded(decoded["images"], decoded.get("labels"), classes)


def conversion_digest(resolution: int | None, channels: int | None, *more) -> hashlib._Hash:
    """A SHA-256 begun with the decoding's version and the conversion (and `more`, e.g. the class names); the caller
    adds the pictures' bytes."""
    return hashlib.sha256(json.dumps([FORMAT, resolution, channels, *more]).encode())


def decoded_once(source: str, digest: hashlib._Hash, cache_dir: Path, needed: tuple[str, ...],
                 decode: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors `decode` makes, read instead from `cache_dir` where a run with the same `digest` (the pictures'
    bytes and their conversion) wrote them; `source` names the kind of data in the cache's file name."""
    cache = cache_dir / f"{source}_{digest.hexdigest()[:24]}.safetensors"
    tensors = tensor_cache.read(cache, "decoded pictures", needed=needed)
    if tensors is None:
        tensors = decode()
        tensor_cache.write(cache, tensors, "decoded pictures", setting="data.cache_dir")
    return tensors


def _list(root: Path, folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """The picture files of a split folder in a fixed order, their labels and the class names: one class per
    subfolder, or the pictures themselves (unlabelled). Links are followed only within `root`."""
    inside = root.resolve()
    subfolders, loose = _class_folders(folder, root)
    if subfolders and any(p.suffix.lower() in PICTURE_SUFFIXES for p in loose):
        raise DataError(f"{folder} holds both pictures and folders; give one folder per class (labelled) or the "
                        "pictures alone (unlabelled)")
    if len(subfolders) == 1:
        raise DataError(f"{folder} has one class folder ({subfolders[0].name}); give a folder per class (at least "
                        "two), or the pictures themselves in the folder for unlabelled data")
    groups = [(label, sorted(_files_below(sub, inside))) for label, sub in enumerate(subfolders)] or [(0, loose)]
    files, labels, skipped = [], [], 0
    for label, candidates in groups:
        for path in candidates:
            if path.suffix.lower() in PICTURE_SUFFIXES:
                files.append(path)
                labels.append(label)
            else:
                skipped += 1
    if not files:
        raise DataError(f"{folder} holds no pictures ({', '.join(PICTURE_SUFFIXES)}): point data.path at a folder of "
                        "them")
    if skipped:
        print(f"{folder}: skipped {skipped} files that are not pictures ({', '.join(PICTURE_SUFFIXES)})", flush=True)
    return files, labels, [p.name for p in subfolders]


def _class_folders(folder: Path, root: Path) -> tuple[list[Path], list[Path]]:
    """The visible entries of `folder`, sorted: (its subfolders, the rest)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    subfolders = [p for p in entries if _checked(p, root.resolve()).is_dir()]
    return subfolders, [p for p in entries if p not in subfolders]


def _files_below(folder: Path, inside: Path) -> Iterable[Path]:
    for path in folder.rglob("*"):
        if not any(part.startswith(".") for part in path.relative_to(folder).parts) and _checked(path, inside).is_file():
            yield path


def _checked(path: Path, inside: Path) -> Path:
    """`path`, refused by name where it is a link that leads out of the data folder `inside`."""
    if path.is_symlink() and not path.resolve().is_relative_to(inside):
        raise DataError(f"{path} is a link to {path.resolve()}, outside the data folder {inside}; copy what it points "
                        "to into the folder, or remove the link")
    return path
