"""Checkpoints that lose nothing: every tensor in safetensors, everything else in JSON, no pickle.

A checkpoint is the folder `<run.dir>/checkpoints/step_<N>/`:

    generator.safetensors, discriminator.safetensors   weights and buffers (rank 0's BN statistics)
    generator_ema.safetensors                            the EMA generator (its own BN statistics)
    optimizers.safetensors + optimizers.json             Adam moments / hyper-parameters of both networks
    rank_<r>.safetensors + rank_<r>.json                 RNG states of rank r (noise, torch, CUDA, numpy, python)
    state.json                                           step, data position, counters, W&B id, config
    manifest.json                                        format version and the SHA-256 of every file above

It is written into a hidden `.incomplete_step_<N>` folder beside the final one: every rank writes
its own RNG state there, the main process the shared state, each file fsync'ed; once all ranks
are done the main process writes the manifest, renames the folder into place and only then moves
the `latest` marker. A crash at any moment leaves the previous checkpoint valid. Loading reads
only the files the manifest names, after checking their hashes; nothing is ever unpickled. The
layout and the manifest, which need no torch, are train/manifest.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn

from train.data import DataPosition
from train.manifest import (LATEST, STATE, CheckpointError, checkpoint_name, checkpoints_dir, complete_checkpoints,
                            fsync, read_state, resolve, sha256, stop_on_write_failure, verify, write_atomically,
                            write_json, write_manifest)

EXPORTED_WEIGHTS = "generator.safetensors"
EXPORTED_DESCRIPTION = "generator.json"


@dataclass
class Progress:
    """Counters and positions the next step depends on, besides tensors."""

    step: int = 0
    images_seen: int = 0
    data: DataPosition = field(default_factory=DataPosition)  # shared with the live ShardedBatches
    seed_offset: int = 0  # bumped by each non-finite rollback, so the redone steps draw fresh noise
    wandb_run_id: str | None = None


@dataclass
class Snapshot:
    """Live objects a checkpoint is taken from and restored into (unwrapped from DDP)."""

    networks: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    noise: torch.Generator
    progress: Progress
    config: dict
    scaler: torch.amp.GradScaler | None = None
    extra_json: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- saving


def save(accelerator, run_dir: Path, snapshot: Snapshot, keep_last: int = 0) -> Path:
    """Write a checkpoint of `snapshot` atomically; a collective: every rank calls it."""
    folder = checkpoints_dir(run_dir)
    final = folder / checkpoint_name(snapshot.progress.step)
    staging = folder / f".incomplete_{final.name}"
    if accelerator.is_main_process:
        if final.exists():
            _set_aside_damaged(final, accelerator.print)
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash: never valid, safe to discard
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    with stop_on_write_failure(f"writing checkpoint {final.name}", run_dir, partial_folder=staging):
        _write_parts(accelerator, staging, snapshot)
        if accelerator.is_main_process:
            write_manifest(staging)
            fsync(staging)
            os.rename(staging, final)
            fsync(folder)
    if accelerator.is_main_process:
        write_atomically(folder / LATEST, final.name + "\n")
        if keep_last:
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _write_parts(accelerator, staging: Path, snapshot: Snapshot) -> None:
    """Every rank its RNG states, the main process the shared state; then all wait for each other."""
    rank = accelerator.process_index
    rng_tensors, rng_json = _rng_state(snapshot.noise)
    _write_tensors(staging / f"rank_{rank}.safetensors", rng_tensors)
    write_json(staging / f"rank_{rank}.json", rng_json)
    if accelerator.is_main_process:
        for name, network in snapshot.networks.items():
            _write_tensors(staging / f"{name}.safetensors", network.state_dict())
        optimizer_tensors, optimizer_json = _optimizer_state(snapshot.optimizers)
        _write_tensors(staging / "optimizers.safetensors", optimizer_tensors)
        write_json(staging / "optimizers.json", optimizer_json)
        write_json(staging / STATE, {
            "progress": asdict(snapshot.progress),
            "world_size": accelerator.num_processes,
            "scaler": snapshot.scaler.state_dict() if snapshot.scaler is not None else None,
            "config": snapshot.config,
            **snapshot.extra_json,
        })
    accelerator.wait_for_everyone()


def _set_aside_damaged(final: Path, report) -> None:
    """A valid checkpoint is never overwritten; a damaged one (skipped on resume) is kept aside, renamed."""
    try:
        verify(final)
    except CheckpointError as error:
        aside = final.with_name(f"damaged_{final.name}")
        suffix = 1
        while aside.exists():
            aside, suffix = final.with_name(f"damaged_{final.name}.{suffix}"), suffix + 1
        os.rename(final, aside)
        report(f"kept the damaged {final.name} as {aside.name} ({error})")
        return
    raise CheckpointError(f"checkpoint {final} already exists; it is never overwritten")


def _rng_state(noise: torch.Generator) -> tuple[dict, dict]:
    tensors = {"noise": noise.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    return tensors, {
        "numpy": {"kind": kind, "position": position, "has_gauss": has_gauss, "cached_gaussian": cached_gauss},
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }


def _optimizer_state(optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict, dict]:
    tensors, described = {}, {}
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        for index, values in state["state"].items():
            for key, value in values.items():
                tensors[f"{name}.{index}.{key}"] = value
        described[name] = {"param_groups": state["param_groups"]}
    return tensors, described


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Serialised in memory and written by Python, so that a full disk is an OSError like any other write's."""
    path.write_bytes(safetensors.torch.save({key: value.detach().cpu().contiguous() for key, value in tensors.items()}))
    fsync(path)


# ---------------------------------------------------------------------------------------- loading


