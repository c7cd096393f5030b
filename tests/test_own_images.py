"""Data of another shape: the data describes itself, the networks are built for it, every checkpoint and export
records it, and nothing scores it against MNIST."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, all_state, assert_bitwise_equal, run_train, write_idx_images, write_idx_labels
from train.data import read_idx_images, read_idx_labels

COLOURS = torch.tensor([[255, 64, 64], [64, 255, 64], [64, 64, 255], [255, 255, 64]], dtype=torch.float32) / 255
RGB_RUN = TINY + ["model.conditional=true", "data.source=hf"]
NOT_MNIST = "this data is not MNIST's"


def coloured_digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` MNIST digits as 32x32 RGB pictures (padded by 2 pixels, each in one of four colours)."""
    grey = read_idx_images(REPO / "data" / "mnist", "train")[:count]
    padded = torch.nn.functional.pad(grey, (2, 2, 2, 2)).float()[:, None]  # [N, 1, 32, 32]
    colour = COLOURS[torch.arange(count) % len(COLOURS)][:, :, None, None]  # [N, 3, 1, 1]
    rgb = (padded * colour).round().to(torch.uint8).permute(0, 2, 3, 1)  # [N, 32, 32, 3]
    return rgb.numpy(), read_idx_labels(REPO / "data" / "mnist", "train")[:count].numpy()


@pytest.fixture(scope="module")
def rgb_digits(tmp_path_factory):
    """96 coloured 32x32 digits with their labels, as a local Hugging Face dataset (parquet)."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    folder = tmp_path_factory.mktemp("rgb_digits")
    pictures, labels = coloured_digits(96)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pictures], "label": labels.tolist()},
                               features=features).to_parquet(str(folder / "train.parquet"))
    return folder


@pytest.fixture(scope="module")
def rgb_run(rgb_digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rgb_run")
    result = run_train(RGB_RUN + [f"data.path={rgb_digits}", f"run.dir={run_dir}", "checkpoint.every=3"])
    assert result.returncode == 0, result.stderr[-3000:]
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
    first = run_train(RGB_RUN + [f"data.path={rgb_digits}", f"run.dir={run_dir}", "checkpoint.every=3",
                                 "train.steps=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    other = run_train(TINY + ["model.conditional=true", f"data.path={tiny_mnist}", f"run.dir={run_dir}"])
    assert other.returncode == 2
    assert "was trained on 3x32x32 images, 10 classes (sha256:" in other.stderr
    assert "this data is 1x28x28 images, 10 classes (mnist): resume with the data it was trained on" in other.stderr
    second = run_train(RGB_RUN + [f"data.path={rgb_digits}", f"run.dir={run_dir}", "checkpoint.every=3"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert_bitwise_equal(all_state(run_dir), all_state(rgb_run))


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


def test_the_quality_metrics_refuse_data_that_is_not_mnist(rgb_digits, rgb_run, tmp_path, tiny_mnist, tool_here):
    """Fashion-MNIST was scored against MNIST's test set with the MNIST classifier, without a word."""
    inverted = tmp_path / "inverted"  # MNIST's shape and labels, other pictures: as Fashion-MNIST is
    inverted.mkdir()
    write_idx_images(inverted, "train", 255 - read_idx_images(tiny_mnist, "train"))
    write_idx_labels(inverted, "train", read_idx_labels(tiny_mnist, "train"))
    for data in ([f"data.path={inverted}"], ["data.source=hf", f"data.path={rgb_digits}"]):
        run_dir = tmp_path / "refused"
        result = run_train(TINY + data + [f"run.dir={run_dir}", "eval.num_samples=100"])
        assert result.returncode == 2, result.stderr[-3000:]
        assert NOT_MNIST in result.stderr and "eval.num_samples=0" in result.stderr
        assert not (run_dir / "checkpoints").exists()
    evaluated = tool_here("evaluate", "--checkpoint", rgb_run, "--num", 100)
    assert evaluated.returncode == 2 and NOT_MNIST in evaluated.stderr


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
    result = run_train(RGB_RUN + [f"data.path={rgb_digits}", f"run.dir={tmp_path / 'run'}", "model.arch=seed"])
    assert result.returncode == 2
    assert "model.arch=seed (the blog's networks) draws 1x28x28 images; these are 3x32x32: use model.arch=dcgan" \
        in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
