"""Pictures (PNG, JPEG, ...; a folder of them, or a Hugging Face image column) to the uint8 tensor the networks get.

One rule for every source: `data.channels` (1 or 3; null: 1 where every picture is grey, by its mode or by a
palette of greys only, else 3) is what PIL's `convert` makes of each picture ("L": ITU-R 601 luma; "RGB": grey
repeated, alpha dropped), after a picture's EXIF orientation is applied (as a viewer shows it) and 16-bit or
32-bit grey is scaled to 8 bits (0-65535 to 0-255; float pictures are read as 0-1), never clipped;
`data.resolution` (null: the pictures' own size, which must then be one size and square) scales each picture
whose size differs so that its shorter side fits and crops the centre square (PIL's `ImageOps.fit`, Lanczos).
Every conversion is counted, and the counts are printed. A picture whose header claims more than
MAX_PICTURE_PIXELS is refused by name before anything is decoded (a decompression bomb, or a picture far larger
than any network here takes).

An image folder: `ROOT/<class>/<pictures>` (one folder per class, labels in the sorted order of
the folder names) or `ROOT/<pictures>` (unlabelled), with the test split, where there is one, in
`ROOT/test/` beside the training split in `ROOT/train/`; `train` and `test` are the splits' names in every
layout, never a class's. Both splits' layouts are checked before anything is decoded. Folders the pipeline
writes (a cache, tagged by CACHEDIR.TAG; a run directory) are never read as data. Pictures are decoded once into
a uint8 cache keyed by their encoded bytes, the conversion and the Pillow version (`data.cache_dir`; image
folders and Hugging Face image columns), so the next run, and a run's evaluation, reads them at once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import ExifTags, Image, ImageOps

from train.data.memory import available_memory, gib
from train.errors import DataError
from train.storage import tensor_cache
from train.storage.layout import is_run_dir

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GREY_BANDS = ("L", "1", "I", "F")  # PIL's first band of a mode without colour (alpha aside)
FORMAT = "2"  # of the decoded cache: a new one when decoding changes (2: 16-bit grey scaled, EXIF orientation)
MAX_PICTURE_PIXELS = 2 ** 25  # 33.5 million (e.g. 8192x4096): our limit, checked on the header before decoding
SPLITS = ("train", "test")  # an image folder's split names, reserved in every layout
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DECODE_CACHE_DAYS = 30  # decoded sets unread for this long are removed from data.cache_dir when another is written


@dataclass
class Decoded:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N]; None for unlabelled pictures
    classes: list[str]  # the class names, in label order; [] unlabelled


def shown(path: Path | str) -> str:
    """A path as messages print it: a name that is not UTF-8 with its odd bytes as \\x.. escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def to_tensor(pictures: Sequence[tuple[str, Callable[[], Image.Image]]], resolution: int | None,
              channels: int | None, where: str) -> torch.Tensor:
    """uint8 [N, C, H, W] of (name, opener) pairs, converted by the module's rule; `where` names the data in
    messages. A first pass reads each picture's mode and size (a file's header), a second decodes: the size of the
    result is known, and refused where it would not fit in memory, before any picture is decoded."""
    grey, sizes, examples = Counter(), Counter(), {}
    for name, opener in pictures:
        with _opened(name, opener, where) as picture:
            grey[_is_grey(picture)] += 1
            size = _oriented_size(picture)
            sizes[size] += 1
            examples.setdefault(size, name)
    channels = channels or (1 if not grey[False] else 3)
    mode = "L" if channels == 1 else "RGB"
    if resolution is None:
        if len(sizes) > 1:
            shown_sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
            (w, h), _ = sizes.most_common()[-1]
            raise DataError(f"{where} has pictures of {len(sizes)} sizes ({shown_sizes}, ...; the rarest, {w}x{h}, "
                            f"e.g. {examples[(w, h)]}); set data.resolution to the size the networks should get "
                            "(each picture is scaled and centre-cropped to it)")
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
            if picture.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                converted["turned as their EXIF orientation says"] += 1
                picture = ImageOps.exif_transpose(picture)
            if picture.mode[0] in "IF":  # 16/32-bit or float grey: PIL's convert would clip, not scale
                converted[f"scaled from {picture.mode} to L"] += 1
                picture = _eight_bit(picture)
            if picture.mode != mode:
                converted[f"from {picture.mode} to {mode}"] += 1
                picture = picture.convert(mode)
            if picture.size != (resolution, resolution):
                converted[f"from {picture.size[0]}x{picture.size[1]} to {resolution}x{resolution}"] += 1
                picture = ImageOps.fit(picture, (resolution, resolution), method=Image.Resampling.LANCZOS)
            images[index] = np.asarray(picture, dtype=np.uint8).reshape(resolution, resolution, channels)
    if converted:
        print(f"{where}: converted " + ", ".join(f"{n} pictures {what}" for what, n in converted.most_common()),
              file=sys.stderr, flush=True)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _is_grey(picture: Image.Image) -> bool:
    """A grey mode (with or without alpha), or a palette whose every colour is a grey."""
    bands = picture.getbands()
    if bands[0] == "P":
        palette = picture.getpalette("RGB") or []
        return palette[0::3] == palette[1::3] == palette[2::3]
    return bands[0] in GREY_BANDS and bands[1:] in ((), ("A",), ("a",))


