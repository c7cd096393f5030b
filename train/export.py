"""`python -m train.export --checkpoint <checkpoint or run dir> --out <dir>`: the generator alone.

An exported generator is a folder of two files: `generator.safetensors` (the EMA generator unless
--no-ema) and `generator.json` (architecture, z_dim, whether it is conditional, the images it draws
and the data config they came from, which weights, step, source checkpoint, SHA-256 of the
weights): everything needed to build and load the generator without the training state. `load_generator` reads it, or the generator of a checkpoint or a run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from train import images, models
from train.checkpoint import load_network, tensor_shapes
from train.config import CHOICES, DataConfig
from train.errors import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, CheckpointError, DataError
from train.files import write_atomically
from train.manifest import checked_json, read_state, resolve, sha256

WEIGHTS = "generator.safetensors"
DESCRIPTION = "generator.json"
DATA_SCHEMA = {"source": str, "path": str, "split?": str, "torchvision_name?": str}  # where the images came from
# What `load_generator` reads from generator.json (a description without "conditional" is of an unconditional one).
DESCRIPTION_SCHEMA = {"arch": str, "z_dim": int, "conditional?": bool, "images?": images.SCHEMA, "data?": DATA_SCHEMA,
                      "weights": str, "step": int, "source": str, "sha256": str}


def export_generator(path: Path, out: Path, use_ema: bool = True) -> Path:
    """Write the generator of the checkpoint (or run directory) `path` into `out`.

    An export already in `out` is never overwritten (its checkpoint may since have been deleted by
    `checkpoint.keep_last`). The description is written last: without it the folder is no export.
    """
    out = Path(out)
    if (out / WEIGHTS).exists() or (out / DESCRIPTION).exists():
        raise CheckpointError(f"{out} already holds an exported generator; it is never overwritten: "
                              "export into another --out, or move that one away first")
    source = resolve(path)
    state = read_state(source)
    name = _generator_name(use_ema)
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(out / WEIGHTS, (source / f"{name}.safetensors").read_bytes())
        model = state["config"]["model"]
        write_atomically(out / DESCRIPTION, json.dumps({
            "arch": model["arch"], "z_dim": model["z_dim"], "conditional": model.get("conditional", False),
            "images": images.recorded(state).as_dict(), "data": state["config"]["data"], "weights": name,
            "step": state["progress"]["step"], "source": str(source.resolve()), "sha256": sha256(out / WEIGHTS),
        }, indent=1))
    except OSError:  # a full disk: take back what this call wrote, or the retry would be refused as an overwrite
        for written in (out / WEIGHTS, out / DESCRIPTION):
            written.unlink(missing_ok=True)
        raise
    return out


def load_generator(path: Path, device: str = "cpu", use_ema: bool = True) -> nn.Module:
    """The generator of an exported folder, a checkpoint, or a run directory, in eval mode."""
    path = Path(path)
    if (path / DESCRIPTION).is_file():
        description = checked_json(path / DESCRIPTION, DESCRIPTION_SCHEMA)
        if sha256(path / WEIGHTS) != description["sha256"]:
            raise CheckpointError(f"{path / WEIGHTS} is damaged: its SHA-256 does not match {DESCRIPTION}")
        model, folder, name, described_in = description, path, WEIGHTS.removesuffix(".safetensors"), DESCRIPTION
        drawn = images.recorded(description)
    else:
        folder = resolve(path)  # verified: state.json follows its schema
        state = read_state(folder)
        model, name, described_in = state["config"]["model"], _generator_name(use_ema), "state.json"
        drawn = images.recorded(state)
    network = _build_to_fit(model, drawn, folder / f"{name}.safetensors", folder / described_in).to(device)
    load_network(folder, name, network)
    return network.eval()


def training_data(path: Path, data_path: str | None = None) -> DataConfig:
    """Where the generator of an exported folder, a checkpoint or a run directory was trained (its data config, as
    recorded; `data_path` in place of the recorded path where given): the data its quality is measured on."""
    path = Path(path)
    if (path / DESCRIPTION).is_file():
        recorded = checked_json(path / DESCRIPTION, DESCRIPTION_SCHEMA).get("data", {})
    else:
        recorded = read_state(resolve(path))["config"]["data"]
    known = {key: value for key, value in recorded.items() if key in DataConfig.__dataclass_fields__}
    return replace(DataConfig(**known), **({"path": data_path} if data_path else {}))


def _build_to_fit(model: dict, drawn: images.ImageSpec, weights: Path, described_in: Path) -> nn.Module:
    """The generator `model` describes, drawing `drawn`, built once its shapes are known to match the tensors in
    `weights`: they are compared on a network without memory (the meta device), so an edited description (an unknown
    arch, an absurd z_dim, a size no network has) is refused by name instead of being allocated."""
    arch, z_dim, conditional = model["arch"], model["z_dim"], model.get("conditional", False)
    if arch not in CHOICES["model.arch"]:
        raise CheckpointError(f"{described_in} names the architecture {arch!r}; this code builds "
                              f"{', '.join(CHOICES['model.arch'])}")
    try:
        with torch.device("meta"):
            skeleton = models.build_generator(arch, z_dim, conditional=conditional, images=drawn)
    except DataError as error:
        raise CheckpointError(f"{described_in} describes a generator this code cannot build: {error}") from None
    needed = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    saved = tensor_shapes(weights)
    if saved != needed:
        different = sorted(key for key in needed.keys() | saved.keys() if needed.get(key) != saved.get(key))
        raise CheckpointError(f"{weights} does not fit the generator {described_in} describes (arch {arch}, z_dim "
                              f"{z_dim}, conditional {str(conditional).lower()}): " + "; ".join(
                                  f"{key}: file {saved.get(key, 'missing')}, network {needed.get(key, 'missing')}"
                                  for key in different[:3]))
    return models.build_generator(arch, z_dim, conditional=conditional, images=drawn)


def _generator_name(use_ema: bool) -> str:
    return "generator_ema" if use_ema else "generator"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run directory")
    parser.add_argument("--out", required=True, help="folder to write generator.safetensors and generator.json into")
    parser.add_argument("--no-ema", action="store_true", help="export the trained generator, not its EMA")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; give the folder to write the generator into")
    try:
        out = export_generator(args.checkpoint, args.out, use_ema=not args.no_ema)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"error: exporting into {args.out} failed ({error}); nothing of it is left there: make room and "
              "run the same command again", file=sys.stderr)
        return EXIT_WRITE_FAILED
    print(f"exported the generator to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
