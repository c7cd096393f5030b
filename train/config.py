"""Typed run configuration: dataclasses, read from YAML with dotted overrides by OmegaConf.

Everything a run does is decided here, and every mistake a user can make in a config is
caught here, before any data is read or any directory is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from train import losses, networks
from train.data import readers
from train.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MNIST = REPO_ROOT / "data" / "mnist"  # also the real set of the quality metrics
MIN_EVAL_SAMPLES = 100  # fewer make the Fréchet distance and the neighbourhood metrics noise
# torch-fidelity's Inception-v3 (TensorFlow's 2015-12-05 network, ported), the one the field's FID is computed with;
# the hex in the file name is the start of its SHA-256 (torch.hub's convention). Never downloaded at run time.
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


@dataclass
class RunConfig:
    dir: str = "runs/default"  # everything the run writes goes here
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "idx"  # idx | hf | torchvision | folder
    path: str = str(SHIPPED_MNIST)  # IDX folder, HF dataset id/folder/parquet, torchvision root, or image folder
    batch_size: int = 64  # per process and forward pass; a new run's global batch is this x the processes
    global_batch: int | None = None  # samples per update; null: data.batch_size x processes, or the checkpoint's
    split: str = "train"  # Hugging Face split name
    torchvision_name: str = "MNIST"  # MNIST | FashionMNIST | KMNIST | CIFAR10
    resolution: int | None = None  # the square size the networks get (scaled, centre-cropped); null: as they are
    channels: int | None = None  # 1 (grey) | 3 (RGB); null: grey where every picture is grey, else RGB
    cache_dir: str = ".cache/data"  # image folders and HF image columns decoded once, keyed by their pictures' bytes
    holdout: float = 0.1  # data without a test split: this share of it is held out as one, never trained on


@dataclass
class ModelConfig:
    arch: str = "seed"  # seed | dcgan
    z_dim: int = 100
    upsample: str = "fused"  # seed generator's upsample+conv: fused (the same function, fewer operations) | native
    conditional: bool = False  # class-conditional G and D: G draws the digit it is given (train.sample --label)
    class_norm: bool = False  # conditional DCGAN: G's BatchNorms also take the class (conditional BatchNorm)
    d_width: int = 64  # DCGAN's D: channels of its first convolution, doubled at each halving
    g_width: int = 64  # DCGAN's G: channels of its last transposed convolution's input, doubled towards its first
    bn_group: int | None = None  # BatchNorm normalises over groups of this many samples; null: each process's share


@dataclass
class LossConfig:
    kind: str = "bce"  # bce (the blog's) | hinge
    r1_gamma: float = 0.0  # weight of the R1 penalty gamma/2 E||grad_x D(x)||^2 on real images; 0: off
    r1_every: int = 1  # the penalty on every k-th step only, weighted gamma*k (StyleGAN2's lazy regularisation)


@dataclass
class OptimConfig:
    g_lr: float = 1e-3
    d_lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    amsgrad: bool = True
    fused: bool = True  # torch's fused Adam kernels (CPU and GPU); false: the foreach implementation


@dataclass
class TrainConfig:
    steps: int = 5000
    mixed_precision: str | None = None  # fp32 | bf16 | fp16 | auto; null: what `accelerate launch` was told
    cpu: bool = False  # force the CPU even where a GPU is present
    compile: bool = False  # torch.compile both networks (inductor), through Accelerate
    channels_last: bool = False  # NHWC memory format for both networks and the batches
    cuda_graph: bool | None = None  # each step's updates as one replayed CUDA graph; null: wherever it can run
    tf32: bool = False  # float32 matrix products on TF32 tensor cores (CUDA), as cuDNN runs convolutions by default
    deterministic: bool = False  # GPU runs repeatable bit for bit: deterministic cuDNN, cuBLAS and inductor kernels
    check_every: int = 10  # steps between the collective checks for signals and non-finite numbers
    on_nonfinite: str = "stop"  # stop | skip | rollback
    timeout_s: int = 600  # a collective waiting longer than this (a rank died) fails the run
    stop_at_fd: float | None = None  # end the run (exit 0) at the first evaluation with an FD at or below this
    patience: int | None = None  # end the run after this many evaluations in a row without a new lowest FD


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0 writes only the final checkpoint
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # online | offline | disabled
    project: str = "mnist-gan"
    every: int = 50  # steps between metric lines (the only host synchronisation of the loop)
    samples_every: int = 500  # steps between sample grids; 0: only the final grid
    curves: bool = True  # draw curves.png from metrics.jsonl when the run ends (matplotlib, ~2 s of a CPU core)


@dataclass
class EMAConfig:
    half_life_images: int = 10000  # the generator average forgets half its past over this many images
    rampup: float = 0.05  # early on, the half-life is at most this fraction of the images seen; 0: off
    statistics_images: int = 2048  # generated images that measure the average's own BatchNorm statistics


@dataclass
class EvalConfig:
    every: int = 0  # steps between quality evaluations during training; 0: only at the end
    num_samples: int = 10000  # generated images scored against the data's test split (MNIST's); 0: no evaluation
    seed: int = 0  # the latent vectors of the evaluation samples
    use_ema: bool = True  # the evaluations during training score the EMA generator; false: the trained one
    cache_dir: str = ".cache/eval"  # cached test-set features and feature networks of data other than MNIST
    fd_resamples: int = 0  # bootstrap resamples for the FD's 95% interval (eval/fd_low, eval/fd_high); 0: none
    copy_rate: bool = False  # eval/copy_rate: the share of samples nearer a training image than held-out images are
    features: str = "auto"  # the feature network: auto | classifier (labelled) | self_supervised | inception
    inception_weights: str | None = None  # eval.features=inception's weights file; null: torch hub's checkpoints


@dataclass
class ProfileConfig:
    steps: int = 0  # training steps to record with torch.profiler (host and device activity); 0: off
    after: int = 20  # steps of this process to run first (allocator, cuDNN autotuning, first logging)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    resume: str = "auto"  # auto | none | <path of a checkpoint folder>
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


CHOICES = {
    "data.source": readers.KINDS,  # one module each in train/data/readers/
    "data.torchvision_name": ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10"),
    "data.channels": (None, 1, 3),
    "model.arch": networks.KINDS,  # one module each in train/networks/
    "model.upsample": ("fused", "native"),
    "loss.kind": losses.KINDS,  # one module each in train/losses/
    "train.mixed_precision": (None, "fp32", "bf16", "fp16", "auto"),
    "logging.wandb": ("online", "offline", "disabled"),
    "train.on_nonfinite": ("stop", "skip", "rollback"),
    "eval.features": ("auto", "classifier", "self_supervised", "inception"),  # train/quality/evaluator.py's
}
_GREATER_THAN_ZERO = (lambda v: v > 0, "greater than 0")
_NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
_IN_UNIT_INTERVAL = (lambda v: 0 <= v < 1, "in [0, 1)")
RULES = {
    "data.batch_size": _GREATER_THAN_ZERO,
    "data.global_batch": (lambda v: v is None or v > 0, "null or greater than 0"),
    "model.bn_group": (lambda v: v is None or v > 0, "null or greater than 0"),
    "data.holdout": _IN_UNIT_INTERVAL,
    "data.resolution": (lambda v: v is None or v >= 8, "null (the pictures' own size) or at least 8"),
    "model.z_dim": _GREATER_THAN_ZERO,
    "model.d_width": _GREATER_THAN_ZERO,
    "model.g_width": _GREATER_THAN_ZERO,
    "loss.r1_gamma": _NOT_NEGATIVE,
    "loss.r1_every": _GREATER_THAN_ZERO,
    "optim.g_lr": _GREATER_THAN_ZERO,
    "optim.d_lr": _GREATER_THAN_ZERO,
    "optim.beta1": _IN_UNIT_INTERVAL,
    "optim.beta2": _IN_UNIT_INTERVAL,
    "train.steps": _GREATER_THAN_ZERO,
    "train.check_every": _GREATER_THAN_ZERO,
    "train.timeout_s": (lambda v: 0 < v <= 365 * 24 * 3600, "greater than 0 and at most a year (31536000)"),
    "checkpoint.keep_last": _NOT_NEGATIVE,
    "checkpoint.every": _NOT_NEGATIVE,
    "logging.every": _GREATER_THAN_ZERO,
    "logging.samples_every": _NOT_NEGATIVE,
    "run.seed": _NOT_NEGATIVE,
    "ema.half_life_images": _GREATER_THAN_ZERO,
    "ema.rampup": _NOT_NEGATIVE,
    "ema.statistics_images": _GREATER_THAN_ZERO,
    "eval.every": _NOT_NEGATIVE,
    "eval.num_samples": (lambda v: v == 0 or v >= MIN_EVAL_SAMPLES,
                         f"0 (no evaluation) or at least {MIN_EVAL_SAMPLES}"),
    "eval.fd_resamples": (lambda v: v == 0 or v >= 20, "0 (no interval) or at least 20 (1000 for a stable one)"),
    "eval.seed": _NOT_NEGATIVE,
    "profile.steps": _NOT_NEGATIVE,
    "profile.after": _GREATER_THAN_ZERO,
}

PATHS = ("run.dir", "data.path", "data.cache_dir", "eval.cache_dir")
NAME_MAX = 255  # bytes in one file or folder name, on Linux's file systems
PATH_MAX = 4096  # bytes in a whole path, with its terminating zero, on Linux


def load(config_path: str | None, overrides: list[str]) -> Config:
    """Merge defaults, the YAML file and `key=value` overrides into a validated Config."""
    merged = OmegaConf.structured(Config)
    try:
        if config_path is not None:
            merged = OmegaConf.merge(merged, _sections_kept(_read_yaml(Path(config_path)), merged))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=200)")
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as error:  # a value YAML cannot read: a leading ` or @, an unclosed quote
                key, value = item.split("=", 1)
                raise ConfigError(f"override {item!r}: YAML cannot read the value {value!r} "
                                  f"({' '.join(str(error).split())}); quote it as a YAML string, in the shell as "
                                  f"{shlex.quote(key + '=' + json.dumps(value))}") from None
        merged = OmegaConf.merge(merged, _sections_kept(OmegaConf.from_dotlist(overrides), merged))
        cfg: Config = OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except OmegaConfBaseException as error:
        raise ConfigError(_explain(error)) from None
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    """A config file's sections; anything that is not a YAML mapping in UTF-8 is named as such."""
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pick one of {available_configs()}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pick one of {available_configs()}")
    try:
        loaded = OmegaConf.create(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text, so not a YAML config") from None
    except yaml.YAMLError as error:  # a syntax error, or a tag such as !!python/object: plain YAML only
        raise ConfigError(f"config file {str(path)!r} is not plain YAML: {' '.join(str(error).split())}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r} holds a YAML list, not a mapping of sections "
                          "(e.g. `train:` with `steps: 200` indented below it)")
    return loaded


def _sections_kept(given: DictConfig, schema: DictConfig) -> DictConfig:
    """Refuse a plain value where `schema` (the config merged so far) has a section (`loss=hinge` for
    `loss.kind=hinge`), which OmegaConf would report without naming the key."""
    for key, value in given.items_ex(resolve=False):
        section = schema.get(key)
        if isinstance(section, DictConfig) and not isinstance(value, (DictConfig, dict)):
            keys = list(section.keys())
            raise ConfigError(f"config key '{key}' is a section, not a value: set one of its keys ({', '.join(keys)}), "
                              f"e.g. {key}.{keys[0]}={value}")
    return given


def _explain(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    reason = str(error).splitlines()[0]
    if not key:
        return f"config error: {reason}"
    if isinstance(error, ConfigKeyError):
        parent = OmegaConf.select(OmegaConf.structured(Config), key.rpartition(".")[0]) if "." in key else None
        section = parent if parent is not None else OmegaConf.structured(Config)
        return f"unknown config key '{key}'; valid keys here: {', '.join(section.keys())}"
    return f"config key '{key}': {reason}"


def validate(cfg: Config) -> None:
    """Reject impossible values with a message naming the key and what is allowed."""
    node = OmegaConf.structured(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(node, key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"config key '{key}' is {value!r}; allowed values: {shown}")
    for key, value in _leaves(to_dict(cfg)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' is {value!r}; it must be a finite number")
        if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:
            raise ConfigError(f"config key '{key}' is {value}; it must fit in 64 bits (below 2**63)")
    for key, (holds, rule) in RULES.items():
        value = OmegaConf.select(node, key)
        if not holds(value):
            raise ConfigError(f"config key '{key}' is {value!r}; it must be {rule}")
    for key in PATHS:
        path = OmegaConf.select(node, key)
        if not path.strip():
            raise ConfigError(f"config key '{key}' is empty; give a path (the default is "
                              f"{OmegaConf.select(OmegaConf.structured(Config), key)})")
        absolute = len(os.fsencode(os.path.abspath(path)))
        if absolute >= PATH_MAX:
            raise ConfigError(f"config key '{key}' is a path of {absolute} bytes once absolute; Linux allows fewer than "
                              f"{PATH_MAX}: choose a shorter one")
        too_long = [part for part in Path(path).parts if len(part.encode()) > NAME_MAX]
        if too_long:
            raise ConfigError(f"config key '{key}' has a path component of {len(too_long[0].encode())} bytes "
                              f"({too_long[0][:20]}...); file systems allow at most {NAME_MAX}")
    for key, value, rule in (("train.stop_at_fd", cfg.train.stop_at_fd, "greater than 0"),
                             ("train.patience", cfg.train.patience, "1 or more")):
        if value is None:
            continue
        if value <= 0:
            raise ConfigError(f"config key '{key}' is {value!r}; it must be {rule} (or null: off)")
        if not (cfg.eval.num_samples and cfg.eval.every):
            raise ConfigError(f"{key}={value} needs evaluations during training: set eval.every (steps between "
                              f"them; it is {cfg.eval.every}) and eval.num_samples (it is {cfg.eval.num_samples}), "
                              f"or {key}=null")
    if cfg.eval.features == "inception" and cfg.eval.num_samples:
        inception_weights(cfg.eval.inception_weights)
    if cfg.model.class_norm and not (cfg.model.conditional and cfg.model.arch == "dcgan"):
        raise ConfigError("model.class_norm=true needs model.conditional=true and model.arch=dcgan: it gives a "
                          "class-conditional DCGAN generator's BatchNorms the class")
    for key, network in (("d_width", "discriminator"), ("g_width", "generator")):
        if getattr(cfg.model, key) != getattr(ModelConfig, key) and cfg.model.arch != "dcgan":
            raise ConfigError(f"model.{key}={getattr(cfg.model, key)} needs model.arch=dcgan: the blog's {network} "
                              f"(model.arch={cfg.model.arch}) has its own widths")
    if cfg.loss.r1_gamma and cfg.train.compile:
        raise ConfigError("loss.r1_gamma > 0 needs train.compile=false: the R1 penalty backpropagates through D's "
                          "gradient, and torch.compile (AOTAutograd) has no double backward")
    if cfg.train.deterministic and cfg.model.arch == "seed" and cfg.model.upsample == "native":
        raise ConfigError("train.deterministic=true needs model.upsample=fused: the native bilinear upsampling's "
                          "backward has no deterministic CUDA kernel (the fused form is the same function)")
    if cfg.train.cuda_graph and cfg.train.on_nonfinite == "skip":
        raise ConfigError("train.cuda_graph=true needs train.on_nonfinite=stop or rollback: skip decides on the host "
                          "inside every step, which a CUDA graph cannot")


def inception_weights(configured: str | None, key: str = "eval.inception_weights") -> Path:
    """The Inception-v3 weights file eval.features=inception reads: `configured` (the config `key`), or where
    torch.hub keeps downloads (torch-fidelity's own cache: $TORCH_HOME/hub/checkpoints, ~/.cache/torch/... without
    it); refused before any work where there is no such file, saying which file to copy where."""
    if configured:
        path = Path(configured).expanduser()
    else:
        torch_home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME") or "~/.cache", "torch")
        path = Path(torch_home).expanduser() / "hub" / "checkpoints" / INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
    if not path.is_file():
        raise ConfigError(f"eval.features=inception reads Inception-v3's weights from {path}, and there is no such "
                          f"file (nothing is downloaded at run time): download {INCEPTION_WEIGHTS_URL} on a machine "
                          f"with internet and copy it there, or set {key} to where it is")
    return path


def _leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every value in a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


RESOLVED_AT_START = (None, "auto")  # values a run resolves for its machine; config.yaml records what it chose


def changed_settings(saved: dict, cfg: Config) -> dict[str, tuple]:
    """{key: (the checkpoint's value, this run's)} for each setting a resumed run changes. Not changes: run.dir and
    resume (where, not what), a null or auto this run resolves at its start (the checkpoint holds the resolved
    value), and a key the checkpoint's config lacks."""
    before = dict(_leaves(saved))
    return {key: (before[key], value) for key, value in _leaves(to_dict(cfg))
            if key in before and before[key] != value and value not in RESOLVED_AT_START
            and key not in ("run.dir", "resume")}


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def available_configs() -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").glob("*.yaml"))


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a GAN on MNIST (one process, or many under `accelerate launch -m train`).",
    )
    parser.add_argument("--config", help="YAML experiment config, e.g. configs/seed.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.steps=200 data.batch_size=32")
    args = parser.parse_args(argv)
    return load(args.config, args.overrides)
