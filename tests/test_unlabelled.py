"""Pictures without classes are scored too: a self-supervised feature network trained on their own training split
(train/quality/contrastive.py), against the part held out of it; its numbers rise with the defects the metrics are
there to see, and the run, its best checkpoint, its stop at a quality target and its model card work as on
labelled data, each naming the network."""

import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, logged_metrics, run_env, run_train
from train import colour_digits
from train.config import DataConfig
from train.data.sources import load
from train.models import generate, to_uint8
from train.quality import metrics
from train.quality.evaluator import Evaluator
from train.sharing import model_card
from train.sharing.export import load_generator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.wandb_records import records  # noqa: E402

PICTURES = 2000  # 200 of them held out (data.holdout=0.1): the test split
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
RANKED_STEPS, RANKED_SAMPLES = (10, 30, 90, 270), 500  # checkpoints of one run, 3x apart; samples scored of each


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The colour digits' first PICTURES training pictures in class folders (train/<digit>/), without a test split."""
    folder = tmp_path_factory.mktemp("unlabelled") / "labelled"
    colour_digits.write(folder, {"train": PICTURES})
    return folder


@pytest.fixture(scope="module")
def unlabelled(labelled):
    """The same pictures in one flat folder, without classes, in the order the class folders are read: the same
    data set (its content hash), scored by the same self-supervised network."""
    folder = labelled.parent / "pictures"
    folder.mkdir()
    for path in sorted(labelled.glob("train/*/*.png")):
        shutil.copyfile(path, folder / f"{path.parent.name}_{path.name}")
    return folder


def data_config(folder: Path) -> DataConfig:
    return DataConfig(source="folder", path=str(folder), cache_dir=str(folder.parent / "decoded"))


@pytest.fixture(scope="module")
def evaluator(unlabelled, eval_cache):
    training = load(data_config(unlabelled))
    return Evaluator.for_data(data_config(unlabelled), training.spec, eval_cache)


