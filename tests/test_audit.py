"""The memorisation audit: training images copied read as copies, unseen images at the base rate, and an audit
against other data is refused."""

import json

import pytest
from PIL import Image

from conftest import TINY, run_train, write_idx_images, write_idx_labels
from train.audit import GRID_PAIRS, audit
from train.config import SHIPPED_MNIST
from train.data.readers.idx import read_idx_images, read_idx_labels
from train.quality.evaluator import Evaluator
from train.quality.metrics import COPY_PERCENTILE

REFERENCE = 5000  # the training images of the function tests: the first 5,000 of MNIST's


@pytest.fixture(scope="module")
def mnist_audit(eval_cache):
    evaluator = Evaluator.mnist(SHIPPED_MNIST, eval_cache)
    training = read_idx_images(SHIPPED_MNIST, "train")[:, None]
    return evaluator, training


def test_a_generator_that_returns_training_images_copies_them_all(mnist_audit):
    evaluator, training = mnist_audit
    report, pairs = audit(evaluator, training[:1000], training[:REFERENCE])
    assert report["features"]["copy_rate"] == 1.0 and report["pixels"]["copy_rate"] == 1.0
    assert report["pixels"]["samples"]["p50"] == 0.0  # each sample is its own nearest training image
    assert (pairs[0::2] == pairs[1::2]).all() and len(pairs) == 2 * GRID_PAIRS


def test_images_the_training_never_saw_copy_at_the_base_rate(mnist_audit):
    """MNIST training images outside the reference set are as unseen as the test images: about 1% of them fall
    below the test images' 1st percentile, by chance (1,000 samples: a few tenths of a percent either way)."""
    evaluator, training = mnist_audit
    report, _ = audit(evaluator, training[50000:51000], training[:REFERENCE])
    for space in ("features", "pixels"):
        assert report[space]["copy_rate"] < 3 * COPY_PERCENTILE / 100, space
        assert report[space]["samples"]["p50"] > report[space]["threshold"]


@pytest.fixture(scope="module")
def run_dir(tiny_mnist, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("audited")
    assert run_train(TINY + [f"data.path={tiny_mnist}", f"run.dir={run_dir}"]).returncode == 0
    return run_dir


def test_the_command_audits_a_run_and_refuses_other_data(run_dir, tiny_mnist, tmp_path, tool_here, eval_cache):
    grid = tmp_path / "pairs.png"
    result = tool_here("audit", "--checkpoint", run_dir, "--num", 200, "--grid", grid, "--cache-dir", eval_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["training_images"] == 96 and report["held_out"] == "MNIST's test set"
    assert 0 <= report["features"]["copy_rate"] <= 1 and report["pixels"]["threshold"] > 0
    assert Image.open(grid).size == (8 * 30 + 2, 8 * 30 + 2)  # 32 pairs, 8 images a row, 2-pixel borders
    other = tmp_path / "other"  # the same digits inverted: data of the same shape that is not MNIST
    other.mkdir()
    write_idx_images(other, "train", 255 - read_idx_images(tiny_mnist, "train"))
    write_idx_labels(other, "train", read_idx_labels(tiny_mnist, "train"))
    refused = tool_here("audit", "--checkpoint", run_dir, "--num", 200, "--data-path", other)
    assert refused.returncode == 2 and "is not the data the generator was trained on" in refused.stderr


def test_more_samples_than_memory_holds_are_refused_before_any_work(run_dir, tool_here):
    result = tool_here("audit", "--checkpoint", run_dir, "--num", 10 ** 12)
    assert result.returncode == 2 and "--num 1000000000000 needs about" in result.stderr
