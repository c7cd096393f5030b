"""The image folder source: its layout, the conversion rule every source shares, the decode cache, and the folders
it refuses by name before any work."""

import os
import struct
import time
import unicodedata
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from conftest import TINY, run_train
from train import colour_digits
from train.config import SHIPPED_MNIST, DataConfig
from train.data.sources import load
from train.data.readers.idx import read_idx_images
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
    (cache,) = (tmp_path / "decoded").glob("*.safetensors")
    written = cache.stat().st_ino  # a rewrite replaces the file (a new inode); a read only marks it used
    again = load(folder_config(folder, tmp_path), labelled=True)
    assert cache.stat().st_ino == written and torch.equal(again.images, first.images)  # read from the cache
    test = load(folder_config(folder, tmp_path), "test", labelled=True)
    assert len(test.images) == 20 and test.spec.shape == first.spec.shape
    # Another conversion is another cache entry, never the first one's.
    grey = load(folder_config(folder, tmp_path, channels=1, resolution=28))
    assert grey.images.shape == (40, 1, 28, 28) and len(list((tmp_path / "decoded").glob("*.safetensors"))) == 3


def test_every_source_converts_by_the_same_rule(tmp_path):
    """MNIST read from its IDX files and from a folder of its PNGs give the same tensor for the same request."""
    mnist = read_idx_images(SHIPPED_MNIST, "train")[:30]
    for index, picture in enumerate(mnist.numpy()):
        save(tmp_path / "flat" / f"{index:02d}.png", picture)
    for request in ({}, {"channels": 3}, {"resolution": 32}, {"resolution": 20, "channels": 3}):
        # (holdout=0: converted MNIST is not MNIST's images, and nothing of the folder is to be held out here)
        from_folder = load(folder_config(tmp_path / "flat", tmp_path, holdout=0, **request)).images
        from_idx = load(DataConfig(**request)).images[:30]
        assert torch.equal(from_folder, from_idx), request
    assert load(folder_config(tmp_path / "flat", tmp_path)).spec.num_classes == 0  # a flat folder: unlabelled


def test_mixed_sizes_and_modes_are_converted_and_counted(tmp_path, capsys):
    folder = tmp_path / "mixed"
    save(folder / "a" / "grey.png", np.full((32, 32), 200, np.uint8))
    save(folder / "a" / "wide.png", np.full((30, 40, 3), 100, np.uint8))
    save(folder / "b" / "rgba.png", np.full((32, 32, 4), 50, np.uint8))
    (folder / "b" / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match=r"has pictures of 2 sizes \(32x32 \(2\), 40x30 \(1\).*e.g. a/wide.png.*set "
                                        "data.resolution"):
        load(folder_config(folder, tmp_path))
    loaded = load(folder_config(folder, tmp_path, resolution=32), labelled=True)
    assert loaded.images.shape == (3, 3, 32, 32) and loaded.labels.tolist() == [0, 0, 1]
    out = capsys.readouterr().err  # notes go to stderr: a tool's stdout is its report (train.evaluate's JSON)
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


