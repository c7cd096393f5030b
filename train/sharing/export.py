"""An exported generator: the generator alone, ready to share, and how it is read back.

An exported generator is a folder: `generator.safetensors` (the EMA generator unless --no-ema),
`generator.json` (architecture, z_dim, whether it is conditional, the images it draws and the data
config they came from, which weights, step, source checkpoint, SHA-256 of the weights): everything
needed to build and load the generator without the training state; and its model card, `README.md`
with `samples.png` (train/sharing/model_card.py). `load_generator` reads an export (a folder or a Hub
repository id), or the generator of a checkpoint or a run directory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import NamedTuple
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from train import models
from train.config import CHOICES, DataConfig, EvalConfig
from train.data import images
from train.data.sources import recorded_config
from train.errors import CheckpointError, DataError
from train.networks import NetworkOptions
from train.sharing import hub, model_card
from train.storage.checkpoint import load_network, tensor_shapes
from train.storage.files import write_atomically
from train.storage.layout import CHECKPOINTS
from train.storage.manifest import checked_json, read_state, resolve, sha256

WEIGHTS = "generator.safetensors"
SAMPLES_ON_CARD = 64
DESCRIPTION = "generator.json"
# Where the images came from.
DATA_SCHEMA = {"source": str, "path": str, "split?": str, "torchvision_name?": str, "holdout?": (int, float)}
# What `load_generator` reads from generator.json (a description without "conditional" is of an unconditional one).
# The model.* keys (networks.NetworkOptions) the generator is built from; those of its run's config are in it.
DESCRIPTION_SCHEMA = {"arch": str, "z_dim": int, "conditional?": bool, **NetworkOptions.schema("generator"),
                      "images?": images.SCHEMA, "data?": DATA_SCHEMA, "features?": str, "weights": str, "step": int,
                      "source": str, "sha256": str}


class Exported(NamedTuple):
    folder: Path
    step: int  # the checkpoint's
    evaluation: dict | None  # what its run logged at that step (model_card.evaluation_at), on the card


def export_generator(path: Path, out: Path, use_ema: bool = True, name: str | None = None) -> Exported:
    """Write the generator of the checkpoint (or run directory) `path` into `out`, with its model card (`name`:
    the model's name on it, by default the folder's).

    `out` must be new or empty: an export already there is never overwritten (its checkpoint may since have been
    deleted by `checkpoint.keep_last`), nor is anything else. The description is written last: without it the
    folder is no export.
    """
    out = Path(out)
    if out.is_dir() and (present := sorted(entry.name for entry in out.iterdir())):
        what = "an exported generator" if DESCRIPTION in present else "other files"
        raise CheckpointError(f"{out} already holds {what} ({', '.join(present[:5])}); nothing in it is ever "
                              "overwritten: export into a new or empty --out, or move those away first")
    source = resolve(path)
    state = read_state(source)
    weights_name = _generator_name(use_ema)
    model = state["config"]["model"]
    description = {
        "arch": model["arch"], "z_dim": model["z_dim"], "conditional": model.get("conditional", False),
        **{key: model[key] for key in NetworkOptions.names("generator") if key in model},
        "images": images.recorded(state).as_dict(), **_data_and_features(state["config"]), "weights": weights_name,
        "step": state["progress"]["step"], "source": _shown_source(source)}
    out.mkdir(parents=True, exist_ok=True)
    written = [out / WEIGHTS, out / model_card.SAMPLES, out / model_card.CARD, out / DESCRIPTION]
    try:
        write_atomically(out / WEIGHTS, (source / f"{weights_name}.safetensors").read_bytes())
        generator = load_generator(source, use_ema=use_ema)
        labels = models.balanced_labels(SAMPLES_ON_CARD, generator.num_classes)
        save_image(models.generate(generator, SAMPLES_ON_CARD, 0, labels), out / model_card.SAMPLES, nrow=8, padding=2,
                   pad_value=1.0)
        evaluation = model_card.evaluation_at(source, description["step"])
        card = model_card.make_card(description, state, evaluation, name or out.resolve().name)
        write_atomically(out / model_card.CARD, str(card))
        write_atomically(out / DESCRIPTION, json.dumps(description | {"sha256": sha256(out / WEIGHTS)}, indent=1))
    except OSError:  # a full disk: take back what this call wrote, or the retry would be refused as an overwrite
        for path_written in written:
            path_written.unlink(missing_ok=True)
        raise
    return Exported(out, description["step"], evaluation)


def _shown_source(checkpoint: Path) -> str:
    """The checkpoint an export came from, relative to its run (checkpoints/step_N): never the trainer's paths."""
    checkpoint = checkpoint.resolve()
    return f"{CHECKPOINTS}/{checkpoint.name}" if checkpoint.parent.name == CHECKPOINTS else checkpoint.name


