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
the `latest` marker (and, for the lowest FD of the run so far, the `best` link). A crash at any
moment leaves the previous checkpoint valid. Loading reads only the files the manifest names,
after checking their hashes; nothing is ever unpickled. The layout and the manifest, which need
no torch, are train/storage/manifest.py.
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
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from train.data.images import ImageSpec, recorded
from train.data.sharding import DataPosition
from train.errors import CheckpointError
from train.storage.files import fsync, write_atomically, write_file
from train.storage.layout import BEST, LATEST
from train.storage.manifest import (
    STATE, checkpoint_name, checkpoints_dir, mark_best, prune, read_state, stop_on_write_failure,
    verify, write_manifest
)

GLOBAL_NOISE = "one stream for the global batch"  # state.json's "noise" since every rank draws the global batch


@dataclass
class Progress:
    """Counters and positions the next step depends on, besides tensors."""

    step: int = 0
    images_seen: int = 0
    data: DataPosition = field(default_factory=DataPosition)  # shared with the live ShardedBatches
    seed_offset: int = 0  # bumped by each non-finite rollback, so the redone steps draw fresh noise
    wandb_run_id: str | None = None
    best_fd: float | None = None  # the lowest FD of the evaluations so far: that checkpoint is checkpoints/best
    evaluations_since_best: int = 0  # evaluations in a row that did not lower the FD (train.patience)


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


