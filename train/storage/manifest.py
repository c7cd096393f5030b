"""Checkpoint folders on disk, without torch: their layout, the manifest that makes a folder a
checkpoint, verification, pruning, and which checkpoint a run resumes from.

Kept apart from train/storage/checkpoint.py (the tensors) so that `python -m train` can refuse a bad
`resume=` in a moment, before torch and the training code are imported (~7 s).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from train.data import images
from train.errors import CheckpointError, ConfigError, RunWriteError
from train.networks import NetworkOptions
from train.storage.files import fsync, write_file
from train.storage.layout import BEST, CHECKPOINTS, check_best_link
from train.storage.run_lock import LOCK_FILE

FORMAT_VERSION = 1
CHECKPOINT_FOLDER = re.compile(r"step_(\d{8,})")
MANIFEST = "manifest.json"
STATE = "state.json"
# Besides each rank's rank_<r>.safetensors and rank_<r>.json (state.json says how many ranks wrote one).
REQUIRED_FILES = (STATE, "generator.safetensors", "discriminator.safetensors", "generator_ema.safetensors",
                  "optimizers.safetensors", "optimizers.json")
# What the loaders read from the JSON files; `int` stands for a count (0 or more), a key ending in "?" may be absent.
STATE_SCHEMA = {
    "progress": {"step": int, "images_seen": int, "data": {"epoch": int, "step_in_epoch": int}, "seed_offset": int,
                 "wandb_run_id": (str, type(None)), "best_fd?": (float, int, type(None)),
                 "evaluations_since_best?": int},
    "world_size": int, "global_batch": int, "scaler": (dict, type(None)), "images?": images.SCHEMA,
    "hardware?": {"device": str, "processes": int, "mixed_precision": str}, "noise?": str,
    "config": {"model": {"arch": str, "z_dim": int, "conditional?": bool, **NetworkOptions.schema()}},
}
OPTIMIZERS_SCHEMA = {"generator": {"param_groups": [{"params": [int]}]},
                     "discriminator": {"param_groups": [{"params": [int]}]}}
RNG_SCHEMA = {"numpy": {"kind": str, "position": int, "has_gauss": int, "cached_gaussian": (int, float)},
              "python": {"version": int, "state": [int], "gauss": (float, type(None))}}
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


# What to do about a failed write, by its errno; anything else: find the cause in the error and start again.
WRITE_FAILURE_FIXES = {
    errno.ENOSPC: "make room (or raise the quota)", errno.EDQUOT: "make room (or raise the quota)",
    errno.EFBIG: "make room (or raise the file-size limit)",
    errno.EROFS: "the file system is mounted read-only: make it writable, or resume with a copy of run.dir on a "
                 "writable one,",
    errno.EACCES: "this user may not write there: fix the permissions,", errno.EPERM: "fix the permissions,",
    errno.ENOENT: "a folder of the run went missing while it ran (removed by hand?): put it back,",
    errno.EISDIR: "a folder stands where the run writes a file: move it away,",
    errno.ENOTDIR: "a file stands where the run keeps a folder: move it away,",
    errno.EEXIST: "something stands where the run makes a folder: move it away,",
}


def write_failure_fix(error: OSError) -> str:
    """What to do about a failed write, by its cause (to be followed by "and run the same command again")."""
    return WRITE_FAILURE_FIXES.get(error.errno, "remove the cause")


@contextmanager
def stop_on_write_failure(what: str, run_dir: Path, partial_folder: Path | None = None):
    """Turn a failed write (`what`: "writing <file>") into a RunWriteError that says what to do about that failure
    and names the newest intact checkpoint; `partial_folder`, which the failed write leaves incomplete, is removed
    to give the space back."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as error:
        if partial_folder is not None:
            shutil.rmtree(partial_folder, ignore_errors=True)
        newest = newest_valid(run_dir, report=lambda _: None)
        fix = write_failure_fix(error)
        raise RunWriteError(
            f"{what} failed ({error}){'; its partial folder is removed' if partial_folder else ''}. "
            + (f"The newest intact checkpoint is {newest}: " if newest else "There is no checkpoint yet: ")
            + f"{fix} and start the same command again") from error


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Folders named as checkpoints (`step_<N>`), by step, oldest first. Hidden `.incomplete_*` folders,
    `damaged_*` ones set aside, links (never followed, so never deleted through) and anything else a person put
    there are not checkpoints."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    named = [(int(match[1]), path) for path in folder.iterdir()
             if (match := CHECKPOINT_FOLDER.fullmatch(path.name)) and path.is_dir() and not path.is_symlink()]
    return [path for _, path in sorted(named)]


