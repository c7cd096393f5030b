"""Sample-quality metrics on the features of a feature network: a classifier trained on the data (classifier.py), a
self-supervised network trained on it (contrastive.py), or Inception-v3 (inception.py; `fd` is then the FID).

For a set of generated images against the data's test split (MNIST's 10,000 test images for MNIST):

- `fd`: Fréchet distance between Gaussians fitted to the penultimate features (float64, through scipy's
  symmetric eigendecompositions); the MNIST analogue of FID; it falls with the number of samples, so compare
  FDs of equal sample counts (`fd_interval` gives its spread at that count);
- `kid`, `kid_std`: kernel distance (the analogue of KID), unbiased, mean and spread over subsets;
- `precision`, `recall`: k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019, k=3);
- `density`, `coverage`: Naeem et al. 2020 (k=5);
- where the network classifies, `classes_present` (digits with at least 1% of the samples), `class_kl` (KL of
  the predicted-class histogram to uniform) and `inception_score` (with the data's classifier instead of Inception);
- per digit (`per_digit`): the generated samples the classifier labels as that digit against the
  test images of that digit: count, FD, recall; for a conditional generator also grouped by the
  digit it was asked for, with `agreement` (the share the classifier labels as asked), and overall
  `label_agreement`.

Images are quantised to uint8 first (`models.to_uint8`), exactly as a saved PNG is, so the numbers describe
the images one can look at. train/quality/evaluator.py holds a data set's network and cached test features and
reports these; train/quality/reported.py declares which of them a run reports.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

PRECISION_RECALL_K = 3
DENSITY_COVERAGE_K = 5
CLASS_PRESENT_SHARE = 0.01
DISTANCE_CHUNK = 2048
COPY_PERCENTILE = 1.0  # the held-out images' distance percentile below which a sample counts as a copy
MIN_PER_DIGIT = 20  # generated samples of a digit below which its FD and recall are left out
KID_SUBSETS, KID_SUBSET_SIZE = 50, 1000  # subsets of 1000 as torchmetrics and clean-fid; 50 of them (1.4 s on 2 cores)


@dataclass
class Features:
    features: Tensor  # [N, FEATURE_DIM] float32, penultimate layer
    probabilities: Tensor | None = None  # [N, classes] softmax of the class logits; None from a network that does
    # not classify (a self-supervised one)
    _neighbours: Tensor | None = field(default=None, repr=False)
    _gaussian: Gaussian | None = field(default=None, repr=False)

    def gaussian(self) -> Gaussian:
        """The Gaussian of these features, kept: the real set's is compared with every sample set."""
        if self._gaussian is None:
            self._gaussian = Gaussian.of(self.features)
        return self._gaussian

    def radii(self, k: int) -> Tensor:
        """Each sample's distance to its k-th nearest neighbour in this set. The real set is scored against
        many sample sets, and this is an N x N distance computation: done once, for every k the metrics use."""
        if self._neighbours is None or self._neighbours.shape[1] < k:
            self._neighbours = neighbour_distances(self.features, max(k, PRECISION_RECALL_K, DENSITY_COVERAGE_K))
        return self._neighbours[:, k - 1]


# Images per forward pass of a feature network: a batch's activations stay in a CPU core's caches. On a 2-core EPYC,
# MNIST's 60,000 training images took 37 s at 128 against 74 s at 1000 on one thread, 18 s against 41 s on two,
# and gave the same features to the bit.
EXTRACTION_BATCH = 128


@torch.no_grad()
def extract(network: torch.nn.Module, images: Tensor, batch_size: int = EXTRACTION_BATCH) -> Features:
    """Features of uint8 images [N, C, H, W] (or [N, H, W] of grey ones), on the network's device, from a feature
    network (classifier.py, contrastive.py, inception.py); class probabilities where the network classifies."""
    device = next(network.parameters()).device
    images = images.reshape(-1, *network.images.shape)
    features, probabilities = [], []
    for chunk in images.split(batch_size):
        hidden, head = network(chunk.to(device).float().div(255))
        features.append(hidden.float())
        if network.classifies:
            probabilities.append(head.float().softmax(1))
    return Features(torch.cat(features), torch.cat(probabilities) if network.classifies else None)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64."""
    return Gaussian.of(a).frechet_distance(Gaussian.of(b))


@dataclass(eq=False)
class Gaussian:
    """The mean and covariance (float64) of a set's features: what the Fréchet distance compares."""

    mean: np.ndarray
    covariance: np.ndarray

    @classmethod
    def of(cls, x: Tensor) -> Gaussian:
        x = x.double().cpu().numpy()
        return cls(x.mean(0), np.cov(x, rowvar=False))

    @functools.cached_property
    def root(self) -> np.ndarray:
        """The covariance's symmetric square root, kept: the real set is compared with many sample sets."""
        values, vectors = scipy.linalg.eigh(self.covariance)
        return (vectors * np.sqrt(values.clip(0))) @ vectors.T

    def frechet_distance(self, other: Gaussian) -> float:
        """Tr (S_a S_b)^1/2 as the sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, the same
        number: a symmetric matrix's eigenvalues are real, and where a covariance is singular (repeated images)
        only rounding makes one negative (clipped to 0). Faster than scipy's sqrtm of S_a S_b, most on Inception's
        2048 features (docs/performance.md)."""
        inner = scipy.linalg.eigvalsh(self.root @ other.covariance @ self.root).clip(0)
        return float(((self.mean - other.mean) ** 2).sum() + np.trace(self.covariance) + np.trace(other.covariance)
                     - 2 * np.sqrt(inner).sum())


def fd_interval(real: Features, fake: Features, resamples: int, level: float = 0.95, seed: int = 0) -> dict:
    """How much the FD of this many generated samples varies from one draw to another: the FD of `resamples`
    bootstrap resamples of `fake` (with replacement; the real set is fixed), as a percentile interval moved
    by the bootstrap's own bias. Resampling repeats samples, which alone raises the FD (it falls with the
    number of samples), so the raw percentiles would lie above the FD they describe. Both sets' Gaussians are
    the ones they keep: an evaluation has fitted them for its FD already."""
    reference, samples = real.gaussian(), fake.features
    full = reference.frechet_distance(fake.gaussian())
    generator = torch.Generator().manual_seed(seed)
    values = np.array([reference.frechet_distance(Gaussian.of(samples[torch.randint(len(samples), (len(samples),),
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
    return {"fd": real.gaussian().frechet_distance(fake.gaussian()), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall, "density": density, "coverage": coverage,
            **(class_statistics(fake.probabilities) if fake.probabilities is not None else {})}


def per_digit(real: Features, real_labels: Tensor, fake: Features, asked: Tensor | None = None
              ) -> dict[int, dict[str, float]]:
    """Each digit's generated samples against the test images of that digit: their count, and where there are
    at least MIN_PER_DIGIT of them (and more test images than k) their FD and recall, which show the digits a
    generator makes badly or misses.
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
