"""The quality metrics: exact on small cases, symmetric where they should be, and ordering sets sensibly."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from train.models import to_uint8
from train.quality import metrics
from train.quality.evaluator import Evaluator
from train.storage import tensor_cache

FD_TOLERANCE = 1e-6  # float64 arithmetic on float32 features
EXACT = 1e-12


def random_features(n, dim=8, seed=0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator) + shift


def direct_fd(a, b):
    """Fréchet distance as its formula is written, Tr((S_a S_b)^1/2) through scipy's general matrix square root
    (pytorch-fid's way; the metrics take the symmetric form's eigenvalues instead)."""
    a, b = a.double().numpy(), b.double().numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(root)


def direct_knn_metrics(real, fake, k_pr, k_dc):
    real, fake = real.double().numpy(), fake.double().numpy()
    rr = np.linalg.norm(real[:, None] - real[None], axis=2)
    ff = np.linalg.norm(fake[:, None] - fake[None], axis=2)
    fr = np.linalg.norm(fake[:, None] - real[None], axis=2)  # [fake, real]
    radius = lambda d, k: np.sort(d, axis=1)[:, k]  # index 0 is the point itself
    r_real, r_fake, r_real_dc = radius(rr, k_pr), radius(ff, k_pr), radius(rr, k_dc)
    precision = np.mean([any(fr[j, i] <= r_real[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(fr[j, i] <= r_fake[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum(fr[j, i] <= r_real_dc[i] for j in range(len(fake)) for i in range(len(real))) / (k_dc * len(fake))
    coverage = np.mean([fr[:, i].min() < r_real_dc[i] for i in range(len(real))])
    return precision, recall, density, coverage


def test_fd_matches_a_direct_computation_and_is_symmetric():
    a, b = random_features(300, seed=1), random_features(200, seed=2, shift=0.5)
    assert math.isclose(metrics.frechet_distance(a, b), direct_fd(a, b), rel_tol=FD_TOLERANCE)
    assert math.isclose(metrics.frechet_distance(a, b), metrics.frechet_distance(b, a), rel_tol=FD_TOLERANCE)
    assert abs(metrics.frechet_distance(a, a)) < FD_TOLERANCE
    assert metrics.frechet_distance(a, random_features(300, seed=3, shift=2.0)) > metrics.frechet_distance(a, b)


def test_fd_against_one_repeated_image_is_the_distance_to_it_plus_the_spread():
    """A generator that draws one image over and over: its covariance is 0 (singular), and the FD is exactly
    ||mu_a - x||^2 + Tr S_a, where a matrix square root of the singular product can come out complex or NaN."""
    a = random_features(300, seed=1)
    point = random_features(1, seed=2, shift=0.5)
    expected = ((a.double().mean(0) - point.double()[0]) ** 2).sum() + np.trace(np.cov(a.double().numpy(),
                                                                                        rowvar=False))
    for fd in (metrics.frechet_distance(a, point.repeat(50, 1)), metrics.frechet_distance(point.repeat(50, 1), a)):
        assert math.isclose(fd, float(expected), rel_tol=FD_TOLERANCE)


def test_knn_metrics_match_a_direct_computation():
    real, fake = random_features(120, seed=4), random_features(90, seed=5, shift=0.7)
    precision, recall = metrics.precision_recall(real, fake, k=3)
    density, coverage = metrics.density_coverage(real, fake, k=5)
    expected = direct_knn_metrics(real, fake, 3, 5)
    assert (precision, recall, density, coverage) == pytest.approx(expected, abs=EXACT)


def test_knn_metrics_on_identical_and_swapped_sets():
    a, b = random_features(200, seed=6), random_features(150, seed=7, shift=1.0)
    assert metrics.precision_recall(a, a) == (1.0, 1.0)
    assert metrics.density_coverage(a, a)[1] == 1.0
    precision_ab, recall_ab = metrics.precision_recall(a, b)
    precision_ba, recall_ba = metrics.precision_recall(b, a)
    assert (precision_ab, recall_ab) == (recall_ba, precision_ba)


KID_NEAR_ZERO = 0.15  # of the KID of the smallest shift below: subsets of one set overlap, so not exactly 0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_distance():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 32, generator=generator)
    shifted = [metrics.kernel_inception_distance(real, torch.randn(3000, 32, generator=generator) + shift)[0]
               for shift in (0.1, 0.2, 0.4)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    for same in (real.clone(), torch.randn(3000, 32, generator=generator)):
        assert abs(metrics.kernel_inception_distance(real, same)[0]) < KID_NEAR_ZERO * shifted[0]


class Features(torch.nn.Module):
    """A 'feature network' for torchmetrics that hands back what it is given: our features go in as they are."""

    def __init__(self, dimensions: int):
        super().__init__()
        self.num_features = dimensions

    def forward(self, features):
        return features


@pytest.mark.slow  # importing torchmetrics takes seconds
@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_fd_and_kid_agree_with_torchmetrics_on_the_same_features():
    """torchmetrics' FID and KID take a custom feature network; on the same features they compute the same numbers.
    KID with one subset of every sample (the subsets are random in both, drawn differently); ours divides the
    features by the real set's RMS first, so they are handed over divided."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    real, fake = random_features(600, dim=16, seed=1).double(), random_features(600, dim=16, seed=2, shift=0.3).double()
    fid = FrechetInceptionDistance(feature=Features(16))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert metrics.frechet_distance(real, fake) == pytest.approx(fid.compute().item(), rel=FD_TOLERANCE)
    scale = real.pow(2).mean().sqrt()
    kid = KernelInceptionDistance(feature=Features(16), subsets=1, subset_size=600)
    kid.update(real / scale, real=True)
    kid.update(fake / scale, real=False)
    ours, _ = metrics.kernel_inception_distance(real, fake, subsets=1, subset_size=600)
    assert ours == pytest.approx(kid.compute()[0].item(), rel=EXACT)


