"""Sample-quality metrics on the features of a classifier trained on the data (train/quality/classifier.py).

For a set of generated images against the data's test split (MNIST's 10,000 test images for MNIST):

- `fd`: Fréchet distance between Gaussians fitted to the penultimate features (float64, scipy's
  sqrtm); the MNIST analogue of FID; it falls with the number of samples, so compare FDs of equal
  sample counts (`fd_interval` gives its spread at that count);
- `kid`, `kid_std`: kernel distance (the analogue of KID), unbiased, mean and spread over subsets;
- `precision`, `recall`: k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019, k=3);
- `density`, `coverage`: Naeem et al. 2020 (k=5);
- `classes_present` (digits with at least 1% of the samples), `class_kl` (KL of the predicted-class
  histogram to uniform) and `inception_score` (with the data's classifier instead of Inception);
- per digit (`per_digit`): the generated samples the classifier labels as that digit against the
  test images of that digit: count, FD, recall; for a conditional generator also grouped by the
  digit it was asked for, with `agreement` (the share the classifier labels as asked), and overall
  `label_agreement`.

Images are quantised to uint8 first, exactly as a saved PNG is, so the numbers describe the images
one can look at. Real-set features are cached on disk, keyed by the test set and the classifier.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from train.config import SHIPPED_MNIST, DataConfig
from train.data import sources
from train.data.images import MNIST, MNIST_DATASET, ImageSpec
from train.data.sources import ImageSet
from train.data.readers.idx import read_idx_images, read_idx_labels
from train.errors import DataError
from train.models import GENERATION_CHUNK, balanced_labels, split_like
from train.quality import classifier
from train.storage import tensor_cache

PRECISION_RECALL_K = 3
DENSITY_COVERAGE_K = 5
CLASS_PRESENT_SHARE = 0.01
DISTANCE_CHUNK = 2048
COPY_PERCENTILE = 1.0  # the held-out images' distance percentile below which a sample counts as a copy
MIN_PER_DIGIT = 20  # generated samples of a digit below which its FD and recall are left out
KID_SUBSETS, KID_SUBSET_SIZE = 50, 1000  # subsets of 1000 as torchmetrics and clean-fid; 50 of them (1.4 s on 2 cores)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to uint8 pixels, rounding exactly as torchvision's save_image does for PNGs."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


@dataclass
class Features:
    features: Tensor  # [N, FEATURE_DIM] float32, penultimate layer
    probabilities: Tensor  # [N, 10] softmax of the class logits
    _neighbours: Tensor | None = field(default=None, repr=False)

    def radii(self, k: int) -> Tensor:
        """Each sample's distance to its k-th nearest neighbour in this set. The real set is scored against
        many sample sets, and this is an N x N distance computation: done once, for every k the metrics use."""
        if self._neighbours is None or self._neighbours.shape[1] < k:
            self._neighbours = neighbour_distances(self.features, max(k, PRECISION_RECALL_K, DENSITY_COVERAGE_K))
        return self._neighbours[:, k - 1]


@torch.no_grad()
def extract(network: classifier.FeatureNetwork, images: Tensor, batch_size: int = 1000) -> Features:
    """Features of uint8 images [N, C, H, W] (or [N, H, W] of grey ones), on the network's device."""
    device = next(network.parameters()).device
    images = images.reshape(-1, *network.images.shape)
    features, probabilities = [], []
    for chunk in images.split(batch_size):
        hidden, logits = network(chunk.to(device).float().div(255))
        features.append(hidden.float())
        probabilities.append(logits.float().softmax(1))
    return Features(torch.cat(features), torch.cat(probabilities))