# ---------------------------------------------------------------------------------------- writing


def write_manifest(folder: Path) -> None:
    """Seal a fully written folder: the format version and the SHA-256 of every file in it."""
    files = sorted(p.name for p in folder.iterdir())
    write_file(folder / MANIFEST, json.dumps({"format_version": FORMAT_VERSION,
                                              "sha256": {name: sha256(folder / name) for name in files}}, indent=1))


def mark_best(run_dir: Path, checkpoint: Path) -> None:
    """Point checkpoints/best at `checkpoint` (a folder beside it): a relative link, replaced atomically."""
    folder = checkpoints_dir(run_dir)
    check_best_link(run_dir, new_best=checkpoint.name)
    staging = folder / f".incomplete_{BEST}"
    staging.unlink(missing_ok=True)
    os.symlink(checkpoint.name, staging)
    os.replace(staging, folder / BEST)
    fsync(folder)


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete the valid checkpoints older than the newest `keep_last` valid ones, except the `best` one. A
    folder that does not verify is neither counted nor deleted, so a damaged or foreign folder can never cost
    a good checkpoint."""
    best = checkpoints_dir(run_dir) / BEST
    best_name = os.readlink(best) if best.is_symlink() else None
    valid = 0
    for candidate in reversed(complete_checkpoints(run_dir)):
        try:
            verify(candidate)
        except CheckpointError:
            continue  # left for a person to look at (resume reports it)
        valid += 1
        if valid > keep_last and candidate.name != best_name:
            shutil.rmtree(candidate)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- reading


def verify(path: Path) -> dict:
    """Check that `path` is a complete, well-formed checkpoint this code can read; return its manifest.

    Every file the format needs must be listed in the manifest and match its SHA-256; the JSON files must
    follow their schema and every safetensors header must describe its own bytes. Whether the tensors fit
    the model is checked when they are loaded (checkpoint.restore).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir() or not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {MANIFEST} "
                              "(point at a folder such as <run.dir>/checkpoints/step_00001000)")
    try:
        manifest = _json_file(manifest_path)
    except CheckpointError:
        manifest = {}
    version, hashes = manifest.get("format_version"), manifest.get("sha256")
    if not (_is_count(version) and isinstance(hashes, dict) and all(isinstance(h, str) for h in hashes.values())):
        raise CheckpointError(f"{manifest_path} is damaged: not a checkpoint manifest")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written with checkpoint format version {version}; this code reads up "
                              f"to version {FORMAT_VERSION}: update the code to resume from it")
    for name, expected in hashes.items():
        if Path(name).name != name:
            raise CheckpointError(f"{manifest_path} names {name!r}, which is not a file of the checkpoint")
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing (listed in {MANIFEST})")
        raw = (path / name).read_bytes()
        if hashlib.sha256(raw).hexdigest() != expected:
            raise CheckpointError(f"{path / name} is damaged: its SHA-256 does not match {MANIFEST}")
        if name.endswith(".safetensors"):
            _check_safetensors_header(path / name, raw)
    state = checked_json(path / STATE, STATE_SCHEMA) if STATE in hashes else {}
    needed = REQUIRED_FILES + tuple(f"rank_{r}{suffix}" for r in range(state.get("world_size", 0))
                                    for suffix in (".safetensors", ".json"))
    unlisted = [name for name in needed if name not in hashes]
    if unlisted:
        raise CheckpointError(f"{manifest_path} does not list {', '.join(unlisted)}: the checkpoint is incomplete "
                              "or its manifest was edited, and only files it lists and verifies are loaded")
    checked_json(path / "optimizers.json", OPTIMIZERS_SCHEMA)
    for rank in range(state["world_size"]):
        checked_json(path / f"rank_{rank}.json", RNG_SCHEMA)
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except ValueError:  # also a UnicodeDecodeError
        raise CheckpointError(f"{path} is damaged: not JSON") from None
    except RecursionError:  # nested deeper than the parser's stack: no file this code writes
        raise CheckpointError(f"{path} is damaged: JSON nested too deeply to be a description this code wrote") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is damaged: not a JSON object")
    return value