def _oriented_size(picture: Image.Image) -> tuple[int, int]:
    """(width, height) as the picture is shown: after its EXIF orientation."""
    width, height = picture.size
    turned = picture.getexif().get(ExifTags.Base.Orientation, 1) in ROTATED
    return (height, width) if turned else (width, height)


def _eight_bit(picture: Image.Image) -> Image.Image:
    """A 16- or 32-bit grey picture (0-65535) or a float one (0-1) as 8-bit grey, scaled (PIL's convert clips)."""
    values = np.asarray(picture, dtype=np.float64)
    scaled = values * 255 if picture.mode == "F" else values / 257
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


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
    """The picture `opener` gives (decoded where `decode`), refused by name where it is not a readable picture or
    its header claims more than MAX_PICTURE_PIXELS. Pillow's own bomb check is replaced by that limit, checked
    before any decoding."""
    try:
        with warnings.catch_warnings(), _pillow_pixel_limit(None):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = opener()
        width, height = picture.size
        if width * height > MAX_PICTURE_PIXELS:
            picture.close()
            raise DataError(f"{name} in {where} claims to be {width}x{height} ({width * height / 1e6:,.0f} million "
                            f"pixels), more than the {MAX_PICTURE_PIXELS / 1e6:.1f} million this pipeline decodes "
                            "(pictures.MAX_PICTURE_PIXELS: a decompression bomb, or a picture far larger than any "
                            "network here takes); shrink it or remove it")
        if decode:
            picture.load()
    except DataError:
        raise
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...) for bad files
        raise DataError(f"{name} in {where} is not a readable picture ({type(error).__name__}: {error}); replace or "
                        "remove it") from None
    with picture:
        yield picture


@contextlib.contextmanager
def _pillow_pixel_limit(limit: int | None):
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_folder(root: Path, split: str, resolution: int | None, channels: int | None, cache_dir: Path) -> Decoded:
    """`split` of the image folder `root`: ROOT/train (or ROOT itself where it has no train folder) or ROOT/test.
    Every split's layout is checked first, so a folder refused for its test split has nothing decoded or cached."""
    root, cache_dir = Path(root), Path(cache_dir)
    if not root.is_dir():
        raise DataError(f"data.path {shown(root)!r} is not a folder; point it at a folder of pictures (one subfolder "
                        "per class, or the pictures themselves)")
    splits = _split_folders(root)
    if split not in splits:
        raise DataError(f"{shown(root)} has no {split} split: put the training pictures in {shown(root / 'train')} "
                        f"and the test pictures in {shown(root / 'test')}, each with the same class folders")
    listed = {name: _list(root, folder, splits, cache_dir) for name, folder in splits.items()}
    if "test" in listed:
        _check_same_classes(listed["train"][2], listed["test"][2], splits)
    files, labels, classes = listed[split]
    folder = splits[split]
    if not files:
        raise DataError(f"{shown(folder)} holds no pictures ({', '.join(PICTURE_SUFFIXES)}): point data.path at a "
                        "folder of them")
    digest = conversion_digest(resolution, channels, classes)
    for path in files:
        digest.update(os.fsencode(path.relative_to(folder)) + b"\0" + path.read_bytes())
    decoded = decoded_once("folder", digest, cache_dir, ("images", "labels") if classes else ("images",), lambda: {
        "images": to_tensor([(shown(path.relative_to(folder)), functools.partial(Image.open, path))
                             for path in files], resolution, channels, shown(folder))}
        | ({"labels": torch.tensor(labels)} if classes else {}))
    return Decoded(decoded["images"], decoded.get("labels"), classes)