def test_unlabelled_pictures_are_held_out_and_scored_by_a_self_supervised_network_named_in_the_report(
        unlabelled, evaluator):
    training, test = load(data_config(unlabelled)), load(data_config(unlabelled), "test")
    assert (len(training.images), len(test.images)) == (PICTURES - PICTURES // 10, PICTURES // 10)
    assert not {i.tobytes() for i in test.images.numpy()} & {i.tobytes() for i in training.images.numpy()}
    assert evaluator.against.startswith(f"{PICTURES // 10} images held out of the training split")
    assert evaluator.feature_network.startswith(f"a self-supervised network trained on {training.spec.dataset} ")
    assert evaluator.test_accuracy() is None
    from train.quality import reported
    report = evaluator.report(evaluator.training_images(200, 0), copy_rate=True)
    assert set(report["metrics"]) == set(reported.measured(classes=False, copy_rate=True)) and "per_digit" not in report
    assert report["feature_network"] == evaluator.feature_network


def test_its_numbers_rise_with_noise_blur_another_sets_pictures_and_missing_colours_or_digits(evaluator):
    """Against the held-out pictures: pictures it never saw are near the floor, and each defect, made stronger,
    scores worse; a set missing half the colours, or half the digits, scores clearly worse than as many pictures of
    all of them."""
    pictures, digits = colour_digits.coloured("test", 1000)
    pictures, digits = torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(digits)
    unit = pictures.float() / 255

    def fd(images: torch.Tensor) -> float:
        return metrics.frechet_distance(evaluator.real.features, metrics.extract(evaluator.network, images).features)

    floor = fd(pictures)
    noise = torch.randn(unit.shape, generator=torch.Generator().manual_seed(0))
    noised = [fd(to_uint8((unit + sigma * noise).clamp(0, 1))) for sigma in (0.1, 0.2, 0.3)]
    binomial = torch.tensor([1.0, 2.0, 1.0])
    kernel, blurred, blurs = (binomial[:, None] * binomial[None] / 16)[None, None], unit, []
    for _ in range(3):
        blurred = torch.nn.functional.conv2d(blurred.flatten(0, 1)[:, None], kernel, padding=1).view_as(unit)
        blurs.append(fd(to_uint8(blurred)))
    replaced = []
    for share in (0.1, 0.25, 0.5):  # another set's pictures: the digits drawn dark on light
        mixed = pictures.clone()
        mixed[:int(share * len(mixed))] = 255 - pictures[:int(share * len(mixed))]
        replaced.append(fd(mixed))
    for worse in (noised, blurs, replaced):
        assert floor < worse[0] < worse[1] < worse[2], (floor, worse)
    colour = torch.arange(len(pictures)) % len(colour_digits.COLOURS)  # the n-th picture is in colour n mod 8
    for half in (pictures[colour < 4], pictures[digits < 5]):  # as many pictures, twice each, of all of them
        assert fd(half.repeat(2, 1, 1, 1)) > 1.3 * fd(pictures[:len(half)].repeat(2, 1, 1, 1))


def test_a_run_on_unlabelled_pictures_keeps_its_best_stops_at_its_target_and_names_the_network_everywhere(
        unlabelled, evaluator, eval_cache, tmp_path, tool_here):
    run_dir = tmp_path / "run"
    result = run_train(TINY + ["data.source=folder", f"data.path={unlabelled}",
                               f"data.cache_dir={unlabelled.parent / 'decoded'}", f"run.dir={run_dir}",
                               "eval.num_samples=100", "eval.every=3", f"eval.cache_dir={eval_cache}",
                               "train.stop_at_fd=1e6", "logging.wandb=offline"],
                       env=run_env(WANDB_API_KEY=FAKE_KEY))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"in the features of {evaluator.feature_network}" in result.stdout
    assert "reached train.stop_at_fd=1e+06: stopping" in result.stderr
    line = logged_metrics(run_dir)[-1]
    assert line["step"] == 3 and line["eval/fd"] > 0 and line["feature_network"] == evaluator.feature_network
    assert (run_dir / "checkpoints" / "best").resolve().name == "step_00000003"
    configs = [json.loads(item.value_json) for path in run_dir.glob("wandb/offline-run-*/run-*.wandb")
               for record in records(path) if record.WhichOneof("record_type") == "config"
               for item in record.config.update if item.key == "feature_network"]
    assert configs == [evaluator.feature_network]  # W&B charts numbers: the name is in the run's config
    exported = tmp_path / "export"
    assert tool_here("export", "--checkpoint", run_dir, "--out", exported).returncode == 0
    card = (exported / "README.md").read_text()
    assert f"in the features of {model_card.text(evaluator.feature_network)}" in card  # as markdown shows it
    assert f"| FD | {line['eval/fd']:.4g}" in card
    scored = tool_here("evaluate", "--checkpoint", exported, "--num", 100, "--cache-dir", eval_cache)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["feature_network"] == evaluator.feature_network


def test_a_classifier_for_unlabelled_pictures_is_refused_by_name_before_any_work(unlabelled, tmp_path):
    run_dir = tmp_path / "refused"
    result = run_train(TINY + ["data.source=folder", f"data.path={unlabelled}", f"run.dir={run_dir}",
                               f"data.cache_dir={unlabelled.parent / 'decoded'}", "eval.num_samples=100",
                               "eval.features=classifier"])
    assert result.returncode == 2
    assert "is unlabelled, and eval.features=classifier needs the data's own labels" in result.stderr
    assert "eval.features=self_supervised" in result.stderr and not (run_dir / "checkpoints").exists()


def test_a_run_on_all_of_the_unlabelled_pictures_resumes_with_holdout_0_and_is_told_so_without_it(unlabelled, tmp_path):
    """Runs on unlabelled data begun before data.holdout applied to it trained on every picture."""
    run_dir = tmp_path / "run"
    args = TINY + ["data.source=folder", f"data.path={unlabelled}", f"data.cache_dir={unlabelled.parent / 'decoded'}",
                   f"run.dir={run_dir}", "train.steps=2", "checkpoint.every=2"]
    assert run_train(args + ["data.holdout=0"]).returncode == 0
    refused = run_train(args + ["train.steps=4"])
    assert refused.returncode == 2 and "resume that with data.holdout=0" in refused.stderr
    assert run_train(args + ["train.steps=4", "data.holdout=0"]).returncode == 0


def test_the_feature_networks_the_config_offers_are_the_evaluators_and_another_is_refused_by_name(tmp_path):
    from train.config import CHOICES
    from train.errors import ConfigError
    from train.quality.evaluator import AUTO, FEATURE_NETWORKS
    assert CHOICES["eval.features"] == (AUTO, *FEATURE_NETWORKS)
    with pytest.raises(ConfigError, match="eval.features='vgg16' is not a feature network of this code; the "
                                          "feature networks are auto, classifier, self_supervised, inception"):
        Evaluator.for_data(DataConfig(), load(DataConfig()).spec, tmp_path, features="vgg16")


@pytest.fixture(scope="module")
def labelled_run(labelled, tmp_path_factory):
    """A run on the labelled pictures, long enough to change between its checkpoints (RANKED_STEPS), that chose the
    self-supervised network over the classifier auto would pick."""
    run_dir = tmp_path_factory.mktemp("labelled_run")
    result = run_train(TINY + ["data.source=folder", f"data.path={labelled}",
                               f"data.cache_dir={data_config(labelled).cache_dir}", f"run.dir={run_dir}",
                               "data.batch_size=32", f"train.steps={RANKED_STEPS[-1]}",
                               f"checkpoint.every={RANKED_STEPS[0]}", "checkpoint.keep_last=0", "logging.every=100",
                               "eval.features=self_supervised"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # a run long enough to change between its checkpoints
def test_labelled_pictures_scored_with_and_without_their_labels_rank_a_runs_checkpoints_alike(
        labelled, unlabelled, labelled_run, eval_cache):
    """The same pictures with their classes: wherever the classifier trained on them tells two checkpoints of one
    run apart (95% intervals apart), the self-supervised network orders them the same way."""
    data_cfg = data_config(labelled)
    images = load(data_cfg).spec
    assert images.dataset == load(data_config(unlabelled)).spec.dataset  # one self-supervised network for both
    samples = [to_uint8(generate(load_generator(labelled_run / "checkpoints" / f"step_{step:08d}", use_ema=False),
                                 RANKED_SAMPLES, 0)) for step in RANKED_STEPS]
    fds = {}
    for features in ("classifier", "self_supervised"):
        evaluator = Evaluator.for_data(data_cfg, images, eval_cache, features=features)
        fds[features] = [evaluator.fd_interval(images, 100) for images in samples]
    by_classifier, by_itself = fds["classifier"], fds["self_supervised"]
    told_apart = [(a, b) for a, b in itertools.combinations(range(len(RANKED_STEPS)), 2)
                  if max(by_classifier[a]["low"], by_classifier[b]["low"])
                  > min(by_classifier[a]["high"], by_classifier[b]["high"])]
    assert len(told_apart) >= 4, fds  # the run changes enough for the comparison to say something
    for a, b in told_apart:
        assert (by_classifier[a]["fd"] < by_classifier[b]["fd"]) == (by_itself[a]["fd"] < by_itself[b]["fd"]), (
            RANKED_STEPS[a], RANKED_STEPS[b], fds)


@pytest.mark.slow  # the labelled run
def test_the_tools_score_a_run_with_the_feature_network_it_chose_unless_told_otherwise(
        labelled_run, eval_cache, tmp_path, tool_here):
    exported = tmp_path / "export"
    assert tool_here("export", "--checkpoint", labelled_run, "--out", exported).returncode == 0
    assert json.loads((exported / "generator.json").read_text())["features"] == "self_supervised"
    for scored in (labelled_run, exported):
        chosen = json.loads(tool_here("evaluate", "--checkpoint", scored, "--num", 100, "--cache-dir", eval_cache).stdout)
        assert chosen["feature_network"].startswith("a self-supervised network trained on sha256:"), chosen
    told = tool_here("audit", "--checkpoint", exported, "--num", 1, "--cache-dir", eval_cache, "--features", "classifier")
    assert json.loads(told.stdout)["feature_network"].startswith("a classifier trained on sha256:")
