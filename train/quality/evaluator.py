"""An evaluator: a data set's feature network and the cached features of the test set it scores samples against,
reporting the metrics of train/quality/metrics.py; and the evaluation's sample set, generated across processes."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from train.config import SHIPPED_MNIST, DataConfig, inception_weights
from train.data import sources
from train.data.images import MNIST, MNIST_DATASET, ImageSpec
from train.data.readers.idx import read_idx_images, read_idx_labels
from train.data.sources import ImageSet
from train.errors import ConfigError, DataError
from train.models import GENERATION_CHUNK, balanced_labels, split_like, to_uint8
from train.quality import classifier, contrastive, inception
from train.quality.metrics import (
    DENSITY_COVERAGE_K, DISTANCE_CHUNK, PRECISION_RECALL_K, Features, compare, copy_threshold, extract, fd_interval,
    nearest, per_digit)
from train.storage import tensor_cache

AUTO, CLASSIFIER, SELF_SUPERVISED, INCEPTION = "auto", "classifier", "self_supervised", "inception"  # eval.features
TRAINED_ON_THE_DATA = {CLASSIFIER: classifier, SELF_SUPERVISED: contrastive}  # each module's for_data trains one
FEATURE_NETWORKS = (*TRAINED_ON_THE_DATA, INCEPTION)  # Inception-v3: read from a file (inception.py)


def bytes_per_sample(images: ImageSpec, features: str = AUTO) -> int:
    """Memory per scored sample: its image in float32 and uint8, its features and class probabilities, and its
    column of the neighbour-distance blocks (DISTANCE_CHUNK rows of float32, and as much for their ordering)."""
    dim = inception.FEATURE_DIM if features == INCEPTION else classifier.FEATURE_DIM
    return (4 + 1) * math.prod(images.shape) + 4 * (dim + images.num_classes) + 2 * 4 * DISTANCE_CHUNK


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


def _split(data_cfg: DataConfig, split: str, labelled: bool, problem: str) -> ImageSet:
    """`split` of the data (with its labels where `labelled`), or a DataError saying `problem`, its "{error}" the
    reader's error."""
    try:
        return sources.load(data_cfg, split, labelled=labelled)
    except DataError as error:
        raise DataError(problem.replace("{error}", str(error))) from None