def _split_folders(root: Path) -> dict[str, Path]:
    """{split: folder}: ROOT/train and ROOT/test where ROOT has a train folder, else ROOT alone as the training split;
    a ROOT/test without a ROOT/train is refused (the test split of which training pictures?)."""
    if (root / "train").is_dir():
        return {name: root / name for name in SPLITS if (root / name).is_dir()}
    if (root / "test").is_dir():
        raise DataError(f"{shown(root)} has a test folder but no train folder: put the training pictures in "
                        f"{shown(root / 'train')} beside it ('train' and 'test' name the splits, never a class)")
    return {"train": root}


def _check_same_classes(trained: list[str], tested: list[str], splits: dict[str, Path]) -> None:
    if tested == trained:
        return
    if [unicodedata.normalize("NFC", name) for name in tested] == [unicodedata.normalize("NFC", name)
                                                                   for name in trained]:
        differing = [f"{a!a} / {b!a}" for a, b in zip(trained, tested) if a != b]
        raise DataError(f"the class folders of {shown(splits['test'])} and {shown(splits['train'])} have the same "
                        "names written in different Unicode normalisations (NFC in one, NFD in the other: "
                        f"{', '.join(differing)}); rename them so both splits spell them alike")
    raise DataError(f"{shown(splits['test'])} has the classes {tested}, the training split {trained}: give both the "
                    "same class folders")


def conversion_digest(resolution: int | None, channels: int | None, *more) -> hashlib._Hash:
    """A SHA-256 begun with the decoding's version, the Pillow that decodes and the conversion (and `more`, e.g. the
    class names); the caller adds the pictures' bytes."""
    return hashlib.sha256(json.dumps([FORMAT, PIL.__version__, resolution, channels, *more]).encode())


