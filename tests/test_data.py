"""Reading MNIST from every source, refusing bad files clearly, and dealing epochs to ranks."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, write_idx_images, write_idx_labels
from train.config import DataConfig
from train.data.images import MNIST, MNIST_DATASET, ImageSpec
from train.data.sharding import DataPosition, ShardedBatches
from train.data.sources import load
from train.data.readers.idx import read_idx_images
from train.errors import DataError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mnist_train():
    from conftest import REPO
    return read_idx_images(REPO / "data" / "mnist", "train")


def hf_config(tmp_path, path: str, **overrides) -> DataConfig:
    """data.source=hf with its decode cache inside the test's folder."""
    return DataConfig(source="hf", path=path, cache_dir=str(tmp_path / "decoded"), **overrides)


def copy_mnist(mnist_dir, destination):
    shutil.copytree(mnist_dir, destination)
    return destination


def test_shipped_mnist_reads_and_verifies(mnist_dir, mnist_train):
    test = read_idx_images(mnist_dir, "test")
    assert mnist_train.shape == (60000, 28, 28) and mnist_train.dtype == torch.uint8
    assert test.shape == (10000, 28, 28)
    assert 0 < mnist_train.float().mean() < 255


def test_uncompressed_idx_reads_the_same(tmp_path, mnist_dir, mnist_train):
    raw = gzip.decompress((mnist_dir / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw)  # no SHA256SUMS here: nothing to verify against
    assert torch.equal(read_idx_images(tmp_path, "train"), mnist_train)


def test_missing_file_is_named(tmp_path, mnist_dir):
    folder = copy_mnist(mnist_dir, tmp_path / "mnist")
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing data file .*train-images-idx3-ubyte.gz"):
        read_idx_images(folder, "train")


def test_corrupt_file_fails_its_checksum(tmp_path, mnist_dir):
    folder = copy_mnist(mnist_dir, tmp_path / "mnist")
    path = folder / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is corrupt: SHA-256 .* does not match"):
        read_idx_images(folder, "train")


def test_bad_magic_truncation_and_a_cut_gzip_file_are_reported(tmp_path, mnist_dir):
    """A user's own folder has no SHA256SUMS, so the format itself must catch what is wrong."""
    whole = (mnist_dir / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not a readable gzip file"):
        read_idx_images(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="is too short to be an IDX file"):
        read_idx_images(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x04" + bytes(100))
    with pytest.raises(DataError, match="magic number 2052, expected 2051"):
        read_idx_images(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        (2051).to_bytes(4, "big") + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(100))
    with pytest.raises(DataError, match="holds 100 bytes of data, its header promises 7840"):
        read_idx_images(tmp_path, "train")
    # 2^31 x 2^31 x 4 bytes with no data: numpy's product wrapped to 0 and matched the empty data (a traceback).
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        (2051).to_bytes(4, "big") + (2 ** 31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big"))
    with pytest.raises(DataError, match=f"holds 0 bytes of data, its header promises {2 ** 64} for shape"):
        read_idx_images(tmp_path, "train")


@pytest.mark.parametrize("listing, message", [
    (b"0123abcd\n", "SHA256SUMS line 1 is '0123abcd', not '<SHA-256>  <file name>'"),
    (b"\xff\xfe not text\n", "SHA256SUMS is not UTF-8 text, so not a sha256sum listing"),
])
def test_a_malformed_checksum_listing_is_named(tmp_path, mnist_dir, listing, message):
    """Before: a ValueError or UnicodeDecodeError traceback."""
    folder = copy_mnist(mnist_dir, tmp_path / "mnist")
    (folder / "SHA256SUMS").write_bytes(listing)
    with pytest.raises(DataError, match=message):
        read_idx_images(folder, "train")


def test_images_say_their_size_and_a_labels_file_is_refused_before_training(tmp_path, mnist_dir):
    """The data describes itself (the networks are built for it); MNIST's labels given as images are named."""
    write_idx_images(tmp_path, "train", torch.zeros(64, 32, 32, dtype=torch.uint8))
    spec = load(DataConfig(path=str(tmp_path))).spec
    assert (spec.shape, spec.num_classes, spec.dataset.startswith("sha256:")) == ((1, 32, 32), 10, True)
    shutil.copy(mnist_dir / "train-labels-idx1-ubyte.gz", tmp_path / "train-images-idx3-ubyte.gz")
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match=r"shape \(60000, 1\) .*the networks need uint8 grey or RGB images .*not its "
                                        "labels"):
        load(DataConfig(path=str(tmp_path)))


def test_hf_datasets_source_reads_a_local_parquet_dataset(tmp_path, mnist_train):
    pytest.importorskip("datasets")
    import datasets
    from PIL import Image
    subset = mnist_train[:300].numpy()
    records = {"image": [Image.fromarray(image) for image in subset], "label": list(range(300))}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(records, features=features).to_parquet(str(tmp_path / "train.parquet"))
    loaded = load(hf_config(tmp_path, str(tmp_path), holdout=0), labelled=True)
    assert torch.equal(loaded.images, torch.from_numpy(subset)[:, None]) and torch.equal(loaded.labels, torch.arange(300))
    assert loaded.spec == ImageSpec(1, 28, 28, 300, MNIST_DATASET)  # MNIST's images; classes up to the largest label
    assert len(load(hf_config(tmp_path, str(tmp_path)), labelled=True).images) == 300  # none held out:
    # MNIST's images (from any source) are scored against MNIST's shipped test set
    # Other data without a test split: data.holdout (0.1) of its images are one, never trained on, by a fixed draw.
    records["image"] = [Image.fromarray(255 - image) for image in subset]
    datasets.Dataset.from_dict(records, features=features).to_parquet(str(tmp_path / "train.parquet"))
    config = hf_config(tmp_path, str(tmp_path))
    training, test = (load(config, split, labelled=True) for split in ("train", "test"))
    assert (len(training.labels), len(test.labels)) == (270, 30)
    assert sorted(training.labels.tolist() + test.labels.tolist()) == list(range(300))
    assert torch.equal(training.images, 255 - loaded.images[training.labels])
    assert torch.equal(test.labels, test.labels.sort()[0])
    too_few = hf_config(tmp_path, str(tmp_path), holdout=0.001)  # nothing to hold out: all is training
    assert torch.equal(load(too_few).images, 255 - loaded.images)
    with pytest.raises(DataError, match="data.holdout=0.001 of 300 training images leaves 0 to test and 300 to train"):
        load(too_few, "test")


def test_a_saved_hf_dataset_is_a_training_split_without_a_test_split(tmp_path, mnist_train):
    """A dataset written by save_to_disk was read whole for the test split too: samples were scored against the
    images they were trained on."""
    pytest.importorskip("datasets")
    import datasets
    from PIL import Image
    records = {"image": [Image.fromarray(255 - image) for image in mnist_train[:40].numpy()], "label": [0, 1] * 20}
    datasets.Dataset.from_dict(records, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})).save_to_disk(str(tmp_path / "saved"))
    config = hf_config(tmp_path, str(tmp_path / "saved"))
    assert (len(load(config).images), len(load(config, "test").images)) == (36, 4)
    with pytest.raises(DataError, match="is one saved dataset \\(save_to_disk\\), read as the training split; it holds "
                                        "no test split"):
        load(hf_config(tmp_path, str(tmp_path / "saved"), holdout=0), "test")


def test_an_hf_image_column_is_decoded_once_into_a_cache_keyed_by_its_pictures(tmp_path, mnist_train, monkeypatch):
    """Before, every load decoded the column again: a training run decoded it for the loop, again for the
    evaluation's feature network and once more for its held-out test split."""
    pytest.importorskip("datasets")
    import datasets
    from PIL import Image
    from train.data import pictures
    folder = tmp_path / "parquet"
    folder.mkdir()

    def write(images):
        datasets.Dataset.from_dict({"image": [Image.fromarray(image) for image in images], "label": [0, 1] * 20},
                                   features=datasets.Features({"image": datasets.Image(), "label": datasets.Value(
                                       "int64")})).to_parquet(str(folder / "train.parquet"))

    inverted = 255 - mnist_train[:40].numpy()  # not MNIST's images: a test split is held out of them
    write(inverted)
    config = hf_config(tmp_path, str(folder))
    training = load(config, labelled=True)
    (cache,) = (tmp_path / "decoded").glob("*.safetensors")
    assert cache.name.startswith("hf_") and len(training.images) == 36

    def decoding(*args):
        raise AssertionError("decoded again")
    with monkeypatch.context() as patched:
        patched.setattr(pictures, "to_tensor", decoding)
        assert torch.equal(load(config, labelled=True).images, training.images)
        test = load(config, "test", labelled=True)
    assert torch.equal(torch.cat([training.images, test.images]).sort(0).values,
                       torch.from_numpy(inverted)[:, None].sort(0).values)
    # Other pictures, or another conversion, are another entry, never the first one's.
    inverted[0, 0, 0] ^= 1
    write(inverted)
    assert torch.equal(load(hf_config(tmp_path, str(folder), holdout=0)).images, torch.from_numpy(inverted)[:, None])
    load(hf_config(tmp_path, str(folder), resolution=32))
    assert len(list((tmp_path / "decoded").glob("*.safetensors"))) == 3
    # A cache that cannot be written is a warning naming the key that moves it; the pictures are still read.
    (tmp_path / "not_a_folder").write_text("")
    with pytest.warns(UserWarning, match="could not cache the decoded pictures in .*a writable data.cache_dir"):
        unwritable = load(DataConfig(source="hf", path=str(folder), cache_dir=str(tmp_path / "not_a_folder")))
    assert len(unwritable.images) == 36


def test_an_hf_image_column_without_images_or_string_labels_are_named(tmp_path):
    """Before: tracebacks ('int' object has no attribute 'convert'; torch.tensor of strings)."""
    pytest.importorskip("datasets")
    import datasets
    datasets.Dataset.from_dict({"image": list(range(8)), "label": ["seven"] * 8}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match="has an 'image' column of Value\\('int64'.*not of images"):
        load(hf_config(tmp_path, str(tmp_path)))
    from PIL import Image
    pictures = [Image.fromarray(np.zeros((28, 28), np.uint8))] * 8
    datasets.Dataset.from_dict({"image": pictures, "label": ["seven"] * 8}).to_parquet(str(tmp_path / "t.parquet"))
    assert load(hf_config(tmp_path, str(tmp_path))).spec.num_classes == 0  # unconditional: no classes
    with pytest.raises(DataError, match="has a 'label' column of Value\\('string'.*class labels are whole numbers"):
        load(hf_config(tmp_path, str(tmp_path)), labelled=True)
    datasets.Dataset.from_dict({"image": pictures, "label": [-1, 0] * 4}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match=r"labels of shape \(8,\) from -1 to 0; model.conditional=true needs one class "
                                        r"label \(0\) per image"):
        load(hf_config(tmp_path, str(tmp_path), holdout=0), labelled=True)
    datasets.Dataset.from_dict({"image": [None] + pictures[1:], "label": [0] * 8}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")})).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match="row 0 in Hugging Face dataset .* is not a readable picture \\(ValueError: the "
                                        "row holds no picture\\); replace or remove it"):  # was a TypeError's traceback
        load(hf_config(tmp_path, str(tmp_path)))


def test_hf_hub_id_without_network_says_how_to_use_local_files():
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="could not load Hugging Face dataset 'ylecun/mnist'.*local folder or parquet"):
        load(DataConfig(source="hf", path="ylecun/mnist"))


def test_torchvision_source_reads_files_already_in_place(tmp_path, mnist_dir, mnist_train):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in mnist_dir.glob("*.gz"):
        (raw / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    loaded = load(DataConfig(source="torchvision", path=str(tmp_path)))
    assert torch.equal(loaded.images, mnist_train[:, None]) and loaded.spec == MNIST


def deal(num_images, batch_size, world_size, seed=0, epochs=2):
    """Every rank's batches, as index lists, for `epochs` epochs."""
    images = torch.arange(num_images).view(num_images, 1, 1, 1).to(torch.uint8)  # index encoded in the pixel
    ranks = [ShardedBatches(images, batch_size, rank, world_size, seed, CPU) for rank in range(world_size)]
    steps = ranks[0].steps_per_epoch * epochs
    return [[(r.next()[0].flatten() * 255).round().long().tolist() for _ in range(steps)] for r in ranks], ranks[0]


def test_shards_are_disjoint_and_cover_each_epoch():
    per_rank, batches = deal(num_images=96, batch_size=4, world_size=3)  # 96 = 8 global batches of 12
    for epoch in range(2):
        seen = [i for rank in per_rank for batch in rank[epoch * 8:(epoch + 1) * 8] for i in batch]
        assert sorted(seen) == list(range(96))
    assert all(len(rank) == 16 for rank in per_rank)  # every rank runs the same number of steps


def test_tail_that_does_not_fill_a_global_batch_is_left_out_and_changes_each_epoch():
    per_rank, batches = deal(num_images=100, batch_size=4, world_size=3)
    epoch_sets = [{i for rank in per_rank for batch in rank[e * 8:(e + 1) * 8] for i in batch} for e in range(2)]
    assert all(len(s) == 96 for s in epoch_sets)
    assert epoch_sets[0] != epoch_sets[1]


def test_epoch_order_depends_on_seed_and_epoch_only():
    one, _ = deal(96, 4, 1)
    again, _ = deal(96, 4, 1)
    assert one == again
    other_seed, _ = deal(96, 4, 1, seed=1)
    assert one != other_seed
    assert one[0][:24] != one[0][24:]  # epochs differ


def test_global_batches_do_not_depend_on_the_number_of_processes():
    single, _ = deal(96, 12, 1)
    split, _ = deal(96, 4, 3)
    for step in range(16):
        assert single[0][step] == split[0][step] + split[1][step] + split[2][step]


def test_position_resumes_mid_epoch_exactly():
    images = torch.arange(96).view(96, 1, 1, 1).to(torch.uint8)
    straight = ShardedBatches(images, 4, 1, 2, 5, CPU)
    expected = [straight.next()[0] for _ in range(20)]
    first = ShardedBatches(images, 4, 1, 2, 5, CPU)
    for _ in range(7):
        first.next()
    resumed = ShardedBatches(images, 4, 1, 2, 5, CPU, position=DataPosition(**vars(first.position)))
    assert all(torch.equal(a, b) for a, b in zip(expected[7:], [resumed.next()[0] for _ in range(13)]))


def test_each_rank_gets_the_labels_of_its_own_images():
    """Image i is filled with the value i and has label 7i mod 10: every label must arrive with its image."""
    images = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1).expand(200, 1, 28, 28).contiguous()
    labels = torch.arange(200) * 7 % 10
    ranks = [ShardedBatches(images, 8, rank, 2, 3, CPU, labels=labels) for rank in range(2)]
    first_epoch = []
    for step in range(30):  # 12 steps an epoch: into the third
        for batches in ranks:
            batch, batch_labels = batches.next()
            index = (batch[:, 0, 0, 0] * 255).round().long()
            assert torch.equal(batch_labels, labels[index])
            first_epoch += index.tolist() if step < 12 else []
    assert len(set(first_epoch)) == len(first_epoch) == 192  # the ranks' slices are disjoint


def test_labels_that_are_not_digits_or_not_one_per_image_are_refused(tmp_path):
    write_idx_images(tmp_path, "train", torch.zeros(3, 28, 28, dtype=torch.uint8))
    write_idx_labels(tmp_path, "train", torch.tensor([3, 12, 5], dtype=torch.uint8))
    with pytest.raises(DataError, match=r"labels of shape \(3,\) from 3 to 12; model.conditional=true needs one "
                                        r"class label \(0-9\) per image"):
        load(DataConfig(path=str(tmp_path)), labelled=True)
    with pytest.raises(DataError, match="the data set has 96 images but 95 labels"):
        ShardedBatches(torch.zeros(96, 1, 28, 28, dtype=torch.uint8), 8, 0, 1, 0, CPU, labels=torch.zeros(95))


def test_more_processes_than_samples_is_refused():
    with pytest.raises(DataError, match="fewer than one global batch of 64 .*data.batch_size=8 x 8 processes"):
        ShardedBatches(torch.zeros(50, 1, 28, 28, dtype=torch.uint8), 8, 0, 8, 0, CPU)


def test_batches_are_float_images_in_unit_range(mnist_train):
    batch, _ = ShardedBatches(mnist_train[:, None], 16, 0, 1, 0, CPU).next()
    assert batch.shape == (16, 1, 28, 28) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1 and np.isclose(batch.max().item(), 1.0)


def test_a_data_source_is_one_module_named_for_its_kind_and_an_unknown_one_is_refused_by_name():
    from train.config import CHOICES
    from train.data import readers
    from train.data.readers._base import Reader
    from train.errors import ConfigError
    assert readers.KINDS == ("folder", "hf", "idx", "torchvision") == CHOICES["data.source"]
    assert all(isinstance(readers.load(kind), Reader) for kind in readers.KINDS)
    with pytest.raises(ConfigError, match=r"data.source='npz' is not a source of this code; the sources are folder, "
                                          r"hf, idx, torchvision \(one module each in train/data/readers/\)"):
        readers.load("npz")
    # Each names its data for the model card: none falls through to another's name.
    assert readers.load("hf").identity({"path": "alice/faces"}) == ("alice/faces", "alice/faces", "alice/faces")
    assert readers.load("hf").identity({"path": str(REPO / "pyproject.toml")})[1] == "parquet"
    assert readers.load("torchvision").identity({"torchvision_name": "CIFAR10"}) == ("CIFAR10", "cifar10", None)