@torch.no_grad()
def generate_sharded(network: torch.nn.Module, count: int, seed: int, accelerator) -> Tensor:
    """`count` uint8 images [count, 1, 28, 28] from latents drawn once from `seed` (and, for a conditional
    generator, the digits in turn: `balanced_labels`), so the sample set does not depend on the number of
    processes: each rank generates its share in eval mode, and all ranks get all of them. A collective."""
    was_training = network.training
    network.eval()
    z = torch.randn(count, network.z_dim, generator=torch.Generator().manual_seed(seed))
    labels = balanced_labels(count, network.num_classes)
    share = -(-count // accelerator.num_processes)
    own = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    padding = share - len(z[own])  # the last rank's share is padded, and the padding dropped after the gather
    z_chunks = torch.nn.functional.pad(z[own], (0, 0, 0, padding)).to(accelerator.device).split(GENERATION_CHUNK)
    if labels is not None:
        labels = torch.nn.functional.pad(labels[own], (0, padding)).to(accelerator.device)
    label_chunks = split_like(labels, z_chunks)
    images = torch.cat([to_uint8(network(*chunk).float()) for chunk in zip(z_chunks, label_chunks)])
    network.train(was_training)
    return accelerator.gather(images)[:count]


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64."""
    return _frechet_distance(gaussian(a), gaussian(b))


def gaussian(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of the rows of x, in float64."""
    x = x.double().cpu().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def _frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    (mu_a, sigma_a), (mu_b, sigma_b) = a, b
    with warnings.catch_warnings():  # a singular product (e.g. one repeated image) is handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(root).all():  # singular product: regularise as pytorch-fid does
        offset = np.eye(len(sigma_a)) * 1e-6
        root = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(root))


def fd_interval(real: Tensor, fake: Tensor, resamples: int, level: float = 0.95, seed: int = 0) -> dict:
    """How much the FD of this many generated samples varies from one draw to another: the FD of `resamples`
    bootstrap resamples of `fake` (with replacement; the real set is fixed), as a percentile interval moved
    by the bootstrap's own bias. Resampling repeats samples, which alone raises the FD (it falls with the
    number of samples), so the raw percentiles would lie above the FD they describe."""
    real_gaussian = gaussian(real)
    full = _frechet_distance(real_gaussian, gaussian(fake))
    generator = torch.Generator().manual_seed(seed)
    values = np.array([_frechet_distance(real_gaussian, gaussian(fake[torch.randint(len(fake), (len(fake),),
                                                                                      generator=generator)]))
                       for _ in range(resamples)])
    bias = values.mean() - full
    low, high = np.percentile(values - bias, [50 * (1 - level), 50 * (1 + level)])
    return {"fd": full, "low": float(low), "high": float(high), "level": level, "resamples": resamples}