def test_the_fd_interval_contains_the_fd_and_narrows_with_more_samples():
    """Resampling alone raises the FD (it is biased by the sample count); the interval is moved back by that
    bias, so it describes the spread of the FD actually measured."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(5000, 32, generator=generator)
    samples = (metrics.Features(torch.randn(n, 32, generator=generator) * 1.1) for n in (500, 2000))
    few, many = (metrics.fd_interval(metrics.Features(real), fake, resamples=200) for fake in samples)
    for interval in (few, many):
        assert interval["low"] <= interval["fd"] <= interval["high"]
    assert many["high"] - many["low"] < 0.75 * (few["high"] - few["low"])  # 4x the samples: about half as wide


def test_class_statistics():
    one_class = torch.nn.functional.one_hot(torch.full((100,), 3), 10).float()
    stats = metrics.class_statistics(one_class)
    assert stats["classes_present"] == 1
    assert stats["class_kl"] == pytest.approx(math.log(10), abs=EXACT)
    assert stats["inception_score"] == pytest.approx(1.0, abs=1e-9)
    balanced = torch.nn.functional.one_hot(torch.arange(100) % 10, 10).float()
    stats = metrics.class_statistics(balanced)
    assert stats["classes_present"] == 10
    assert stats["class_kl"] == pytest.approx(0.0, abs=EXACT)
    assert stats["inception_score"] == pytest.approx(10.0, rel=1e-9)


def test_sqrtm_reference_is_the_one_scipy_gives():
    matrix = np.cov(random_features(50, seed=8).double().numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(matrix @ matrix)
    np.testing.assert_allclose(root.real, matrix, atol=1e-8)


# ------------------------------------------------------------- with the project's feature network


@pytest.fixture(scope="module")
def evaluator(eval_cache):
    from train.config import SHIPPED_MNIST
    return Evaluator.mnist(SHIPPED_MNIST, eval_cache)


def test_the_committed_feature_network_is_over_99_percent_accurate(evaluator):
    from train.config import SHIPPED_MNIST
    from train.data.readers.idx import read_idx_labels
    # The real set's class probabilities are the network's own on the 10,000 test images.
    assert evaluator.real.probabilities.shape == (10000, 10)
    accuracy = (evaluator.real.probabilities.argmax(1) == read_idx_labels(SHIPPED_MNIST, "test")).double().mean()
    assert accuracy >= 0.99


def test_a_tampered_feature_network_is_refused(tmp_path, monkeypatch):
    from train.quality import classifier
    tampered = tmp_path / "weights.safetensors"
    tampered.write_bytes(classifier.WEIGHTS.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(classifier, "WEIGHTS", tampered)
    with pytest.raises(RuntimeError, match="expected dcae57"):
        classifier.load()


def test_real_features_are_cached_on_disk_and_reused(tmp_path):
    from conftest import write_idx_images, write_idx_labels
    from train.config import SHIPPED_MNIST
    from train.data.readers.idx import read_idx_images, read_idx_labels
    test_images, test_labels = read_idx_images(SHIPPED_MNIST, "test"), read_idx_labels(SHIPPED_MNIST, "test")
    data, other_data = tmp_path / "data", tmp_path / "other_data"
    for folder, chosen in ((data, slice(0, 100)), (other_data, slice(100, 200))):
        folder.mkdir()
        write_idx_images(folder, "test", test_images[chosen])
        write_idx_labels(folder, "test", test_labels[chosen])
    cache = tmp_path / "cache"
    first = Evaluator.mnist(data, cache)
    (cached,) = cache.glob("*.safetensors")
    assert first.real.features.shape == (100, 128)
    stamp = cached.stat().st_mtime_ns
    again = Evaluator.mnist(data, cache)
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten
    assert torch.equal(again.real.features, first.real.features)
    other = Evaluator.mnist(other_data, cache)  # another test set: its own entry, not the first one's
    assert len(list(cache.glob("*.safetensors"))) == 2 and not torch.equal(other.real.features, first.real.features)


def test_a_damaged_or_edited_features_cache_is_extracted_again_and_an_unwritable_one_is_a_warning(tmp_path):
    """Before: a cut-short cache ended in a traceback, edited features were scored against unchecked, a cache without
    the probabilities (as an earlier version wrote the training set's) ended the run at its first evaluation with a
    KeyError, and an eval.cache_dir that is a file ended in a traceback."""
    from conftest import write_idx_images, write_idx_labels
    from safetensors import safe_open
    from safetensors.torch import save_file
    from train.config import SHIPPED_MNIST
    from train.data.readers.idx import read_idx_images, read_idx_labels
    write_idx_images(tmp_path, "test", read_idx_images(SHIPPED_MNIST, "test")[:100])
    write_idx_labels(tmp_path, "test", read_idx_labels(SHIPPED_MNIST, "test")[:100])
    cache = tmp_path / "cache"
    truth = Evaluator.mnist(tmp_path, cache).real.features
    (cached,) = cache.glob("*.safetensors")
    whole = cached.read_bytes()
    with safe_open(cached, framework="pt") as file:
        tensors, metadata = {name: file.get_tensor(name).clone() for name in file.keys()}, file.metadata()
    scaled = tensors | {"features": tensors["features"] * 1.5}
    older = {"features": tensors["features"]}  # a whole, checked cache of another version, without the rest
    for damage in (lambda: cached.write_bytes(whole[:len(whole) // 2]),
                   lambda: save_file(scaled, cached, metadata=metadata),
                   lambda: save_file(older, cached, metadata={"sha256": tensor_cache.tensors_sha256(older)})):
        damage()
        with pytest.warns(UserWarning, match=f"not using the cached test-set features {cached}: .*; computing them "
                                             "again"):
            assert torch.equal(Evaluator.mnist(tmp_path, cache).real.features, truth)
        assert cached.read_bytes() == whole
    with pytest.warns(UserWarning, match="could not cache the test-set features in .*File exists"):
        assert torch.equal(Evaluator.mnist(tmp_path, cached).real.features, truth)


@pytest.mark.slow
def test_worse_sample_sets_score_worse(evaluator):
    from train.config import SHIPPED_MNIST
    from train.data.readers.idx import read_idx_images
    train_images = read_idx_images(SHIPPED_MNIST, "train")
    real = train_images[torch.randperm(60000, generator=torch.Generator().manual_seed(1))[:2000]]
    blurred = torch.nn.functional.avg_pool2d(real.float().unsqueeze(1), 5, 1, 2).round().to(torch.uint8).squeeze(1)
    noise = torch.randint(0, 256, (2000, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    one_digit = real[:1].expand(2000, 28, 28)
    scores = {name: evaluator.score(images) for name, images in
              (("real", real), ("blurred", blurred), ("noise", noise), ("one", one_digit))}
    assert scores["real"]["fd"] < scores["blurred"]["fd"] < scores["noise"]["fd"]
    assert scores["real"]["precision"] > 0.8 and scores["real"]["recall"] > 0.8
    assert scores["real"]["classes_present"] == 10 and scores["real"]["class_kl"] < 0.01
    assert scores["noise"]["precision"] < 0.05 and scores["noise"]["coverage"] < 0.05
    assert scores["one"]["classes_present"] == 1 and scores["one"]["recall"] < 0.05
    assert scores["one"]["coverage"] < scores["real"]["coverage"] / 10
    assert scores["real"]["inception_score"] > 9 and scores["one"]["inception_score"] < 1.1


@pytest.mark.slow
def test_degraded_training_images_score_worse_than_the_floor(evaluator):
    floor = evaluator.training_set_floor(2000, seed=3)
    degraded = evaluator.degraded_training_sets(2000, seed=3)
    assert list(degraded) == ["noise_0.05", "noise_0.1", "shifted_1px", "blurred_3x3"]
    # Noise grows the distance with its size; a blur, which keeps every digit legible, is far off the floor.
    assert floor["fd"] < degraded["noise_0.05"]["fd"] < degraded["noise_0.1"]["fd"]
    assert degraded["shifted_1px"]["fd"] > 3 * floor["fd"] and degraded["blurred_3x3"]["fd"] > 10 * floor["fd"]
    assert all(scores["classes_present"] == 10 for scores in degraded.values())


PER_DIGIT_RECALL = 0.5  # real images of a digit cover at least this much of that digit's test images


@pytest.mark.slow
def test_per_digit_quality_shows_the_digit_that_is_missing_and_the_one_that_is_blurred(evaluator):
    from train.config import SHIPPED_MNIST
    from train.data.readers.idx import read_idx_images, read_idx_labels
    images, labels = read_idx_images(SHIPPED_MNIST, "train")[:3000], read_idx_labels(SHIPPED_MNIST, "train")[:3000]
    digits = evaluator.report(images[labels != 7])["per_digit"]
    assert digits[7]["count"] < metrics.MIN_PER_DIGIT and set(digits[7]) == {"count"}  # a mislabelled few at most
    assert all(digits[d]["recall"] > PER_DIGIT_RECALL for d in range(10) if d != 7)
    binomial = torch.tensor([1.0, 2.0, 1.0])
    blur = (binomial[:, None] * binomial[None] / 16)[None, None]
    blurred = images.clone()
    threes = images[labels == 3].float().div(255).unsqueeze(1)
    blurred[labels == 3] = to_uint8(torch.nn.functional.conv2d(threes, blur, padding=1).squeeze(1))
    digits = evaluator.report(blurred)["per_digit"]
    assert max(range(10), key=lambda d: digits[d].get("fd", 0)) == 3


def test_scoring_with_the_real_sets_cached_neighbour_distances_gives_the_same_numbers():
    real = metrics.Features(random_features(150, seed=9), torch.full((150, 10), 0.1))
    fake = metrics.Features(random_features(120, seed=10, shift=0.4), torch.full((120, 10), 0.1))
    first, second = metrics.compare(real, fake), metrics.compare(real, fake)  # the second reuses the radii
    assert real._neighbours.shape == (150, max(metrics.PRECISION_RECALL_K, metrics.DENSITY_COVERAGE_K))
    precision, recall = metrics.precision_recall(real.features, fake.features)
    density, coverage = metrics.density_coverage(real.features, fake.features)
    assert first == second
    assert (first["precision"], first["recall"], first["density"], first["coverage"]) == \
        (precision, recall, density, coverage)


def test_a_test_split_too_small_for_the_neighbour_metrics_is_refused_before_any_work(tmp_path):
    """28 pictures of two classes, 3 held out (data.holdout=0.1): refused before a feature network is trained, not
    a k-nearest-neighbour crash after the run."""
    from PIL import Image

    from train.config import DataConfig
    from train.data.sources import load
    from train.errors import DataError
    for index in range(28):
        folder = tmp_path / "data" / "ab"[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((28, 28), 9 * index, np.uint8)).save(folder / f"{index}.png")
    data = DataConfig(source="folder", path=str(tmp_path / "data"), cache_dir=str(tmp_path / "decoded"), holdout=0.1)
    images = load(data, labelled=True).spec
    with pytest.raises(DataError, match=r"its test split holds 3 images, and the neighbour metrics .*need more than 5.*"
                                        r"raise data.holdout, 0.1 now"):
        Evaluator.for_data(data, images, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_a_digit_with_too_few_test_images_has_no_recall_instead_of_a_crash():
    real = metrics.Features(random_features(40), torch.eye(2)[torch.tensor([0] * 38 + [1] * 2)].float())
    fake = metrics.Features(random_features(60, seed=1), torch.eye(2)[torch.tensor([0] * 30 + [1] * 30)].float())
    digits = metrics.per_digit(real, real.probabilities.argmax(1), fake)
    assert "recall" in digits[0] and "recall" not in digits[1] and digits[1]["count"] == 30


def test_the_metrics_an_evaluator_reports_are_exactly_the_declared_ones_and_the_card_and_curves_read_that_table(
        evaluator, eval_cache):
    """A metric is declared once (train/quality/reported.py): name, card label, which way is better, its panel, when
    it is measured. One computed but not declared, or declared but not computed, fails here."""
    from train.plots import PANELS
    from train.quality import reported
    from train.data.sources import ImageSet
    from train.quality import classifier
    images = evaluator.training_images(200, 0)
    assert set(evaluator.score(images)) == set(reported.measured())
    assert set(evaluator.report(images)["metrics"]) == set(reported.measured())
    # The copy rate against 2,000 of the training images: the same report, without a minute of extracting 60,000.
    test = ImageSet(evaluator.test_images, evaluator.real_labels, evaluator.network.images)
    fewer = Evaluator(evaluator.network, classifier.WEIGHTS_SHA256, test, lambda: evaluator.training_images(2000, 1),
                      eval_cache, evaluator.against, evaluator.feature_network)
    conditional = fewer.report(images, asked=torch.zeros(200, dtype=torch.long), copy_rate=True)
    assert set(conditional["metrics"]) == set(reported.measured(conditional=True, copy_rate=True))
    assert len({m.key for m in reported.METRICS}) == len(reported.METRICS)
    assert all(m.better in ("lower", "higher", None) and m.when in (
        reported.ALWAYS, reported.CLASSES, reported.CONDITIONAL, reported.COPY_RATE) for m in reported.METRICS)
    drawn = [key for _, keys in PANELS for key in keys if key.startswith("eval/")]
    assert drawn == [m.logged for m in reported.METRICS if m.panel]


def test_the_design_docs_table_says_of_each_reported_metric_which_way_is_better():
    import re
    from pathlib import Path

    from train.quality import reported
    table = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    for metric in reported.METRICS:
        row = re.search(rf"^\| [^|]*`{metric.key}`[^|]* \|[^|]*\| ([^|]*)\|$", table, re.M)
        assert row is not None, f"docs/design.md's metric table has no row for {metric.key}"
        assert row.group(1).strip().split()[0] == (metric.better or "—"), metric.key