def png_claiming(width: int, height: int) -> bytes:
    """A real PNG of 1-bit pixels whose header claims `width` x `height`: a few bytes that decode to gigabytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\0" + bytes(-(-width // 8))
    pixels = zlib.compress(row * 64)  # the first rows; the refusal must come from the header alone
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP header (24-bit) that claims `width` x `height`, with hardly any pixels behind it."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + bytes(16)


@pytest.mark.parametrize("name, content, claimed", [
    ("bomb.png", png_claiming(30000, 30000), "30000x30000"),
    ("bomb.bmp", bmp_claiming(100000, 100000), "100000x100000"),
])
def test_a_picture_whose_header_claims_more_than_the_limit_is_refused_by_name_before_decoding(tmp_path, name, content,
                                                                                            claimed):
    folder = tmp_path / "data"
    for index in range(3):
        save(folder / f"{index}.png", np.full((32, 32), 40 * index, np.uint8))
    (folder / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name} in .* claims to be {claimed} .*more than the 33.6 million this "
                                        r"pipeline decodes \(pictures.MAX_PICTURE_PIXELS"):
        load(folder_config(folder, tmp_path, resolution=32))
    assert not (tmp_path / "decoded").exists()


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(tmp_path):
    folder = tmp_path / "data"
    dark, bright = np.arange(0, 32768, 128, dtype=np.uint16), np.arange(32768, 65536, 128, dtype=np.uint16)
    for name, values in (("dark", dark), ("bright", bright)):
        (folder / name).mkdir(parents=True)
        for index in range(2):
            picture = Image.fromarray(values.reshape(16, 16))
            assert picture.mode == "I;16"
            picture.save(folder / name / f"{index}.png")
    loaded = load(folder_config(folder, tmp_path), labelled=True)
    assert loaded.spec.channels == 1  # 16-bit grey is grey
    images = loaded.images.double()
    bright_mean, dark_mean = images[loaded.labels == 0].mean(), images[loaded.labels == 1].mean()
    assert bright_mean > 190 and dark_mean < 65, (bright_mean, dark_mean)  # classes in label order: bright, dark
    expected = np.rint(np.concatenate([bright, dark]).reshape(2, 16, 16) / 257).astype(np.uint8)
    assert torch.equal(loaded.images[::2, 0], torch.from_numpy(expected))


def test_the_decode_cache_is_keyed_by_the_pillow_version(tmp_path, monkeypatch):
    import PIL
    folder = tmp_path / "data"
    save(folder / "a.png", np.zeros((8, 8), np.uint8))
    load(folder_config(folder, tmp_path))
    monkeypatch.setattr(PIL, "__version__", "0.0-another")
    load(folder_config(folder, tmp_path))
    assert len(list((tmp_path / "decoded").glob("folder_*.safetensors"))) == 2


def test_exif_orientation_is_applied(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    stored = np.zeros((24, 24, 3), np.uint8)
    stored[:12] = 255  # the top half white, as stored; orientation 6 shows it turned 90 degrees clockwise
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(folder / "turned.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(folder / "plain.jpg", quality=95)
    loaded = load(folder_config(folder, tmp_path)).images.float()  # files in sorted order: plain, turned
    shown = np.rot90(stored, k=-1)  # clockwise
    assert (loaded[1].permute(1, 2, 0).numpy() - shown).__abs__().mean() < 8
    assert (loaded[0].permute(1, 2, 0).numpy() - stored).__abs__().mean() < 8


@pytest.mark.parametrize("link, target, problem", [
    ("train/up", "..", "a folder that holds the link itself"),
    ("train/loop", ".", "a folder that holds the link itself"),
    ("train/2", "../test/1", "inside the test split"),
])
def test_a_link_that_would_read_pictures_twice_is_refused_by_name(tmp_path, link, target, problem):
    folder = tmp_path / "data"
    for split in ("train", "test"):
        for digit in "01":
            save(folder / split / digit / "a.png", np.zeros((8, 8), np.uint8))
    os.symlink(target, folder / link)
    with pytest.raises(DataError, match=rf"{link} is a link to .*, {problem}"):
        load(folder_config(folder, tmp_path))
    assert not (tmp_path / "decoded").exists()


def test_a_file_name_that_is_not_utf8_is_read_and_named_readably(tmp_path):
    folder = tmp_path / "data"
    odd = os.fsdecode(b"bad\xff\xfename.png")
    save(folder / "fine.png", np.full((8, 8), 7, np.uint8))
    save(folder / odd, np.full((8, 8), 9, np.uint8))
    assert load(folder_config(folder, tmp_path)).images.shape == (2, 1, 8, 8)
    (folder / os.fsdecode(b"cut\xffshort.png")).write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError) as refused:
        load(folder_config(folder, tmp_path))
    assert r"cut\xffshort.png in " in str(refused.value) and "is not a readable picture" in str(refused.value)
    str(refused.value).encode("utf-8")  # printable anywhere: no lone surrogates


@pytest.mark.parametrize("layout, problem", [
    ("empty_class", r"the class folder .*/b of the training split holds no pictures"),
    ("test_beside_classes", r"has a test folder but no train folder: put the training pictures in .*/train"),
    ("only_test", r"has a test folder but no train folder"),
    ("class_named_test", r"train/test is a class folder named 'test', a name that marks a split"),
    ("class_only_in_test", r"has the classes \['a', 'b', 'c'\], the training split \['a', 'b'\]"),
    ("nfc_nfd", r"same names written in different Unicode normalisations"),
])
def test_layouts_that_were_taken_silently_are_refused_by_name_before_anything_is_written(tmp_path, layout, problem):
    folder, picture = tmp_path / "data", np.zeros((8, 8), np.uint8)
    classes = {"empty_class": ["a"], "test_beside_classes": ["a", "b", "test"], "only_test": ["test/a", "test/b"],
               "class_named_test": ["train/a", "train/test", "test/a", "test/test"],
               "class_only_in_test": ["train/a", "train/b", "test/a", "test/b", "test/c"],
               "nfc_nfd": ["train/a", "train/" + unicodedata.normalize("NFC", "é"), "test/a",
                           "test/" + unicodedata.normalize("NFD", "é")]}[layout]
    for name in classes:
        save(folder / name / "x.png", picture)
    if layout == "empty_class":
        (folder / "b").mkdir()
    with pytest.raises(DataError, match=problem):
        load(folder_config(folder, tmp_path))
    assert not (tmp_path / "decoded").exists()


def test_what_the_pipeline_writes_inside_the_data_folder_is_never_read_as_data(tmp_path):
    folder = tmp_path / "data"
    for digit in "01":
        save(folder / digit / "a.png", np.full((8, 8), 50, np.uint8))
    config = DataConfig(source="folder", path=str(folder), cache_dir=str(folder / "cache"))
    first = load(config, labelled=True)
    assert (folder / "cache" / "CACHEDIR.TAG").is_file()
    (folder / "run").mkdir()  # a run directory kept beside the pictures
    (folder / "run" / "config.yaml").write_text("{}")
    (folder / "run" / "metrics.jsonl").write_text("")
    again = load(DataConfig(source="folder", path=str(folder), cache_dir=str(folder / "other-cache")), labelled=True)
    assert again.spec.num_classes == first.spec.num_classes == 2 and torch.equal(again.labels, first.labels)


def test_staged_files_of_dead_writers_and_unread_decoded_sets_are_removed(tmp_path):
    import socket
    cache = tmp_path / "decoded"
    cache.mkdir()
    host = socket.gethostname().replace(".", "_")
    dead = cache / f".folder_x.safetensors.{host}.999999999.incomplete"  # above Linux's largest pid: no process
    alive = cache / f".folder_y.safetensors.{host}.{os.getpid()}.incomplete"
    unread = cache / "folder_0123.safetensors"
    for path in (dead, alive, unread):
        path.write_bytes(b"partial")
    month_ago = time.time() - 31 * 86400
    os.utime(unread, (month_ago, month_ago))
    folder = tmp_path / "data"
    save(folder / "a.png", np.zeros((8, 8), np.uint8))
    load(folder_config(folder, tmp_path))
    assert not dead.exists() and alive.exists() and not unread.exists()
    assert len(list(cache.glob("folder_*.safetensors"))) == 1


def test_a_palette_of_greys_is_grey(tmp_path):
    folder = tmp_path / "data"
    for index in range(2):
        save(folder / f"{index}.png", np.full((8, 8), 60 * index, np.uint8))
        Image.open(folder / f"{index}.png").convert("P").save(folder / f"{index}.png")
    assert Image.open(folder / "0.png").mode == "P"
    loaded = load(folder_config(folder, tmp_path))
    assert loaded.spec.channels == 1 and loaded.images[1].unique().tolist() == [60]


def test_a_resolution_the_networks_cannot_build_is_refused_before_the_feature_network(tmp_path):
    folder = tmp_path / "digits"
    colour_digits.write(folder, {"train": 40, "test": 20})
    result = run_train(TINY + ["data.source=folder", f"data.path={folder}", "data.resolution=36", "eval.num_samples=100",
                               f"data.cache_dir={tmp_path / 'decoded'}", f"eval.cache_dir={tmp_path / 'eval'}",
                               f"run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2 and "these are 36x36: set data.resolution to such a size" in result.stderr
    assert not (tmp_path / "eval").exists()  # no feature network trained, no test features extracted