def load_generator(path: Path, device: str = "cpu", use_ema: bool = True) -> nn.Module:
    """The generator of an exported folder (or a Hub model repository USER/REPO holding one), a checkpoint, or a
    run directory, in eval mode."""
    if hub.looks_like_repo_id(str(path)):
        path = hub.download(str(path), [WEIGHTS, DESCRIPTION])
    path = Path(path)
    if (path / DESCRIPTION).is_file():
        description = checked_json(path / DESCRIPTION, DESCRIPTION_SCHEMA)
        if sha256(path / WEIGHTS) != description["sha256"]:
            raise CheckpointError(f"{path / WEIGHTS} is damaged: its SHA-256 does not match {DESCRIPTION}")
        model, folder, name, described_in = description, path, WEIGHTS.removesuffix(".safetensors"), DESCRIPTION
        drawn = images.recorded(description, str(path / DESCRIPTION))
    else:
        folder = resolve(path)  # verified: state.json follows its schema
        state = read_state(folder)
        model, name, described_in = state["config"]["model"], _generator_name(use_ema), "state.json"
        drawn = images.recorded(state, str(folder / "state.json"))
    network = _build_to_fit(model, drawn, folder / f"{name}.safetensors", folder / described_in).to(device)
    load_network(folder, name, network)
    return network.eval()


def training_data(path: Path, data_path: str | None = None) -> DataConfig:
    """Where the generator of an exported folder, a checkpoint or a run directory was trained (its data config, as
    recorded; `data_path` in place of the recorded path where given): the data its quality is measured on."""
    recorded = _recorded(path)["data"]
    return replace(recorded_config(recorded), **({"path": data_path} if data_path else {}))


def scored_with(path: Path) -> str:
    """The feature network (eval.features) the run of an exported folder, a checkpoint or a run directory was
    scored with: what the tools score it with unless told otherwise; `auto` where that was not recorded."""
    return _recorded(path)["features"]


def _recorded(path: Path) -> dict:
    """{"data": the data config, "features": eval.features} as an export's description or a checkpoint records
    them (an export or a run from before `features` was recorded: auto)."""
    path = Path(path)
    if (path / DESCRIPTION).is_file():
        described = checked_json(path / DESCRIPTION, DESCRIPTION_SCHEMA)
        return {"data": described.get("data", {}), "features": described.get("features", EvalConfig.features)}
    return _data_and_features(read_state(resolve(path))["config"])


def _data_and_features(config: dict) -> dict:
    """What a run's resolved config says of how its generator is scored: its data, its feature network."""
    return {"data": config["data"], "features": config.get("eval", {}).get("features", EvalConfig.features)}


def _build_to_fit(model: dict, drawn: images.ImageSpec, weights: Path, described_in: Path) -> nn.Module:
    """The generator `model` describes, drawing `drawn`, built once its shapes are known to match the tensors in
    `weights`: they are compared on a network without memory (the meta device), so an edited description (an unknown
    arch, an absurd z_dim, a size no network has) is refused by name instead of being allocated."""
    arch, z_dim, conditional = model["arch"], model["z_dim"], model.get("conditional", False)
    build = functools.partial(models.build_generator, arch, z_dim, conditional, drawn, NetworkOptions.of(model))
    if arch not in CHOICES["model.arch"]:
        raise CheckpointError(f"{described_in} names the architecture {arch!r}; this code builds "
                              f"{', '.join(CHOICES['model.arch'])}")
    if z_dim < 1:
        raise CheckpointError(f"{described_in} is damaged: z_dim is {z_dim}, not a latent size (1 or more)")
    try:
        with torch.device("meta"):
            skeleton = build()
    except DataError as error:
        raise CheckpointError(f"{described_in} describes a generator this code cannot build: {error}") from None
    except (RuntimeError, ValueError, OverflowError) as error:  # a size torch cannot even describe
        raise CheckpointError(f"{described_in} is damaged: z_dim {z_dim} with {drawn.describe()} makes tensors too "
                              f"large to describe ({type(error).__name__}: {error}); restore the file") from None
    needed = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    saved = tensor_shapes(weights)
    if saved != needed:
        different = sorted(key for key in needed.keys() | saved.keys() if needed.get(key) != saved.get(key))
        raise CheckpointError(f"{weights} does not fit the generator {described_in} describes (arch {arch}, z_dim "
                              f"{z_dim}, conditional {str(conditional).lower()}): " + "; ".join(
                                  f"{key}: file {saved.get(key, 'missing')}, network {needed.get(key, 'missing')}"
                                  for key in different[:3]))
    return build()


def _generator_name(use_ema: bool) -> str:
    return "generator_ema" if use_ema else "generator"