def restore(path: Path, snapshot: Snapshot, rank: int, world_size: int) -> bool:
    """Load a checkpoint that `verify` (or `newest_valid`) accepted into `snapshot`'s live objects.

    Shapes must be identical. Returns whether this rank's RNG states were restored: only when the number of processes is
    the one the checkpoint was written with (each rank continues its own noise stream).
    """
    path = Path(path)
    state = read_state(path)
    for name, network in snapshot.networks.items():
        _load_network(path, name, network)
    tensors = load_file(path / "optimizers.safetensors")
    described = json.loads((path / "optimizers.json").read_text())
    for name, optimizer in snapshot.optimizers.items():
        per_parameter: dict[int, dict] = {}
        for key, value in tensors.items():
            owner, index, field_name = key.split(".", 2)
            if owner == name:
                per_parameter.setdefault(int(index), {})[field_name] = value
        groups = []
        for saved, live in zip(described[name]["param_groups"], optimizer.param_groups):
            group = dict(saved)
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
            if "capturable" in live:  # how this run executes (train.cuda_graph), not what it computes
                group["capturable"] = live["capturable"]
            groups.append(group)
        optimizer.load_state_dict({"state": per_parameter, "param_groups": groups})
        _match_parameter_strides(optimizer)
    if snapshot.scaler is not None and state["scaler"] is not None:
        snapshot.scaler.load_state_dict(state["scaler"])
    progress = dict(state["progress"])
    vars(snapshot.progress.data).update(progress.pop("data"))
    vars(snapshot.progress).update(progress)
    if state["world_size"] != world_size:
        return False
    _restore_rng(path, rank, snapshot.noise)
    return True


def _match_parameter_strides(optimizer: torch.optim.Optimizer) -> None:
    """Give each moment its parameter's memory layout (channels_last weights): saved tensors are contiguous, and
    fused Adam pairs elements by storage order, checking dtype and device but not strides, so a contiguous
    moment of a channels_last weight would silently scramble every update after a resume."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def _load_network(path: Path, name: str, network: nn.Module) -> None:
    tensors = load_file(path / f"{name}.safetensors", device=str(next(network.parameters()).device))
    expected = network.state_dict()
    mismatched = [f"{key}: checkpoint {tuple(tensors[key].shape)} vs model {tuple(value.shape)}"
                  for key, value in expected.items() if key in tensors and tensors[key].shape != value.shape]
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if mismatched or missing or unexpected:
        details = "; ".join(mismatched[:3] + [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise CheckpointError(f"{path / (name + '.safetensors')} does not fit this model.arch/model.z_dim "
                              f"(was it made with another config?): {details}")
    network.load_state_dict(tensors)


def _restore_rng(path: Path, rank: int, noise: torch.Generator) -> None:
    tensors = load_file(path / f"rank_{rank}.safetensors")
    described = json.loads((path / f"rank_{rank}.json").read_text())
    noise.set_state(tensors["noise"])
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
    numpy_state = described["numpy"]
    np.random.set_state((numpy_state["kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = described["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def export_generator(path: Path, out: Path, use_ema: bool = True) -> Path:
    """Write `generator.safetensors` + `generator.json` (architecture and arguments) into `out`.

    An export already in `out` is never overwritten (its checkpoint may since have been deleted by
    `checkpoint.keep_last`). The description is written last: without it the folder is no export.
    """
    out = Path(out)
    if (out / EXPORTED_WEIGHTS).exists() or (out / EXPORTED_DESCRIPTION).exists():
        raise CheckpointError(f"{out} already holds an exported generator; it is never overwritten: "
                              "export into another --out, or move that one away first")
    source = resolve(path)
    state = read_state(source)
    name = _generator_file(source, use_ema)
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(out / EXPORTED_WEIGHTS, (source / name).read_bytes())
        model = state["config"]["model"]
        write_atomically(out / EXPORTED_DESCRIPTION, json.dumps({
            "arch": model["arch"], "z_dim": model["z_dim"], "weights": name.removesuffix(".safetensors"),
            "step": state["progress"]["step"], "source": str(source), "sha256": sha256(out / EXPORTED_WEIGHTS),
        }, indent=1))
    except OSError:  # a full disk: take back what this call wrote, or the retry would be refused as an overwrite
        for written in (out / EXPORTED_WEIGHTS, out / EXPORTED_DESCRIPTION):
            written.unlink(missing_ok=True)
        raise
    return out


def _generator_file(folder: Path, use_ema: bool) -> str:
    """The EMA generator where the checkpoint has one and it is wanted, else the trained one."""
    return "generator_ema.safetensors" if use_ema and (folder / "generator_ema.safetensors").is_file() \
        else "generator.safetensors"


def load_generator(path: Path, build, device: str = "cpu", use_ema: bool = True) -> nn.Module:
    """The generator of an exported folder, a checkpoint, or a run directory, in eval mode.

    `build(arch, z_dim)` makes the empty network (models.build's generator), so this module needs
    no knowledge of architectures.
    """
    path = Path(path)
    if (path / EXPORTED_DESCRIPTION).is_file():
        description = json.loads((path / EXPORTED_DESCRIPTION).read_text())
        if sha256(path / EXPORTED_WEIGHTS) != description["sha256"]:
            raise CheckpointError(f"{path / EXPORTED_WEIGHTS} is damaged: its SHA-256 does not match "
                                  f"{EXPORTED_DESCRIPTION}")
        arch, z_dim, folder, name = description["arch"], description["z_dim"], path, EXPORTED_WEIGHTS
    else:
        folder = resolve(path)
        model = read_state(folder)["config"]["model"]
        arch, z_dim, name = model["arch"], model["z_dim"], _generator_file(folder, use_ema)
    network = build(arch, z_dim).to(device)
    _load_network(folder, name.removesuffix(".safetensors"), network)
    return network.eval()