def checked_json(path: Path, schema: dict) -> dict:
    """The JSON object in `path`, or a CheckpointError naming where it departs from `schema` (see _schema_problem)."""
    value = _json_file(path)
    if (problem := _schema_problem(value, schema, "")) is not None:
        raise CheckpointError(f"{path} is damaged: {problem}")
    return value


def _schema_problem(value, schema, where: str) -> str | None:
    """Where `value` departs from `schema` (a dict of keys to schemas, `int` for a count, a type or a tuple of
    types, or a one-element list for a list of such), or None."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where or 'it'} is not an object"
        for key, inner in schema.items():
            optional, key = key.endswith("?"), key.removesuffix("?")
            if key not in value:
                if optional:
                    continue
                return f"{where + key} is missing"
            if (problem := _schema_problem(value[key], inner, f"{where}{key}.")) is not None:
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where.rstrip('.')} is not a list"
        return next((p for item in value if (p := _schema_problem(item, schema[0], where)) is not None), None)
    if schema is int:
        return None if _is_count(value) else f"{where.rstrip('.')} is {value!r}, not a count"
    return None if isinstance(value, schema) else f"{where.rstrip('.')} is {value!r}"


def _check_safetensors_header(path: Path, raw: bytes) -> None:
    """The header of a safetensors file describes tensors that lie within the file, each as large as its shape."""
    try:
        size = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 or size > len(raw) - 8:
            raise ValueError(f"its header claims {size} bytes, the file holds {len(raw)}")
        header = json.loads(raw[8:8 + size])
        data = len(raw) - 8 - size
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            begin, end = tensor["data_offsets"]
            elements = math.prod(tensor["shape"])
            if not 0 <= begin <= end <= data or end - begin != elements * SAFETENSORS_DTYPE_BYTES[tensor["dtype"]]:
                raise ValueError(f"tensor {name!r} does not fit its bytes")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is damaged: not a readable safetensors file ({error})") from None


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def newest_valid(run_dir: Path, report) -> Path | None:
    """The newest checkpoint in run_dir that verifies; each one skipped is reported with why."""
    for candidate in reversed(complete_checkpoints(run_dir)):
        try:
            verify(candidate)
            return candidate
        except CheckpointError as error:
            report(f"skipping checkpoint {candidate.name}: {error}")
    return None


def resolve(path: Path, report=print) -> Path:
    """A checkpoint folder as given, or the newest valid checkpoint of a run directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        verify(path)
        return path
    if checkpoints_dir(path).is_dir():
        found = newest_valid(path, report)
        if found is None:
            raise CheckpointError(f"{path} holds no valid checkpoint")
        return found
    raise CheckpointError(f"{path} is neither a checkpoint folder (with {MANIFEST}) nor a run directory "
                          f"(with {CHECKPOINTS}/)")


def resume_point(resume: str, run_dir: Path, report) -> Path | None:
    """The checkpoint a run continues from, per `resume`: auto, none, or a path (unless run.dir's newest valid
    checkpoint is further along: a requeued job continues from its own); None starts afresh."""
    run_dir = Path(run_dir)
    if resume == "none":
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise ConfigError(f"run.dir {str(run_dir)!r} is not empty and resume=none; choose another run.dir, "
                              "or resume=auto to continue the run in it")
        return None
    if resume != "auto":
        path = Path(resume)
        verify(path)
        newest = newest_valid(run_dir, report=lambda _: None)
        step = read_state(path)["progress"]["step"]
        newest_step = read_state(newest)["progress"]["step"] if newest is not None else step
        if newest_step <= step:
            return path
        # A requeued job continues from the checkpoint it wrote; going back would train over it.
        report(f"run.dir {str(run_dir)!r} already holds {newest.name} (step {newest_step}), further along than "
               f"resume={resume} (step {step}): continuing from it, as a requeued job must. To start again from "
               f"step {step}, use a new run directory (e.g. run.dir={run_dir}_from_step{step})")
        return newest
    complete = complete_checkpoints(run_dir)
    if not complete:
        return None
    found = newest_valid(run_dir, report)
    if found is None:
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(run_dir)} is valid (see above); nothing was "
                              "changed. Restore them, resume from a path with resume=..., or choose another run.dir")
    latest = complete[-1]
    if found != latest:
        report(f"resuming from {found.name}, the newest valid checkpoint (not {latest.name})")
    return found