def decoded_once(source: str, digest: hashlib._Hash, cache_dir: Path, needed: tuple[str, ...],
                 decode: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors `decode` makes, read instead from `cache_dir` where a run with the same `digest` (the pictures'
    bytes and their conversion) wrote them; `source` names the kind of data in the cache's file name. A cache read
    is marked used (its time stamp); writing a new one removes those unread for DECODE_CACHE_DAYS and says what the
    folder holds."""
    cache = cache_dir / f"{source}_{digest.hexdigest()[:24]}.safetensors"
    tensors = tensor_cache.read(cache, "decoded pictures", needed=needed)
    if tensors is not None:
        with contextlib.suppress(OSError):  # a read-only cache is still read
            os.utime(cache)
        return tensors
    tensors = decode()
    if tensor_cache.write(cache, tensors, "decoded pictures", setting="data.cache_dir"):
        _prune_decoded(cache_dir, keep=cache)
    return tensors


def _prune_decoded(cache_dir: Path, keep: Path) -> None:
    """Remove decoded sets unread for DECODE_CACHE_DAYS, and say how much the folder holds."""
    oldest = time.time() - DECODE_CACHE_DAYS * 86400
    held, removed = [], 0
    for path in cache_dir.glob("*_*.safetensors"):
        if not path.name.startswith(("folder_", "hf_")):
            continue
        with contextlib.suppress(OSError):
            if path != keep and path.stat().st_mtime < oldest:
                path.unlink()
                removed += 1
            else:
                held.append(path.stat().st_size)
    print(f"{shown(cache_dir)} (data.cache_dir) holds {len(held)} decoded picture set(s), {sum(held) / 2 ** 20:,.1f} MiB"
          + (f"; removed {removed} unread for {DECODE_CACHE_DAYS} days" if removed else "")
          + f" (sets unread for {DECODE_CACHE_DAYS} days are removed)", file=sys.stderr, flush=True)


def _list(root: Path, folder: Path, splits: dict[str, Path], cache_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """The picture files of a split folder in a fixed order, their labels and the class names: one class per
    subfolder, or the pictures themselves (unlabelled). Links are followed only within `root`, never to a folder
    that holds them or into another split."""
    guard = _LinkGuard(root, folder, splits)
    subfolders, loose = _class_folders(folder, guard, cache_dir)
    if subfolders and any(p.suffix.lower() in PICTURE_SUFFIXES for p in loose):
        raise DataError(f"{shown(folder)} holds both pictures and folders; give one folder per class (labelled) or the "
                        "pictures alone (unlabelled)")
    if len(subfolders) == 1:
        raise DataError(f"{shown(folder)} has one class folder ({shown(subfolders[0].name)}); give a folder per class "
                        "(at least two), or the pictures themselves in the folder for unlabelled data")
    if reserved := [p for p in subfolders if p.name in SPLITS]:
        raise DataError(f"{shown(reserved[0])} is a class folder named {reserved[0].name!r}, a name that marks a split "
                        f"('train' and 'test' beside each other in data.path): rename the class, or give the splits "
                        f"as {shown(root / 'train')} and {shown(root / 'test')}")
    groups = [(label, sorted(_files_below(sub, guard))) for label, sub in enumerate(subfolders)] or [(0, loose)]
    files, labels, skipped = [], [], 0
    for label, candidates in groups:
        found = [path for path in candidates if path.suffix.lower() in PICTURE_SUFFIXES]
        if subfolders and not found and folder == splits["train"]:  # a test split may lack a class's pictures
            raise DataError(f"the class folder {shown(subfolders[label])} of the training split holds no pictures "
                            f"({', '.join(PICTURE_SUFFIXES)}): add its pictures, or remove the folder")
        files += found
        labels += [label] * len(found)
        skipped += len(candidates) - len(found)
    if skipped:
        print(f"{shown(folder)}: skipped {skipped} files that are not pictures ({', '.join(PICTURE_SUFFIXES)})",
              file=sys.stderr, flush=True)
    return files, labels, [p.name for p in subfolders]


def _class_folders(folder: Path, guard: _LinkGuard, cache_dir: Path) -> tuple[list[Path], list[Path]]:
    """The visible entries of `folder`, sorted: (its subfolders, the rest), without what the pipeline writes."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not _written_here(p, cache_dir))
    subfolders = [p for p in entries if guard.checked(p).is_dir()]
    return subfolders, [p for p in entries if p not in subfolders]


def _written_here(path: Path, cache_dir: Path) -> bool:
    """A folder the pipeline writes: a cache (CACHEDIR.TAG, or data.cache_dir itself) or a run directory."""
    return path.is_dir() and ((path / tensor_cache.CACHE_TAG).is_file() or is_run_dir(path)
                              or path.resolve() == cache_dir.resolve())


def _files_below(folder: Path, guard: _LinkGuard) -> Iterable[Path]:
    for path in folder.rglob("*"):
        if not any(part.startswith(".") for part in path.relative_to(folder).parts) and guard.checked(path).is_file():
            yield path


class _LinkGuard:
    """Refuses, by name, a link in a split folder that leads out of the data folder, to a folder that holds the link
    (every picture below it would be read again), or into the other split."""

    def __init__(self, root: Path, folder: Path, splits: dict[str, Path]):
        self.inside = root.resolve()
        self.others = {name: other.resolve() for name, other in splits.items() if other != folder}

    def checked(self, path: Path) -> Path:
        if not path.is_symlink():
            return path
        target = path.resolve()
        if not target.is_relative_to(self.inside):
            problem = f"outside the data folder {shown(self.inside)}; copy what it points to into the folder"
        elif path.parent.resolve().is_relative_to(target):
            problem = "a folder that holds the link itself, so its pictures would be read twice; remove the link"
        elif name := next((n for n, other in self.others.items() if target.is_relative_to(other)), None):
            problem = f"inside the {name} split, so those pictures would be in both splits; remove the link"
        else:
            return path
        raise DataError(f"{shown(path)} is a link to {shown(target)}, {problem}"
                        + (", or remove the link" if problem.startswith("outside") else ""))