def save(accelerator, run_dir: Path, snapshot: Snapshot, keep_last: int = 0, best: bool = False) -> Path:
    """Write a checkpoint of `snapshot` atomically, and with `best` point checkpoints/best at it; a collective:
    every rank calls it."""
    folder = checkpoints_dir(run_dir)
    final = folder / checkpoint_name(snapshot.progress.step)
    staging = folder / f".incomplete_{final.name}"
    with stop_on_write_failure(f"writing checkpoint {final.name}", run_dir, partial_folder=staging):
        if accelerator.is_main_process:
            if final.exists() or final.is_symlink():
                _set_aside_damaged(final, accelerator.print)
            _discard(staging)  # left by a crash (or planted): never valid, safe to discard
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _write_parts(accelerator, staging, snapshot)
        if accelerator.is_main_process:
            write_manifest(staging)
            fsync(staging)
            os.rename(staging, final)
            fsync(folder)
    if accelerator.is_main_process:
        with stop_on_write_failure(f"pointing {LATEST}{' and ' + BEST if best else ''} at {final.name}", run_dir):
            write_atomically(folder / LATEST, final.name + "\n")
            if best:
                mark_best(run_dir, final)
        if keep_last:
            with stop_on_write_failure(f"deleting the checkpoints before the newest {keep_last}", run_dir):
                prune(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _discard(staging: Path) -> None:
    """Remove whatever stands at a staging name: a folder, or a file or link (unlinked, never followed)."""
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    else:
        shutil.rmtree(staging, ignore_errors=True)


def _write_parts(accelerator, staging: Path, snapshot: Snapshot) -> None:
    """Every rank its RNG states, the main process the shared state; then all wait for each other."""
    rank = accelerator.process_index
    rng_tensors, rng_json = _rng_state(snapshot.noise)
    _write_tensors(staging / f"rank_{rank}.safetensors", rng_tensors)
    write_file(staging / f"rank_{rank}.json", json.dumps(rng_json, indent=1))
    if accelerator.is_main_process:
        for name, network in snapshot.networks.items():
            _write_tensors(staging / f"{name}.safetensors", network.state_dict())
        optimizer_tensors, optimizer_json = _optimizer_state(snapshot.optimizers)
        _write_tensors(staging / "optimizers.safetensors", optimizer_tensors)
        write_file(staging / "optimizers.json", json.dumps(optimizer_json, indent=1))
        write_file(staging / STATE, json.dumps({
            "progress": asdict(snapshot.progress),
            "world_size": accelerator.num_processes,
            "scaler": snapshot.scaler.state_dict() if snapshot.scaler is not None else None,
            "config": snapshot.config,
            **snapshot.extra_json,
        }, indent=1))
    accelerator.wait_for_everyone()


def _set_aside_damaged(final: Path, report) -> None:
    """A valid checkpoint is never overwritten; a damaged one (skipped on resume) or a link planted at its name
    (never followed) is kept aside, renamed."""
    try:
        if final.is_symlink():
            raise CheckpointError("a symbolic link, not a checkpoint of this run")
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
    write_file(path, safetensors.torch.save({key: value.detach().cpu().contiguous() for key, value in tensors.items()}))


# ---------------------------------------------------------------------------------------- loading


def check_images(path: Path, images: ImageSpec) -> None:
    """A checkpoint resumes only on the images it was trained on (its networks are made for their shape, and its
    quality numbers are measured against their test set)."""
    saved = recorded(read_state(path))
    if saved != images:
        held_out = (" (a run on unlabelled data begun before data.holdout applied to it trained on all of it: resume "
                    "that with data.holdout=0)" if not saved.num_classes and saved.shape == images.shape else "")
        raise CheckpointError(f"checkpoint {path} was trained on {saved.describe()}; this data is {images.describe()}: "
                              f"resume with the data it was trained on (data.*){held_out}, or start a new run.dir")


def restore(path: Path, snapshot: Snapshot, rank: int, world_size: int) -> bool:
    """Load a checkpoint that `verify` (or `newest_valid`) accepted into `snapshot`'s live objects.

    Every tensor is checked against the live one it replaces, shape and dtype, before anything live
    changes: a checkpoint that does not fit is refused whole, by name. The optimizers take the
    checkpoint's moments and keep this run's hyper-parameters (optim.*, as config.yaml records them).
    With the number of processes the checkpoint was written with, every RNG state of this rank is restored; with
    another, only the noise stream. Returns whether the checkpoint's noise stream is one for the global batch (the
    same on every rank: written by one process, or since the stream became global) and so continues; an older
    multi-process checkpoint's per-rank streams do not (the caller reseeds).
    """
    path = Path(path)
    state = read_state(path)
    networks = {name: _network_tensors(path, name, network) for name, network in snapshot.networks.items()}
    optimizers = _optimizer_states(path, snapshot.optimizers)
    same_ranks = state["world_size"] == world_size
    global_noise = state.get("noise") == GLOBAL_NOISE or state["world_size"] == 1
    rng = _rng_states(path, rank if same_ranks else 0, snapshot.noise) if same_ranks or global_noise else None
    for name, network in snapshot.networks.items():
        network.load_state_dict(networks[name])
    for name, optimizer in snapshot.optimizers.items():
        optimizer.load_state_dict(optimizers[name])
        _match_parameter_strides(optimizer)
    if snapshot.scaler is not None and state["scaler"] is not None:
        snapshot.scaler.load_state_dict(state["scaler"])
    progress = dict(state["progress"])
    vars(snapshot.progress.data).update(progress.pop("data"))
    vars(snapshot.progress).update(progress)
    if same_ranks:
        _apply_rng(*rng, snapshot.noise)
    elif global_noise:
        snapshot.noise.set_state(rng[0]["noise"])
    return global_noise


def _load(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=device)
    except Exception as error:  # safetensors' own error type, for anything its reader refuses
        raise CheckpointError(f"{path} is damaged: {error}") from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in a safetensors file, read from its header: nothing is allocated."""
    try:
        with safe_open(path, "pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except Exception as error:  # safetensors' own error type, for anything its reader refuses
        raise CheckpointError(f"{path} is damaged: {error}") from None


def load_network(path: Path, name: str, network: nn.Module) -> None:
    """Load `<path>/<name>.safetensors` into `network`, after checking every tensor against the network's own."""
    network.load_state_dict(_network_tensors(path, name, network))


def _network_tensors(path: Path, name: str, network: nn.Module) -> dict[str, torch.Tensor]:
    """The weights and buffers of `name`, checked against `network`'s own, key by key."""
    file = path / f"{name}.safetensors"
    tensors = _load(file, device=str(next(network.parameters()).device))
    expected = network.state_dict()
    mismatched = [f"{key}: checkpoint {tuple(tensors[key].shape)} vs model {tuple(value.shape)}"
                  for key, value in expected.items() if key in tensors and tensors[key].shape != value.shape]
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if mismatched or missing or unexpected:
        details = "; ".join(mismatched[:3] + [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise CheckpointError(f"{file} does not fit this model.arch/model.z_dim "
                              f"(was it made with another config?): {details}")
    retyped = [f"{key} is {tensors[key].dtype}, the model's {value.dtype}"
               for key, value in expected.items() if tensors[key].dtype != value.dtype]
    if retyped:
        raise CheckpointError(f"{file} is damaged: {'; '.join(retyped[:3])}")
    return tensors


def _optimizer_states(path: Path, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, dict]:
    """Each optimizer's state dict: the checkpoint's Adam moments, checked against the parameters they belong
    to, with the live optimizer's hyper-parameters."""
    file = path / "optimizers.safetensors"
    tensors = _load(file)
    described = json.loads((path / "optimizers.json").read_text())
    states = {}
    for name, optimizer in optimizers.items():
        live = optimizer.state_dict()
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        fields = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if optimizer.defaults["amsgrad"] else set())
        per_parameter: dict[int, dict] = {}
        for key, value in tensors.items():
            owner, _, rest = key.partition(".")
            index, _, field_name = rest.partition(".")
            if owner == name:
                per_parameter.setdefault(int(index) if index.isdigit() else -1, {})[field_name] = value
        saved_groups = [group["params"] for group in described[name]["param_groups"]]
        problem = None
        if saved_groups != [group["params"] for group in live["param_groups"]]:
            problem = f"{name}'s parameter groups {saved_groups} are not this model's"
        elif per_parameter and set(per_parameter) != set(range(len(parameters))):
            problem = f"{name} has moments for parameters {sorted(per_parameter)}, the model {len(parameters)}"
        for index, values in per_parameter.items():
            if problem is not None:
                break
            parameter = parameters[index]
            if set(values) != fields:
                problem = (f"{name}.{index} holds {sorted(values)}, this run's Adam needs {sorted(fields)} "
                           f"(optim.amsgrad={str(optimizer.defaults['amsgrad']).lower()})")
            for field_name, value in values.items():
                shape, dtype = ((), torch.float32) if field_name == "step" else (parameter.shape, parameter.dtype)
                if problem is None and (value.shape != shape or value.dtype != dtype):
                    problem = (f"{name}.{index}.{field_name} is {value.dtype} {tuple(value.shape)}, "
                               f"its parameter needs {dtype} {tuple(shape)}")
        if problem is not None:
            raise CheckpointError(f"{file} does not fit this model: {problem}")
        states[name] = {"state": per_parameter, "param_groups": live["param_groups"]}
    return states


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


def _rng_states(path: Path, rank: int, noise: torch.Generator) -> tuple[dict, dict]:
    """Rank `rank`'s RNG states, each checked against the size of the generator it will be set into."""
    file = path / f"rank_{rank}.safetensors"
    tensors = _load(file)
    described = json.loads((path / f"rank_{rank}.json").read_text())
    expected = {"noise": noise.get_state(), "torch_cpu": torch.get_rng_state(),
                "numpy_keys": torch.zeros(len(np.random.get_state()[1]), dtype=torch.int64)}
    wrong = [f"{key} is {tuple(tensors[key].shape) if key in tensors else 'missing'}, this run's is "
             f"{tuple(value.shape)}" for key, value in expected.items()
             if key not in tensors or tensors[key].shape != value.shape or tensors[key].dtype != value.dtype]
    if len(described["python"]["state"]) != len(random.getstate()[1]):
        wrong.append(f"the python state has {len(described['python']['state'])} numbers")
    if wrong:
        raise CheckpointError(f"{file} does not fit: {'; '.join(wrong)} (was it written on another kind of device?)")
    return tensors, described


def _apply_rng(tensors: dict, described: dict, noise: torch.Generator) -> None:
    noise.set_state(tensors["noise"])
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
    numpy_state = described["numpy"]
    np.random.set_state((numpy_state["kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = described["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
