"""Data of another shape: the data describes itself, the networks are built for it, every checkpoint and export
records it, and its quality is measured against its own test split with a feature network trained on it, never
against MNIST."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (REPO, TINY, accelerate_launch, all_state, assert_bitwise_equal, logged_metrics, run_train,
                      write_idx_images, write_idx_labels)
from train import colour_digits
from train.config import DataConfig
from train.data.sources import load
from train.data.readers.idx import read_idx_images, read_idx_labels
from train.quality import classifier
from train.quality.evaluator import Evaluator

RGB_RUN = TINY + ["model.conditional=true", "data.source=folder"]
TRAIN_IMAGES, TEST_IMAGES = 600, 200  # enough for a feature network that tells the digits apart
OWN_TEST_SPLIT = "quality metrics against the test split of sha256:"


def write_parquet(path, pictures: np.ndarray, labels: np.ndarray | None) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    columns = {"image": [Image.fromarray(p) for p in pictures]}
    features = {"image": datasets.Image()}
    if labels is not None:
        columns["label"], features["label"] = labels.tolist(), datasets.ClassLabel(num_classes=10)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))


@pytest.fixture(scope="module")
def rgb_digits(tmp_path_factory):
    """Coloured 32x32 digits as an image folder (train/<digit>/*.png, test/<digit>/*.png), made by the documented
    command's code from the shipped MNIST."""
    folder = tmp_path_factory.mktemp("rgb") / "colour_digits"
    colour_digits.write(folder, {"train": TRAIN_IMAGES, "test": TEST_IMAGES})
    return folder


def rgb_args(rgb_digits, run_dir, *more: str) -> list[str]:
    """A short conditional run on the coloured digits, decoded into a cache beside them (not the repository's)."""
    return RGB_RUN + [f"data.path={rgb_digits}", f"data.cache_dir={rgb_digits.parent / 'decoded'}",
                      f"run.dir={run_dir}", "checkpoint.every=3", *more]


@pytest.fixture(scope="module")
def rgb_run(rgb_digits, tmp_path_factory, eval_cache):
    """A conditional run on the coloured digits, evaluated at its end against their test split."""
    run_dir = tmp_path_factory.mktemp("rgb_run")
    result = run_train(rgb_args(rgb_digits, run_dir, "eval.num_samples=100", f"eval.cache_dir={eval_cache}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert OWN_TEST_SPLIT in result.stdout, result.stdout[-3000:]
    return run_dir


def test_rgb_images_train_and_their_description_is_recorded(rgb_run):
    latest = (rgb_run / "checkpoints" / (rgb_run / "checkpoints" / "latest").read_text().strip())
    state = json.loads((latest / "state.json").read_text())
    images = state["images"]
    assert {k: images[k] for k in ("channels", "height", "width", "num_classes")} == \
        {"channels": 3, "height": 32, "width": 32, "num_classes": 10}
    assert images["dataset"].startswith("sha256:")


def test_a_resume_continues_bitwise_and_refuses_data_of_another_shape(rgb_digits, rgb_run, tmp_path, tiny_mnist):
    run_dir = tmp_path / "resumed"
    first = run_train(rgb_args(rgb_digits, run_dir, "train.steps=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    other = run_train(TINY + ["model.conditional=true", f"data.path={tiny_mnist}", f"run.dir={run_dir}"])
    assert other.returncode == 2
    assert "was trained on 3x32x32 images, 10 classes (sha256:" in other.stderr
    assert "this data is 1x28x28 images, 10 classes (mnist): resume with the data it was trained on" in other.stderr
    second = run_train(rgb_args(rgb_digits, run_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    assert_bitwise_equal(all_state(run_dir), all_state(rgb_run))


@pytest.mark.slow
def test_two_ranks_decode_once_and_resume_bitwise(rgb_digits, tmp_path):
    """With two processes one decodes the folder while the other waits, and a resume continues bitwise."""
    decoded = tmp_path / "decoded"
    args = [f"data.cache_dir={decoded}"]
    whole = accelerate_launch(2, ["-m", "train"] + rgb_args(rgb_digits, tmp_path / "whole") + args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert len(list(decoded.glob("folder_*.safetensors"))) == 1
    halves = tmp_path / "halves"
    for steps in (3, 6):
        result = accelerate_launch(2, ["-m", "train"] + rgb_args(rgb_digits, halves, f"train.steps={steps}") + args)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_bitwise_equal(all_state(halves), all_state(tmp_path / "whole"))


def test_sample_draws_the_asked_class_in_the_datas_shape_and_an_export_reloads(rgb_run, tmp_path, tool_here):
    npy = tmp_path / "threes.npy"
    assert tool_here("sample", "--checkpoint", rgb_run, "--num", 5, "--label", 3, "--out", npy).returncode == 0
    drawn = np.load(npy)
    assert drawn.shape == (5, 32, 32, 3) and drawn.dtype == np.uint8
    exported = tmp_path / "export"
    assert tool_here("export", "--checkpoint", rgb_run, "--out", exported).returncode == 0
    assert json.loads((exported / "generator.json").read_text())["images"]["channels"] == 3
    again = tmp_path / "again.npy"
    assert tool_here("sample", "--checkpoint", exported, "--num", 5, "--label", 3, "--out", again).returncode == 0
    assert np.array_equal(np.load(again), drawn)


def test_rgb_data_is_scored_against_its_own_test_split_with_its_own_feature_network(rgb_run, eval_cache,
                                                                                       tool_here):
    """Data that is not MNIST's was scored against MNIST's test set with the MNIST classifier, without a word."""
    (final,) = [line for line in logged_metrics(rgb_run) if "eval/fd" in line]
    assert math.isfinite(final["eval/fd"])
    (network,) = eval_cache.glob("feature_network_*.safetensors")  # trained once, by the run, and cached
    stamp = network.stat().st_mtime_ns
    evaluated = tool_here("evaluate", "--checkpoint", rgb_run, "--num", 100, "--cache-dir", eval_cache, "--floor")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout)
    assert report["against"].startswith("the test split of sha256:")
    assert report["metrics"]["fd"] == pytest.approx(final["eval/fd"], rel=1e-6)  # the run's own numbers
    # The data's own training images: every class told apart, far nearer its test split than 6 steps of training.
    floor = report["training_set_floor"]
    assert floor["classes_present"] == 10 and floor["fd"] * 5 < report["metrics"]["fd"]
    assert network.stat().st_mtime_ns == stamp  # reused, not trained again


def test_a_feature_network_trained_on_the_data_knows_it_and_mnists_does_not(rgb_digits, tmp_path):
    """The MNIST family other than MNIST (here: MNIST's digits inverted, as Fashion-MNIST is another picture of the
    same shape) gets a feature network of its own, which tells its test images apart; MNIST's does not."""
    inverted = tmp_path / "inverted"
    inverted.mkdir()
    for split, count in (("train", TRAIN_IMAGES * 2), ("test", TEST_IMAGES)):
        write_idx_images(inverted, split, 255 - read_idx_images(REPO / "data" / "mnist", split)[:count])
        write_idx_labels(inverted, split, read_idx_labels(REPO / "data" / "mnist", split)[:count])
    training = load(DataConfig(path=str(inverted)), labelled=True)
    evaluator = Evaluator.for_data(DataConfig(path=str(inverted)), training.spec, tmp_path / "cache")
    assert evaluator.against == f"the test split of {training.spec.dataset}"
    assert evaluator.test_accuracy() > 0.8
    mnists = Evaluator.mnist(REPO / "data" / "mnist", tmp_path / "cache")
    test = load(DataConfig(path=str(inverted)), "test").images
    assert classifier.accuracy(mnists.network, test, evaluator.real_labels) < 0.5
    # Its own training images are near its test images in its features, far in MNIST's.
    assert evaluator.training_set_floor(TEST_IMAGES)["fd"] * 5 < mnists.score(test)["fd"]


def test_the_quality_metrics_refuse_what_they_cannot_measure_before_any_work(rgb_digits, rgb_run, tmp_path,
                                                                                 tool_here):
    unlabelled, no_test = tmp_path / "unlabelled", tmp_path / "no_test"  # a flat image folder; parquet files
    unlabelled.mkdir(), no_test.mkdir()
    pictures, labels = colour_digits.coloured("train", 96)
    for index, picture in enumerate(pictures):
        Image.fromarray(picture).save(unlabelled / f"{index}.png")
    write_parquet(no_test / "train.parquet", pictures, labels)
    for source, data, holdout, problem in (  # (unlabelled pictures: tests/test_unlabelled.py)
            ("hf", no_test, 0, "hold out part of the training images as one (data.holdout, e.g. 0.1)"),):
        run_dir = tmp_path / "refused"
        result = run_train(TINY + [f"data.source={source}", f"data.path={data}", f"run.dir={run_dir}",
                                   "eval.num_samples=100", f"data.cache_dir={tmp_path / 'decoded'}",
                                   f"data.holdout={holdout}"])
        assert result.returncode == 2, result.stderr[-3000:]
        assert problem in result.stderr and "eval.num_samples=0" in result.stderr
        assert not (run_dir / "checkpoints").exists()
    # The generator's data moved: named, and found again with --data-path.
    moved = tmp_path / "moved"
    shutil.copytree(rgb_digits, moved)
    exported = tmp_path / "export"
    assert tool_here("export", "--checkpoint", rgb_run, "--out", exported).returncode == 0
    description = json.loads((exported / "generator.json").read_text())
    assert description["data"]["source"] == "folder" and description["data"]["path"] == str(rgb_digits)
    (exported / "generator.json").write_text(json.dumps(description | {"data": description["data"] | {
        "path": str(unlabelled)}}))
    shifted = tool_here("evaluate", "--checkpoint", exported, "--num", 100, "--cache-dir", tmp_path / "cache")
    assert shifted.returncode == 2
    assert f"data.path={str(unlabelled)!r} gives no such data" in shifted.stderr and "--data-path" in shifted.stderr
    found = tool_here("evaluate", "--checkpoint", exported, "--num", 100, "--data-path", moved,
                      "--cache-dir", tmp_path / "cache")
    assert found.returncode == 0, found.stderr[-3000:]


def test_labelled_data_without_a_test_split_is_scored_against_a_part_held_out_of_its_training(rgb_digits, tmp_path,
                                                                                              tool_here):
    """A folder of class folders with no test split: data.holdout of its pictures become its test split, never
    trained on, the same for the run and for train.evaluate, and named in both."""
    flat = tmp_path / "flat"
    shutil.copytree(rgb_digits / "train", flat)  # flat/<digit>/*.png, no train/ or test/
    config = DataConfig(source="folder", path=str(flat), cache_dir=str(tmp_path / "decoded"))
    training, test = load(config, "train", labelled=True), load(config, "test", labelled=True)
    assert (len(training.images), len(test.images)) == (TRAIN_IMAGES - TRAIN_IMAGES // 10, TRAIN_IMAGES // 10)
    assert not {image.tobytes() for image in test.images.numpy()} & {i.tobytes() for i in training.images.numpy()}
    assert set(test.labels.tolist()) == set(range(10))
    assert torch.equal(load(config, "test").images, test.images)  # the same draw, with or without labels
    run_dir = tmp_path / "run"
    result = run_train(RGB_RUN + [f"data.path={flat}", f"data.cache_dir={tmp_path / 'decoded'}", f"run.dir={run_dir}",
                                  "eval.num_samples=100", f"eval.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    against = (f"{TRAIN_IMAGES // 10} images held out of the training split (data.holdout=0.1, never trained on) "
               f"of {training.spec.dataset}")
    assert f"quality metrics against {against}" in result.stdout
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "state.json").read_text())["images"]["dataset"] == training.spec.dataset
    (final,) = [line for line in logged_metrics(run_dir) if "eval/fd" in line]
    evaluated = tool_here("evaluate", "--checkpoint", run_dir, "--num", 100, "--cache-dir", tmp_path / "cache")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout)
    assert report["against"] == against and report["metrics"]["fd"] == pytest.approx(final["eval/fd"], rel=1e-6)
    exported = tmp_path / "export"
    assert tool_here("export", "--checkpoint", run_dir, "--out", exported).returncode == 0
    card = (exported / "README.md").read_text()
    assert "against 10% of flat's training images held out of training (data.holdout)" in card
    assert "dataset:\n      name: flat\n      type: image-folder\n      split: held-out part of train" in card


def test_a_subset_of_mnist_is_mnist_and_an_export_without_images_reads_as_mnists(tiny_mnist, tmp_path, tool_here):
    run_dir = tmp_path / "run"
    assert run_train(TINY + [f"data.path={tiny_mnist}", f"run.dir={run_dir}"]).returncode == 0
    exported = tmp_path / "export"
    assert tool_here("export", "--checkpoint", run_dir, "--out", exported).returncode == 0
    description = json.loads((exported / "generator.json").read_text())
    assert description["images"] == {"channels": 1, "height": 28, "width": 28, "num_classes": 10, "dataset": "mnist"}
    del description["images"]  # as exports were written before they recorded their images
    (exported / "generator.json").write_text(json.dumps(description))
    assert tool_here("sample", "--checkpoint", exported, "--num", 4, "--out", tmp_path / "old.npy").returncode == 0
    assert tool_here("sample", "--checkpoint", run_dir, "--num", 4, "--out", tmp_path / "new.npy").returncode == 0
    assert np.array_equal(np.load(tmp_path / "old.npy"), np.load(tmp_path / "new.npy"))
    assert np.load(tmp_path / "old.npy").shape == (4, 28, 28)


def test_the_blogs_networks_refuse_rgb_data_before_any_work(rgb_digits, tmp_path):
    result = run_train(rgb_args(rgb_digits, tmp_path / "run", "model.arch=seed"))
    assert result.returncode == 2
    assert "model.arch=seed (the blog's networks) draws 1x28x28 images; these are 3x32x32: use model.arch=dcgan" \
        in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