class Evaluator:
    """A feature network and the cached features of a test set it describes, ready to score samples."""

    @classmethod
    def for_data(cls, data_cfg: DataConfig, images: ImageSpec, cache_dir: Path, device: torch.device | str = "cpu",
                 features: str = AUTO, weights: str | None = None) -> Evaluator:
        """The evaluator of the data `images` describes, read from `data_cfg`, with the feature network `features`
        (eval.features): `classifier` (`auto` for labelled data) is MNIST's committed classifier for MNIST's images,
        whichever source gave them, and for other labelled data one trained on its own training split
        (`classifier.for_data`); `self_supervised` (`auto` for unlabelled data) is trained on the training split
        without labels (`contrastive.for_data`); `inception` is Inception-v3 from the file `weights`
        (eval.inception_weights; `inception.load`). Samples are scored against the data's own test split (or the
        part held out of its training split). Refused by name where that data is not at `data_cfg`, or has no labels
        for a classifier, or no test split, or the weights are missing: a run is never scored against another data
        set."""
        kind = (CLASSIFIER if images.num_classes else SELF_SUPERVISED) if features == AUTO else features
        if kind not in FEATURE_NETWORKS:
            raise ConfigError(f"eval.features={features!r} is not a feature network of this code; the feature networks "
                            f"are {', '.join((AUTO, *FEATURE_NETWORKS))}")
        weights_file = inception_weights(weights) if kind == INCEPTION else None  # before any data is read
        if kind == CLASSIFIER and images.dataset == MNIST_DATASET:
            return cls.mnist(SHIPPED_MNIST, cache_dir, device)
        where = f"data.source={data_cfg.source} data.path={data_cfg.path!r}"
        labelled = kind == CLASSIFIER
        if labelled and not images.num_classes:
            raise DataError(f"{where} is unlabelled, and eval.features=classifier needs the data's own labels to train "
                            "one (no pretrained network is downloaded): give the data labels (class subfolders, a "
                            "label column), or score it with eval.features=self_supervised (or auto)")
        elsewhere = "point data.path (train.evaluate's --data-path) at the data the generator was trained on"
        training = _split(data_cfg, "train", labelled, f"the quality metrics read the {images.describe()} the "
                          f"generator was trained on, and {where} gives no such data ({{error}}): {elsewhere}")
        if training.spec.dataset != images.dataset:
            raise DataError(f"{where} holds {training.spec.describe()}, not the {images.describe()} to be scored; "
                            f"{elsewhere}")
        test = _split(data_cfg, "test", labelled, "the quality metrics score samples against the data's test split, "
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
        if weights_file is not None:
            network, digest, named = inception.load(weights_file, images, device)
        else:
            network, digest = TRAINED_ON_THE_DATA[kind].for_data(training, cache_dir, device)
            named = (f"a classifier trained on {images.dataset}" if labelled else
                     f"a self-supervised network trained on {images.dataset}") + f" (sha256:{digest[:12]})"
        against = f"the test split of {images.dataset}"
        if sources.holds_out(data_cfg, images):
            against = (f"{len(test.images)} images held out of the training split (data.holdout={data_cfg.holdout}, "
                       f"never trained on) of {images.dataset}")
        return cls(network, digest, test, lambda: training.images, cache_dir, against, named)

    @classmethod
    def mnist(cls, data_dir: Path, cache_dir: Path, device: torch.device | str = "cpu") -> Evaluator:
        """MNIST's committed classifier and the test set in the IDX folder `data_dir`."""
        data_dir = Path(data_dir)
        test = ImageSet(read_idx_images(data_dir, "test")[:, None], read_idx_labels(data_dir, "test").long(), MNIST)
        return cls(classifier.load(device), classifier.WEIGHTS_SHA256, test,
                   lambda: read_idx_images(data_dir, "train")[:, None], cache_dir, "MNIST's test set",
                   f"MNIST's classifier (sha256:{classifier.WEIGHTS_SHA256[:12]})")

    def __init__(self, network: torch.nn.Module, network_sha256: str, test: ImageSet,
                 training_images: Callable[[], Tensor], cache_dir: Path, against: str, feature_network: str):
        """`test`: the images samples are scored against (labelled where the network classifies), described by
        `against` in reports; `training_images`: reads the training images, for the floor; `feature_network`: the
        network's name in every report."""
        self.network, self.against, self.feature_network = network, against, feature_network
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
        """`score`'s metrics and, where the feature network classifies, `per_digit`'s, from one pass of the feature
        network: {"against", "feature_network", "metrics", "per_digit"}; with `asked` (a conditional generator's
        labels) also "per_asked_digit" and metrics' "label_agreement" (a classifier's); with `bootstrap` resamples
        also "fd_interval" (`fd_interval`, seeded by `seed`); with `copy_rate` also metrics' "copy_rate"."""
        fake = extract(self.network, images)
        report = {"against": self.against, "feature_network": self.feature_network,
                  "metrics": compare(self.real, fake)}
        if self.network.classifies:
            report["per_digit"] = per_digit(self.real, self.real_labels, fake)
        if asked is not None and self.network.classifies:
            predicted = fake.probabilities.argmax(1).cpu()
            report["metrics"]["label_agreement"] = (predicted == asked.cpu()).double().mean().item()
            report["per_asked_digit"] = per_digit(self.real, self.real_labels, fake, asked)
        if bootstrap:
            report["fd_interval"] = fd_interval(self.real, fake, bootstrap, seed=seed)
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

    def test_accuracy(self) -> float | None:
        """The share of the test images the feature network labels correctly (how well its features know the data);
        None for a network that does not classify."""
        if not self.network.classifies:
            return None
        predicted = self.real.probabilities.argmax(1).cpu()
        return (predicted == self.real_labels.cpu()).double().mean().item()

    def fd_interval(self, images: Tensor, resamples: int, seed: int = 0) -> dict:
        """The FD of uint8 images against the test set, with its bootstrap interval (`fd_interval`)."""
        return fd_interval(self.real, extract(self.network, images), resamples, seed=seed)

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
        kept = ("features", "probabilities") if self.network.classifies else ("features",)
        cached = tensor_cache.read(path, what, needed=kept)
        if cached is not None:
            return Features(*(cached[name].to(device) for name in kept))
        real = extract(self.network, images)
        tensor_cache.write(path, {name: getattr(real, name) for name in kept}, what)
        return real