def nearest(queries: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """(distance, index) of each row of `queries`' nearest row of `references`, exactly, in chunks."""
    distances, indices = [], []
    for chunk in queries.split(DISTANCE_CHUNK):
        closest = torch.cdist(chunk.float(), references.float()).min(1)
        distances.append(closest.values)
        indices.append(closest.indices)
    return torch.cat(distances), torch.cat(indices)


def copy_threshold(held_out_distances: Tensor) -> float:
    """The distance to the nearest training image below which a sample counts as a copy: the COPY_PERCENTILE-th
    percentile of the held-out images' distances (so about 1% of the images no generator saw count as copies)."""
    return float(np.percentile(held_out_distances.cpu().numpy(), COPY_PERCENTILE))


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 between the two feature sets with the kernel
    (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size` (or fewer) from each set;
    (mean, standard deviation over the subsets). Unlike FD it has no bias from the number of samples.
    Both sets are divided by the real set's root mean square first: this classifier's features are
    several times larger than Inception's, and the cubic kernel of large values is mostly noise."""
    generator = torch.Generator().manual_seed(seed)
    size, dimensions = min(subset_size, len(real), len(fake)), real.shape[1]
    scale = real.double().pow(2).mean().sqrt()
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=generator)[:size]].double() / scale
        y = fake[torch.randperm(len(fake), generator=generator)[:size]].double() / scale
        k_xx, k_yy, k_xy = ((u @ v.T / dimensions + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (size * (size - 1))
        values.append(float(within - 2 * k_xy.mean()))
    return float(np.mean(values)), float(np.std(values))


def neighbour_distances(x: Tensor, k: int) -> Tensor:
    """[N, k]: distances from each row of x to its 1st, 2nd, ... k-th nearest other row."""
    return torch.cat([torch.cdist(chunk, x).topk(k + 1, dim=1, largest=False).values[:, 1:]
                      for chunk in x.split(DISTANCE_CHUNK)])


def kth_neighbour_distance(x: Tensor, k: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    return neighbour_distances(x, k)[:, k - 1]


def _within_balls(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """For each point, how many of the balls B(centre_i, radius_i) contain it."""
    return torch.cat([(torch.cdist(chunk, centres) <= radii[None]).sum(1) for chunk in points.split(DISTANCE_CHUNK)])


def precision_recall(real: Tensor, fake: Tensor, k: int = PRECISION_RECALL_K,
                     real_radii: Tensor | None = None) -> tuple[float, float]:
    real_radii = kth_neighbour_distance(real, k) if real_radii is None else real_radii
    precision = (_within_balls(fake, real, real_radii) > 0).double().mean().item()
    recall = (_within_balls(real, fake, kth_neighbour_distance(fake, k)) > 0).double().mean().item()
    return precision, recall


def density_coverage(real: Tensor, fake: Tensor, k: int = DENSITY_COVERAGE_K,
                     real_radii: Tensor | None = None) -> tuple[float, float]:
    radii = kth_neighbour_distance(real, k) if real_radii is None else real_radii
    density = _within_balls(fake, real, radii).double().sum().item() / (k * len(fake))
    nearest_fake = torch.cat([torch.cdist(chunk, fake).min(1).values for chunk in real.split(DISTANCE_CHUNK)])
    coverage = (nearest_fake < radii).double().mean().item()
    return density, coverage


def class_statistics(probabilities: Tensor) -> dict[str, float]:
    probabilities = probabilities.cpu()
    num_classes = probabilities.shape[1]
    histogram = torch.bincount(probabilities.argmax(1), minlength=num_classes).double() / len(probabilities)
    p_y_given_x = probabilities.double()
    p_y = p_y_given_x.mean(0)
    xlogy = torch.special.xlogy  # 0 log 0 = 0
    per_sample_kl = (xlogy(p_y_given_x, p_y_given_x) - xlogy(p_y_given_x, p_y)).sum(1)
    return {
        "classes_present": int((histogram >= CLASS_PRESENT_SHARE).sum()),
        "class_kl": float(xlogy(histogram, histogram * num_classes).sum()),
        "inception_score": float(math.exp(per_sample_kl.mean())),
    }


def compare(real: Features, fake: Features) -> dict[str, float]:
    precision, recall = precision_recall(real.features, fake.features, real_radii=real.radii(PRECISION_RECALL_K))
    density, coverage = density_coverage(real.features, fake.features, real_radii=real.radii(DENSITY_COVERAGE_K))
    kid, kid_std = kernel_inception_distance(real.features, fake.features)
    return {"fd": frechet_distance(real.features, fake.features), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall, "density": density, "coverage": coverage,
            **class_statistics(fake.probabilities)}


def per_digit(real: Features, real_labels: Tensor, fake: Features, asked: Tensor | None = None
              ) -> dict[int, dict[str, float]]:
    """Each digit's generated samples against the test images of that digit: their count, and where there are
    at least MIN_PER_DIGIT of them (and more test images than k) their FD and recall, which show the digits a generator makes badly or misses.
    The samples are grouped by the classifier's label, or by `asked`, the labels a conditional generator was
    given; then each digit also has `agreement`, the share of its samples the classifier labels as asked."""
    predicted, real_labels = fake.probabilities.argmax(1), real_labels.to(real.features.device)
    groups = predicted if asked is None else asked.to(predicted.device)
    digits = {}
    for digit in range(fake.probabilities.shape[1]):
        chosen = groups == digit
        generated = fake.features[chosen]
        digits[digit] = {"count": len(generated)}
        if asked is not None and len(generated):
            digits[digit]["agreement"] = (predicted[chosen] == digit).double().mean().item()
        own = real.features[real_labels == digit]
        if len(generated) >= MIN_PER_DIGIT and len(own) > PRECISION_RECALL_K:  # a recall needs k+1 real images
            digits[digit] |= {"fd": frechet_distance(own, generated), "recall": precision_recall(own, generated)[1]}
    return digits


def _labelled_split(data_cfg: DataConfig, split: str, problem: str) -> ImageSet:
    """`split` of the data with its labels, or a DataError saying `problem`, its "{error}" the reader's error."""
    try:
        return sources.load(data_cfg, split, labelled=True)
    except DataError as error:
        raise DataError(problem.replace("{error}", str(error))) from None


class Evaluator:
    """A feature network and the cached features of a test set it describes, ready to score samples."""

    @classmethod
    def for_data(cls, data_cfg: DataConfig, images: ImageSpec, cache_dir: Path,
                 device: torch.device | str = "cpu") -> Evaluator:
        """The evaluator of the data `images` describes, read from `data_cfg`: MNIST's committed classifier and test
        set for MNIST's images, whichever source gave them; for other labelled data, a feature network trained on its
        own training split (`classifier.for_data`) and its own test split. Refused by name where that data is not at
        `data_cfg` or has no labels or no test split: a run is never scored against another data set."""
        if images.dataset == MNIST_DATASET:
            return cls.mnist(SHIPPED_MNIST, cache_dir, device)
        where = f"data.source={data_cfg.source} data.path={data_cfg.path!r}"
        if not images.num_classes:
            raise DataError(f"{where} is unlabelled, and the quality metrics need a feature network trained on the "
                            "data's own labelled images (no pretrained one is downloaded): give the data labels (class "
                            "subfolders, a label column) or train without the metrics (eval.num_samples=0)")
        elsewhere = "point data.path (train.evaluate's --data-path) at the data the generator was trained on"
        training = _labelled_split(data_cfg, "train", f"the quality metrics read the {images.describe()} the "
                                   f"generator was trained on, and {where} gives no such data ({{error}}): {elsewhere}")
        if training.spec.dataset != images.dataset:
            raise DataError(f"{where} holds {training.spec.describe()}, not the {images.describe()} to be scored; "
                            f"{elsewhere}")
        test = _labelled_split(data_cfg, "test", "the quality metrics score samples against the data's test split, "
                               "and it could not be read: {error}; or hold out part of the training images as one "
                               "(data.holdout, e.g. 0.1), or train without the metrics (eval.num_samples=0)")
        if test.spec.shape != images.shape:
            raise DataError(f"{where}: its test split holds {test.spec.describe()}, its training split "
                            f"{images.describe()}; give both splits images of one shape")
        if len(test.images) <= (least := max(PRECISION_RECALL_K, DENSITY_COVERAGE_K)):
            raise DataError(f"{where}: its test split holds {len(test.images)} images, and the neighbour metrics "
                            f"(precision/recall with k={PRECISION_RECALL_K}, density/coverage with "
                            f"k={DENSITY_COVERAGE_K}) need more than {least}: give it more images (or raise "
                            f"data.holdout, {data_cfg.holdout} now, where it is held out of the training split), or "
                            "train without the metrics (eval.num_samples=0)")
        network, digest = classifier.for_data(training, cache_dir, device)
        against = f"the test split of {images.dataset}"
        if sources.holds_out(data_cfg, images):
            against = (f"{len(test.images)} images held out of the training split (data.holdout={data_cfg.holdout}, "
                       f"never trained on) of {images.dataset}")
        return cls(network, digest, test, lambda: training.images, cache_dir, against)

    @classmethod
    def mnist(cls, data_dir: Path, cache_dir: Path, device: torch.device | str = "cpu") -> Evaluator:
        """MNIST's committed classifier and the test set in the IDX folder `data_dir`."""
        data_dir = Path(data_dir)
        test = ImageSet(read_idx_images(data_dir, "test")[:, None], read_idx_labels(data_dir, "test").long(), MNIST)
        return cls(classifier.load(device), classifier.WEIGHTS_SHA256, test,
                   lambda: read_idx_images(data_dir, "train")[:, None], cache_dir, "MNIST's test set")

    def __init__(self, network: classifier.FeatureNetwork, network_sha256: str, test: ImageSet,
                 training_images: Callable[[], Tensor], cache_dir: Path, against: str):
        """`test`: the labelled images samples are scored against, described by `against` in reports;
        `training_images`: reads the training images, for the floor."""
        self.network, self.against = network, against
        self.test_images, self.real_labels = test.images, test.labels
        self._training_images = training_images
        self._network_sha256, self._cache_dir = network_sha256, Path(cache_dir)
        self._training_features: Tensor | None = None  # read on first use (the copy rate)
        self._copy_threshold: float | None = None
        self.real = self._cached_features(test.images, "test")

    def score(self, images: Tensor) -> dict[str, float]:
        """Metrics of uint8 images [N, C, H, W] against the test set."""
        return compare(self.real, extract(self.network, images))

    def report(self, images: Tensor, asked: Tensor | None = None, bootstrap: int = 0, seed: int = 0,
               copy_rate: bool = False) -> dict[str, dict]:
        """`score`'s metrics and `per_digit`'s, from one pass of the feature network: {"against", "metrics",
        "per_digit"}; with `asked` (a conditional generator's labels) also "per_asked_digit" and metrics'
        "label_agreement"; with `bootstrap` resamples also "fd_interval" (`fd_interval`, seeded by `seed`); with
        `copy_rate` also metrics' "copy_rate" (`copy_rate`)."""
        fake = extract(self.network, images)
        report = {"against": self.against, "metrics": compare(self.real, fake),
                  "per_digit": per_digit(self.real, self.real_labels, fake)}
        if asked is not None:
            predicted = fake.probabilities.argmax(1).cpu()
            report["metrics"]["label_agreement"] = (predicted == asked.cpu()).double().mean().item()
            report["per_asked_digit"] = per_digit(self.real, self.real_labels, fake, asked)
        if bootstrap:
            report["fd_interval"] = fd_interval(self.real.features, fake.features, bootstrap, seed=seed)
        if copy_rate:
            report["metrics"]["copy_rate"] = self.copy_rate(fake.features)
        return report

    def copy_rate(self, features: Tensor) -> float:
        """The share of samples (their `features`) nearer a training image, in features, than all but
        COPY_PERCENTILE% of the held-out test images are: about 1% where nothing is copied (train/audit.py has the
        full audit, in pixels too)."""
        if self._copy_threshold is None:
            self._copy_threshold = copy_threshold(nearest(self.real.features, self.training_features())[0])
        distances = nearest(features, self.training_features())[0]
        return (distances < self._copy_threshold).double().mean().item()

    def training_features(self) -> Tensor:
        """The feature network's features of every training image: read once, cached in cache_dir by content."""
        if self._training_features is None:
            self._training_features = self._cached_features(self._training_images(), "training").features
        return self._training_features

    def test_accuracy(self) -> float:
        """The share of the test images the feature network labels correctly: how well its features know the data."""
        predicted = self.real.probabilities.argmax(1).cpu()
        return (predicted == self.real_labels.cpu()).double().mean().item()

    def fd_interval(self, images: Tensor, resamples: int, seed: int = 0) -> dict:
        """The FD of uint8 images against the test set, with its bootstrap interval (`fd_interval`)."""
        return fd_interval(self.real.features, extract(self.network, images).features, resamples, seed=seed)

    def training_set_floor(self, num: int, seed: int = 0) -> dict[str, float]:
        """The same metrics for `num` real training images: what a perfect generator would reach."""
        return self.score(self.training_images(num, seed))

    def degraded_training_sets(self, num: int, seed: int = 0) -> dict[str, dict[str, float]]:
        """The metrics of the floor's images after small, visible defects: a scale to read a generator's against."""
        images = self.training_images(num, seed).float().div(255)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        binomial = torch.tensor([1.0, 2.0, 1.0])
        blur = (binomial[:, None] * binomial[None] / 16)[None, None]
        degraded = {
            "noise_0.05": images + 0.05 * noise,
            "noise_0.1": images + 0.1 * noise,
            "shifted_1px": torch.roll(images, 1, dims=-1),
            "blurred_3x3": torch.nn.functional.conv2d(images.flatten(0, 1)[:, None], blur, padding=1).view_as(images),
        }
        return {name: self.score(to_uint8(batch.clamp(0, 1))) for name, batch in degraded.items()}

    def training_images(self, num: int, seed: int) -> Tensor:
        """`num` real training images, chosen at random by `seed`: the floor's sample set."""
        images = self._training_images()
        return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]]

    def _cached_features(self, images: Tensor, split: str) -> Features:
        """The features of `images` (the data's `split`: test or training), cached in cache_dir by the images' and
        the feature network's content."""
        key = hashlib.sha256(images.numpy().tobytes() + self._network_sha256.encode()).hexdigest()[:16]
        path = self._cache_dir / f"{split}_features_{key}.safetensors"
        what = f"{split}-set features"
        device = str(next(self.network.parameters()).device)
        cached = tensor_cache.read(path, what, needed=("features", "probabilities"))
        if cached is not None:
            return Features(cached["features"].to(device), cached["probabilities"].to(device))
        real = extract(self.network, images)
        tensor_cache.write(path, {"features": real.features, "probabilities": real.probabilities}, what)
        return real
