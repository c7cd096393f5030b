"""eval.features=inception: Inception-v3's features through torch-fidelity, from a weights file already on the
machine, refused before any work without it. The standard weights cannot be downloaded here, so these tests write
a file of the same network with random weights: they test the plumbing (the file read, the features scored the
standard way, the network named everywhere), not the values of a published FID."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY, logged_metrics, run_env, run_train
from train import colour_digits
from train.config import INCEPTION_WEIGHTS_URL, DataConfig, inception_weights
from train.data.sources import load
from train.errors import ConfigError
from train.models import to_uint8
from train.quality import inception, metrics, reported
from train.quality.evaluator import INCEPTION, Evaluator

PICTURES = 24  # 12 of them held out (data.holdout=0.5): Inception-v3 takes 0.12 s a picture on 2 CPU cores
# 12 pictures in 2048 features: both covariances are singular, and float64's square roots of their product (ours
# through eigenvalues, torch-fidelity's through scipy's sqrtm) agree to about 1e-6 of the sum the FD is a
# difference of, |mu_a - mu_b|^2 + Tr S_a + Tr S_b (there 12.3 for an FD of 0.51).
SINGULAR_FD_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as the standard file is."""
    return inception.write_random_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """The colour digits' first PICTURES training pictures in one flat folder."""
    folder = tmp_path_factory.mktemp("inception_data") / "pictures"
    folder.mkdir()
    for index, picture in enumerate(colour_digits.coloured("train", PICTURES)[0]):
        Image.fromarray(picture).save(folder / f"{index:05d}.png")
    return folder


def data_config(folder: Path) -> DataConfig:
    return DataConfig(source="folder", path=str(folder), cache_dir=str(folder.parent / "decoded"), holdout=0.5)


def data_args(folder: Path) -> list[str]:
    return [f"data.{key}={getattr(data_config(folder), key)}" for key in ("source", "path", "cache_dir", "holdout")]


def test_the_weights_are_torch_fidelitys_file_in_torch_hubs_folder_unless_the_config_names_one(tmp_path,
                                                                                             monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    assert INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    for torch_home, xdg in ((str(tmp_path / "torch"), None), (None, str(tmp_path / "xdg"))):
        for name, value in (("TORCH_HOME", torch_home), ("XDG_CACHE_HOME", xdg)):
            if value:
                monkeypatch.setenv(name, value)
            else:
                monkeypatch.delenv(name, raising=False)
        expected = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
        with pytest.raises(ConfigError, match=f"from {expected}, and there is no such file"):
            inception_weights(None)
        expected.parent.mkdir(parents=True)
        expected.write_bytes(b"")
        assert inception_weights(None) == expected
    assert inception_weights(str(expected)) == expected


def test_without_its_weights_a_run_and_the_tools_are_refused_before_any_work_saying_what_to_copy_where(
        pictures, tmp_path, tool_here):
    run_dir = tmp_path / "refused"
    result = run_train(TINY + data_args(pictures) + [f"run.dir={run_dir}", "eval.num_samples=100",
                                                     "eval.features=inception"],
                       env=run_env(TORCH_HOME=str(tmp_path / "torch")))
    assert result.returncode == 2 and not run_dir.exists()
    missing = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
    assert (f"eval.features=inception reads Inception-v3's weights from {missing}, and there is no such file "
            f"(nothing is downloaded at run time): download {INCEPTION_WEIGHTS_URL} on a machine with internet and "
            "copy it there, or set eval.inception_weights to where it is") in result.stderr
    for tool in ("evaluate", "audit"):
        refused = tool_here(tool, "--checkpoint", tmp_path / "no-such-run", "--features", "inception",
                            "--inception-weights", tmp_path / "absent.pth")
        assert refused.returncode == 2
        assert f"from {tmp_path / 'absent.pth'}, and there is no such file" in refused.stderr
        assert "or set --inception-weights to where it is" in refused.stderr


@pytest.mark.slow  # Inception-v3 on a CPU
def test_inception_features_give_torch_fidelitys_fid_and_the_report_names_the_weights(
        pictures, weights, eval_cache):
    training = load(data_config(pictures))
    evaluator = Evaluator.for_data(data_config(pictures), training.spec, eval_cache, features=INCEPTION,
                                   weights=str(weights))
    assert evaluator.feature_network.startswith(f"Inception-v3 weights {weights} (sha256:")
    assert evaluator.feature_network.endswith("not the standard pt_inception-2015-12-05: its FID is not comparable "
                                              "with published ones")
    assert evaluator.real.features.shape == (PICTURES // 2, 2048) and evaluator.test_accuracy() is None
    real = training.images
    report = evaluator.report(real)
    assert set(report["metrics"]) == set(reported.measured(classes=False))
    assert report["feature_network"] == evaluator.feature_network
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    fake = metrics.extract(evaluator.network, real).features
    standard = fid_statistics_to_metric(fid_features_to_statistics(evaluator.real.features.double().cpu()),
                                        fid_features_to_statistics(fake.double().cpu()), verbose=False)
    gaussians = metrics.Gaussian.of(evaluator.real.features), metrics.Gaussian.of(fake)
    terms = ((gaussians[0].mean - gaussians[1].mean) ** 2).sum() + sum(g.covariance.trace() for g in gaussians)
    assert report["metrics"]["fd"] == pytest.approx(standard["frechet_inception_distance"],
                                                    abs=SINGULAR_FD_TOLERANCE * terms)
    noise = to_uint8(torch.rand(real.shape, generator=torch.Generator().manual_seed(0)))
    noise_distance = metrics.nearest(metrics.extract(evaluator.network, noise).features, evaluator.real.features)[0]
    assert noise_distance.mean() > 2 * metrics.nearest(fake, evaluator.real.features)[0].mean()  # it sees pictures


@pytest.mark.slow  # Inception-v3 on a CPU
def test_a_run_scored_on_inception_names_it_in_its_log_and_metrics_and_train_audit_reads_the_same_file(
        pictures, weights, eval_cache, tmp_path, tool_here):
    run_dir = tmp_path / "run"
    result = run_train(TINY + data_args(pictures) + [
        f"run.dir={run_dir}", "train.steps=2", "eval.num_samples=100", f"eval.cache_dir={eval_cache}",
        "eval.features=inception", f"eval.inception_weights={weights}"])
    assert result.returncode == 0, result.stderr[-3000:]
    line = logged_metrics(run_dir)[-1]
    assert line["feature_network"].startswith(f"Inception-v3 weights {weights} ") and line["eval/fd"] > 0
    assert f"in the features of {line['feature_network']}" in result.stdout
    audited = tool_here("audit", "--checkpoint", run_dir, "--num", 1, "--cache-dir", eval_cache,
                        "--features", "inception", "--inception-weights", weights)
    assert audited.returncode == 0, audited.stderr[-3000:]
    assert json.loads(audited.stdout)["feature_network"] == line["feature_network"]
