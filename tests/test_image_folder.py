"""The image folder source: its layout, the conversion rule every source shares, the decode cache, and the folders
it refuses by name before any work."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, run_train
from train import colour_digits
from train.config import SHIPPED_MNIST, DataConfig
from train.data import load, read_idx_images
from train.errors import DataError


def folder_config(path, tmp_path, **overrides) -> DataConfig:
    return DataConfig(source="folder", path=str(path), cache_dir=str(tmp_path / "decoded"), **overrides)


def save(path, picture: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def test_a_class_folder_reads_as_the_pictures_with_labels_in_sorted_folder_order_and_is_cached(tmp_path, capsys):
    folder = tmp_path / "digits"
    colour_digits.write(folder, {"train": 40, "test": 20})
    pictures, labels = colour_digits.coloured("train", 40)
    first = load(folder_config(folder, tmp_path), labelled=True)
    order = np.argsort(labels, kind="stable")  # folders 0..9, files by name (the index) within each
    assert torch.equal(first.images, torch.from_numpy(pictures[order]).permute(0, 3, 1, 2))
    assert torch.equal(first.labels, torch.from_numpy(labels[order]).long())
    assert (first.spec.channels, first.spec.height, first.spec.num_classes) == (3, 32, 10)
    (cache,) = (tmp_path / "decoded").iterdir()
    stamp = cache.stat().st_mtime_ns
    again = load(folder_config(folder, tmp_path), labelled=True)
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again.images, first.images)  # read from the cache
    test = load(folder_config(folder, tmp_path), "test", labelled=True)
    assert len(test.images) == 20 and test.spec.shape == first.spec.shape
    # Another conversion is another cache entry, never the first one's.
    grey = load(folder_config(folder, tmp_path, channels=1, resolution=28))
    assert grey.images.shape == (40, 1, 28, 28) and len(list((tmp_path / "decoded").iterdir())) == 3


def test_every_source_converts_by_the_same_rule(tmp_path):
    """MNIST read from its IDX files and from a folder of its PNGs give the same tensor for the same request."""
    mnist = read_idx_images(SHIPPED_MNIST, "train")[:30]
    for index, picture in enumerate(mnist.numpy()):
        save(tmp_path / "flat" / f"{index:02d}.png", picture)
    for request in ({}, {"channels": 3}, {"resolution": 32}, {"resolution": 20, "channels": 3}):
        from_folder = load(folder_config(tmp_path / "flat", tmp_path, **request)).images
        from_idx = load(DataConfig(**request)).images[:30]
        assert torch.equal(from_folder, from_idx), request
    assert load(folder_config(tmp_path / "flat", tmp_path)).spec.num_classes == 0  # a flat folder: unlabelled


def test_mixed_sizes_and_modes_are_converted_and_counted(tmp_path, capsys):
    folder = tmp_path / "mixed"
    save(folder / "a" / "grey.png", np.full((32, 32), 200, np.uint8))
    save(folder / "a" / "wide.png", np.full((30, 40, 3), 100, np.uint8))
    save(folder / "b" / "rgba.png", np.full((32, 32, 4), 50, np.uint8))
    (folder / "b" / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match=r"has pictures of 2 sizes \(32x32 \(2\), 40x30 \(1\).*set data.resolution"):
        load(folder_config(folder, tmp_path))
    loaded = load(folder_config(folder, tmp_path, resolution=32), labelled=True)
    assert loaded.images.shape == (3, 3, 32, 32) and loaded.labels.tolist() == [0, 0, 1]
    out = capsys.readouterr().out
    assert "skipped 1 files that are not pictures" in out
    assert "converted 1 pictures from L to RGB, 1 pictures from 40x30 to 32x32, 1 pictures from RGBA to RGB" in out


@pytest.mark.parametrize("layout, problem", [
    ("empty", "holds no pictures"),
    ("one_class", r"has one class folder \(only\); give a folder per class"),
    ("damaged", "broken.png in .* is not a readable picture"),
    ("link_out", "is a link to .*, outside the data folder"),
    ("both", "holds both pictures and folders"),
    ("test_classes", r"has the classes \['0', '2'\], the training split \['0', '1'\]"),
    ("too_large", r"take .* GiB, and this machine has .* GiB of memory available"),
])
def test_a_folder_that_cannot_be_read_is_named_before_any_work(tmp_path, layout, problem):
    folder, outside = tmp_path / "data", tmp_path / "outside.png"
    picture = np.zeros((28, 28), np.uint8)
    folder.mkdir()
    split = "train"
    overrides = {}
    if layout == "one_class":
        save(folder / "only" / "a.png", picture)
    elif layout == "damaged":
        save(folder / "0" / "fine.png", picture)
        save(folder / "1" / "fine.png", picture)
        (folder / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    elif layout == "link_out":
        save(outside, picture)
        save(folder / "0" / "a.png", picture)
        (folder / "1").mkdir()
        os.symlink(outside, folder / "1" / "b.png")
    elif layout == "both":
        save(folder / "0" / "a.png", picture)
        save(folder / "loose.png", picture)
    elif layout == "test_classes":
        for split_name, classes in (("train", "01"), ("test", "02")):
            for name in classes:
                save(folder / split_name / name / "a.png", picture)
        split = "test"
    elif layout == "too_large":
        for name in "01":
            save(folder / name / "a.png", picture)
        overrides = {"resolution": 2 ** 20}
    with pytest.raises(DataError, match=problem):
        load(folder_config(folder, tmp_path, **overrides), split)
    assert not (tmp_path / "decoded").exists()  # nothing decoded, nothing cached


def test_a_resolution_the_networks_cannot_build_stops_the_run_before_any_work(tmp_path):
    folder = tmp_path / "digits"
    colour_digits.write(folder, {"train": 16, "test": 0})
    result = run_train(TINY + ["data.source=folder", f"data.path={folder}", "data.resolution=36",
                               f"data.cache_dir={tmp_path / 'decoded'}", f"run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert "these are 36x36: set data.resolution to such a size" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
